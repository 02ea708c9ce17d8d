"""Helpers shared by the tests that run the real broker, store and model."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from embedstream.stream.app.devdata import DevMessage, load_revisions, revision_events
from embedstream.stream.consumer import StreamConsumer
from embedstream.stream.dead_letters import ensure_topics

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REVISIONS = DATA / "revisions" / "doc-revisions.jsonl"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_topic(bootstrap: str, topic: str, partitions: int = 2) -> None:
    ensure_topics(AdminClient({"bootstrap.servers": bootstrap}), [topic], partitions=partitions)


def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]],
            headers: Sequence[tuple[str, bytes]] | None = None) -> dict[int, int]:
    """Produce in order; return the end offset per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    ends: dict[int, int] = {}

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)

    for key, value in messages:
        producer.produce(topic, key=key, value=value, headers=list(headers or []),
                         on_delivery=delivered)
    assert producer.flush(30) == 0
    producer.close()
    return ends


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"),
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([topic])
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expected and time.monotonic() < deadline:
            got += [m for m in consumer.consume(100, 0.5) if m.error() is None]
    finally:
        consumer.close()
    return got


def before_deadline(condition: Callable[[], bool], timeout_s: float, what: str,
                    progress: Callable[[], str] | None = None) -> Callable[[], bool]:
    """``condition`` as a predicate that raises AssertionError (naming ``what``, and
    ``progress()`` when given) once ``timeout_s`` seconds pass with it still false.
    For loops that would otherwise spin forever: ``while not check(): ...``."""
    deadline = time.monotonic() + timeout_s

    def check() -> bool:
        if condition():
            return True
        if time.monotonic() > deadline:
            got = f"; {progress()}" if progress else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{got}")
        return False

    return check


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    check = before_deadline(predicate, timeout_s, what)
    while not check():
        time.sleep(0.2)


def committed_so_far(consumer: StreamConsumer) -> str:
    """The offsets ``consumer`` has committed, per partition and in all."""
    offsets = dict(sorted(consumer.committed.items()))
    per_partition = ", ".join(f"{topic}[{p}]={o}" for (topic, p), o in offsets.items())
    return (f"committed offsets so far: {per_partition or 'none'} "
            f"({sum(offsets.values())} in all), {len(consumer.assigned)} partitions assigned")


def run_until(consumer: StreamConsumer, until: Callable[[], bool], deadline_s: float,
              what: str = "the stop condition") -> None:
    """``consumer.run(until=until)``, failing instead of hanging: when ``until()`` is
    still false ``deadline_s`` seconds on, the loop stops with an AssertionError that
    names ``what`` and the offsets committed so far (nothing more is committed: the
    consumer treats the error as a failed run)."""
    consumer.run(until=before_deadline(until, deadline_s, what,
                                       progress=lambda: committed_so_far(consumer)))


@dataclass
class ChangeStream:
    """Messages to produce and the state a correct consumer must end in."""

    messages: list[tuple[bytes | None, bytes | None]]
    live: dict[str, str]  # doc_id -> latest text
    deleted: set[str]
    bad: int  # undecodable messages in the stream


def revision_stream(pages: Sequence[str], seed: int = 7) -> ChangeStream:
    """Real revisions of ``pages`` as Debezium events, with a delete and re-create,
    a final delete, producer-retry duplicates, a connector-restart replay of
    older events, a schema-change event and undecodable messages."""
    rng = random.Random(seed)
    rows = [r for r in load_revisions(REVISIONS) if r["doc_id"].endswith(tuple(pages))]
    by_doc: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], []).append(row)
    docs = sorted(by_doc)
    # Delete the first page half-way through its history; its later revisions re-create it.
    recreated = by_doc[docs[0]]
    middle = recreated[len(recreated) // 2]
    rows.insert(rows.index(middle), {**middle, "deleted": True, "text": None})
    # Delete the last page for good at the end.
    rows.append({**by_doc[docs[-1]][-1], "deleted": True, "text": None})
    events: list[DevMessage] = list(revision_events(rows))

    out: list[tuple[bytes | None, bytes | None]] = []
    for i, message in enumerate(events):
        out.append((message.key, message.value))
        if rng.random() < 0.1:  # a producer retry: the same record twice in a row
            out.append((message.key, message.value))
        if i and i % 25 == 0:  # a connector restart re-sends a run of older events
            start = rng.randrange(0, i)
            out += [(m.key, m.value) for m in events[start:start + 5]]
    bad = [(b'{"id": "x"}', b"\xff\xfe not json"), (b'{"id": "y"}', b'{"op": "c", "after": 42}'),
           (None, b'{"op": "u", "after": {"text": "no id anywhere"}}')]
    for message in bad:
        out.insert(rng.randrange(1, len(out)), message)
    out.insert(rng.randrange(1, len(out)), (None, json.dumps(
        {"source": {"connector": "postgresql"}, "databaseName": "docs",
         "ddl": "ALTER TABLE pages ADD COLUMN title text"}).encode()))

    final: dict[str, str | None] = {}
    for message in events:
        if message.value is not None:
            final[message.doc_id] = message.text
    live = {doc: text for doc, text in final.items() if text is not None}
    return ChangeStream(out, live, {d for d, t in final.items() if t is None}, len(bad))
