"""Crash storm: SIGKILL the consumer at random moments while the stream flows; the
store must still end exactly as the event log says.

What it proves. The README promises that a consumer killed with SIGKILL at any
moment and restarted replays, never skips, and reaches the state an
uninterrupted run would (commit after write, plus the version guard). Here that
is checked on a large, messy stream against an oracle, not against another run:

1. The real pieces: the bundled Tansu broker (:class:`embedstream.stream.app.broker.LocalBroker`,
   a free port), a topic with 4 partitions, the consumer as a subprocess
   (``embedstream consume --config FILE``, all-MiniLM-L6-v2 on the CPU,
   an embedded Qdrant Edge store in a temporary directory).
2. The stream (seeded, deterministic bytes): ``--events`` Debezium change events
   (PostgreSQL envelope from :func:`embedstream.stream.app.devdata.debezium_value`, version =
   ``source.lsn``, key ``{"id": ...}`` so a document's events share a partition
   and stay in order) over a few thousand document ids: creates, updates that
   replace sentences, append sentences or paragraphs, truncate, or change the
   title (texts: real MS MARCO passages, ``../shared/data/msmarco-sample``),
   deletes each followed by a Kafka tombstone, re-creates of deleted ids,
   producer-retry duplicates (a message twice in a row, tombstones included),
   connector-restart replays (the last 5-30 messages of the log sent again,
   as Debezium does after a restart) and stale replays (a random older
   c/u/d event, long superseded, sent again: it must not overwrite or
   resurrect anything).
3. A producer thread sends the messages at ``--rate`` events/s on an absolute
   schedule, so the stream flows during the storm. The default, 40/s (~500 s
   for 20,000), is set by the kills rather than by the consumer's speed: a
   restart takes 10-20 s on 2 shared cores before its first new commit
   (Python and model start, group join, a micro-batch and a checkpoint), so
   25 kill-restart cycles take about as long as the stream then lasts.
4. The main thread SIGKILLs the consumer ``--kills`` times and restarts it at
   once each time: after each (re)start it waits until the group's committed
   offsets move (the new process is up and working), then a seeded random
   delay (uniform on [0, 2m], m = the time left in the first 90% of the
   stream per kill left less the restart time, at least 3 s: a catching-up
   micro-batch takes a few seconds, so kills land in every phase of it), then
   SIGKILL.
   At each kill it records whether work was uncommitted (the group's committed
   offsets, read after the process died, < messages the broker had
   acknowledged at the kill), whether the producer was still sending, and
   copies the store's state collection as the crash left it; after the run
   those copies say how many messages were applied to the store but not
   committed at each kill (per partition, highest offset in a document state
   + 1 - committed; a lower bound): the replays that must change nothing.
5. When every message is produced and every kill done, the last consumer must
   catch up (committed offsets, read with a separate ``Consumer.committed``,
   == end offsets from the produce acknowledgements), then gets SIGTERM and
   must exit 0 within 30 s.
6. The store is opened (``QdrantEdgeSink.open(None)``) and compared with the
   oracle: the generator's own record of each document's final state (text and
   lsn of its last original event; deleted documents absent). The oracle is
   cross-checked before anything runs against a model of the documented
   ordering rule (``(lsn, offset)``; tombstones by offset) replayed over the
   whole log, duplicates and replays included, so the stream is unambiguous.
   A document is a mismatch if any of these fails: it is in the store iff it
   is live; its chunks are exactly ``TokenChunker`` (built as
   :func:`embedstream.stream.app.service.build_pipeline` does) applied to its final text
   (index, start, end, text, content hash; indexes 0..n-1; point ids
   ``chunk_point_id(doc, index)``), every chunk has ``version`` == the final
   lsn; its state point says live with that version, or deleted; and, for a
   seeded random sample of 1,000 chunks (``--vector-sample``), the stored
   vector has cosine >= 0.99 with stock ``SentenceTransformer.encode(text,
   normalize_embeddings=True)``. Nothing may go to the dead-letter topic, and
   per partition the broker's offsets must follow the produce order.

The last stdout line is one JSON object (``kills``, ``kills_with_uncommitted_work``,
``events``, ``documents_checked``, ``chunks_checked``, ``vectors_checked``,
``mismatches``, ``sigterm_exit_code``, ``sigterm_s``, ``wall_s`` and more);
progress goes to stderr. Exit code 0 only if there are no mismatches, exactly
``--kills`` kills were made, the SIGTERM exit was clean, nothing was
dead-lettered and the partition order held. Every child process and the broker
are stopped on any exit (SIGTERM and SIGHUP to this script included).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/crash_storm.py            # ~12 min
    HF_HUB_OFFLINE=1 .venv/bin/python bench/crash_storm.py --events 1500 --kills 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from embedstream.sinks._layout import SCROLL_PAGE, STATE_SUFFIX
from embedstream.sinks.factory import build_admin
from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.app.devdata import debezium_value
from embedstream.stream.config import SinkSettings, load_settings
from embedstream.stream.store import chunk_point_id

from _common import (
    MSMARCO,
    OtherLoad,
    consume_process,
    local_broker,
    log,
    machine,
    read_passages,
    stock_model,
)

TOPIC = "crashstorm.pages"
GROUP = "crash-storm"
COLLECTION = "pages"


def physical_collection(store: Path) -> str:
    """The collection behind the alias (the configured name is an alias)."""
    admin = build_admin(SinkSettings(kind="qdrant-edge", path=store, collection=COLLECTION))
    try:
        return admin.resolve(COLLECTION) or COLLECTION
    finally:
        admin.close()
PARTITIONS = 4
FIRST_LSN = 10_000_000
MIN_COSINE = 0.99
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


# --------------------------------------------------------------------------------------
# The stream and its oracle
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    doc_id: str
    key: bytes
    value: bytes | None  # None: a tombstone
    op: str  # c, u, d or tombstone
    lsn: int | None  # source.lsn (None for a tombstone)
    origin: str  # new, retry (duplicate), replay (connector restart), stale (old event again)


@dataclass
class Doc:
    title: str | None
    paragraphs: list[list[str]]  # sentences per paragraph

    def image(self, doc_id: str) -> dict[str, Any]:
        body = "\n\n".join(" ".join(sentences) for sentences in self.paragraphs)
        return {"id": doc_id, "title": self.title, "body": body}


def document_text(image: dict[str, Any]) -> str:
    """What the consumer indexes for ``text_fields: [title, body]``
    (embedstream.stream._image_fields.image_text)."""
    parts = [str(image[f]) for f in ("title", "body") if image.get(f) is not None]
    return "\n\n".join(p for p in parts if p.strip())


@dataclass
class Final:
    """A document's final state per the generator: its last original event."""

    lsn: int
    text: str | None  # None: deleted


@dataclass
class Stream:
    messages: list[Message]
    final: dict[str, Final]
    counts: dict[str, int] = field(default_factory=dict)


def load_corpus() -> tuple[list[list[str]], list[str]]:
    passages = [[s for s in _SENTENCE_END.split(" ".join(text.split())) if s]
                for text in read_passages(MSMARCO / "passages.tsv")]
    titles = [" ".join(text.split()) for text in read_passages(MSMARCO / "queries.tsv")]
    return passages, titles


class Generator:
    """A seeded Debezium change stream over ``n_docs`` ids (see the module docstring)."""

    # Short documents (about one MS MARCO passage, 2-3 chunks): the consumer, restarted
    # 25 times, must still keep up on 2 shared cores.
    MAX_SENTENCES = 12

    def __init__(self, seed: int, n_docs: int, passages: list[list[str]], titles: list[str]):
        self.rng = random.Random(seed)
        self.passages, self.titles = passages, titles
        self.unused = [f"doc-{i:05d}" for i in range(n_docs)]
        self.rng.shuffle(self.unused)
        self.live: dict[str, Doc] = {}
        self.live_ids: list[str] = []
        self.deleted: list[str] = []
        self.images: dict[str, dict[str, Any]] = {}
        self.messages: list[Message] = []
        self.final: dict[str, Final] = {}
        self.lsn = FIRST_LSN
        self.ts_ms = 1_735_689_600_000  # 2025-01-01, advanced per event: deterministic bytes
        self.counts: dict[str, int] = defaultdict(int)

    # -- texts -------------------------------------------------------------

    def _passage(self) -> list[str]:
        return list(self.rng.choice(self.passages))

    def _new_doc(self) -> Doc:
        paragraphs = [self._passage()]
        if self.rng.random() < 0.1:
            paragraphs.append(self._passage()[:2])
        title = self.rng.choice(self.titles) if self.rng.random() < 0.7 else None
        return Doc(title, paragraphs)

    def _edit(self, doc: Doc) -> Doc:
        paragraphs = [list(p) for p in doc.paragraphs]
        title = doc.title
        kind = self.rng.choices(["replace", "append", "paragraph", "truncate", "title"],
                                weights=[45, 20, 8, 22, 5])[0]
        self.counts[f"edit_{kind}"] += 1
        if kind == "replace":  # change one or two sentences
            for _ in range(self.rng.choice((1, 1, 2))):
                p = self.rng.randrange(len(paragraphs))
                s = self.rng.randrange(len(paragraphs[p]))
                paragraphs[p][s] = self.rng.choice(self._passage())
        elif kind == "append":  # a sentence at the end of the last paragraph
            paragraphs[-1].append(self.rng.choice(self._passage()))
        elif kind == "paragraph":  # a short new paragraph
            paragraphs.append(self._passage()[:2])
        elif kind == "truncate":  # drop trailing sentences (or the last paragraph)
            if len(paragraphs) > 1 and self.rng.random() < 0.5:
                paragraphs.pop()
            elif len(paragraphs[-1]) > 1:
                del paragraphs[-1][self.rng.randrange(1, len(paragraphs[-1])):]
            else:
                paragraphs[-1] = paragraphs[-1][:1]
                paragraphs[-1][0] = paragraphs[-1][0][: max(20, len(paragraphs[-1][0]) // 2)]
        else:
            title = None if title is not None and self.rng.random() < 0.3 else (
                self.rng.choice(self.titles))
        while sum(len(p) for p in paragraphs) > self.MAX_SENTENCES:  # bound the cost
            if len(paragraphs) > 1:
                paragraphs.pop(0)
            else:
                del paragraphs[0][0]
        edited = Doc(title, paragraphs)
        if document_text(edited.image("x")) == document_text(doc.image("x")):
            edited.paragraphs[-1].append(self.rng.choice(self._passage()))  # a real change
        return edited

    # -- events ------------------------------------------------------------

    def _emit(self, doc_id: str, op: str, after: Doc | None) -> None:
        self.lsn += 8
        self.ts_ms += self.rng.randrange(5, 40)
        key = json.dumps({"id": doc_id}).encode()
        before = self.images.get(doc_id)
        image = after.image(doc_id) if after is not None else None
        value = debezium_value(op, before, image, self.lsn, self.ts_ms, ts_ms=self.ts_ms + 3)
        self.messages.append(Message(doc_id, key, value, op, self.lsn, "new"))
        self.counts[op] += 1
        if image is None:
            self.images.pop(doc_id, None)
            self.final[doc_id] = Final(self.lsn, None)
            self.messages.append(Message(doc_id, key, None, "tombstone", None, "new"))
            self.counts["tombstone"] += 1
        else:
            self.images[doc_id] = image
            self.final[doc_id] = Final(self.lsn, document_text(image))

    def _create(self, doc_id: str) -> None:
        doc = self._new_doc()
        self.live[doc_id] = doc
        self.live_ids.append(doc_id)
        self._emit(doc_id, "c", doc)

    def _pick_live(self) -> str:
        return self.live_ids[self.rng.randrange(len(self.live_ids))]

    def _remove_live(self, doc_id: str) -> None:
        i = self.live_ids.index(doc_id)
        self.live_ids[i] = self.live_ids[-1]
        self.live_ids.pop()
        del self.live[doc_id]

    def step(self, room: int) -> None:
        """One original change (1 message, or 2 for a delete and its tombstone)."""
        rng = self.rng
        if self.unused and (not self.live_ids or rng.random() < 0.3):
            self._create(self.unused.pop())
        elif self.deleted and rng.random() < 0.05:  # re-create a deleted id
            doc_id = self.deleted.pop(rng.randrange(len(self.deleted)))
            self.counts["recreate"] += 1
            self._create(doc_id)
        elif room >= 2 and len(self.live_ids) > 1 and rng.random() < 0.08:
            doc_id = self._pick_live()
            self._remove_live(doc_id)
            self.deleted.append(doc_id)
            self._emit(doc_id, "d", None)
        else:
            doc_id = self._pick_live()
            self.live[doc_id] = self._edit(self.live[doc_id])
            self._emit(doc_id, "u", self.live[doc_id])

    def generate(self, total: int) -> Stream:
        rng = self.rng
        while len(self.messages) < total:
            room = total - len(self.messages)
            roll = rng.random()
            if roll < 0.03 and self.messages:  # producer retry: the last message again
                last = self.messages[-1]
                self.messages.append(Message(last.doc_id, last.key, last.value, last.op,
                                             last.lsn, "retry"))
                self.counts["retry"] += 1
            elif roll < 0.035 and len(self.messages) > 40 and room >= 5:
                # Connector restart: Debezium re-sends everything since its last
                # flushed source offset, i.e. a whole suffix of the log, in order.
                run = rng.randrange(5, min(30, room) + 1)
                for m in self.messages[-run:]:
                    self.messages.append(Message(m.doc_id, m.key, m.value, m.op, m.lsn,
                                                 "replay"))
                self.counts["replayed"] += run
                self.counts["replay_runs"] += 1
            elif roll < 0.055 and len(self.messages) > 200:
                # A long-superseded change event (never a tombstone) sent again.
                m = self.messages[rng.randrange(0, len(self.messages) - 100)]
                if m.value is not None:
                    self.messages.append(Message(m.doc_id, m.key, m.value, m.op, m.lsn, "stale"))
                    self.counts["stale"] += 1
            else:
                self.step(room)
        assert len(self.messages) == total
        return Stream(self.messages, self.final, dict(self.counts))


def guard_model(messages: Sequence[Message]) -> dict[str, tuple[int, bool]]:
    """The documented ordering rule (stream/plan.py) replayed over the log: events of a
    document apply in ``(lsn, offset)`` order; a tombstone deletes a live document
    that is older in the log and keeps its version. Returns doc -> (lsn, deleted).
    Log position stands in for the offset: a document's events share a partition and
    are produced in order (checked against the broker's offsets after the run)."""
    state: dict[str, tuple[int, int, bool]] = {}  # doc -> (version, position, deleted)
    for pos, m in enumerate(messages):
        current = state.get(m.doc_id)
        if m.op == "tombstone":
            if current is None:
                state[m.doc_id] = (-1, pos, True)
            elif not current[2] and pos > current[1]:
                state[m.doc_id] = (current[0], pos, True)
            continue
        assert m.lsn is not None
        if current is None or (m.lsn, pos) > current[:2]:
            state[m.doc_id] = (m.lsn, pos, m.op == "d")
    return {doc: (version, deleted) for doc, (version, _, deleted) in state.items()}


def build_stream(seed: int, events: int) -> Stream:
    passages, titles = load_corpus()
    stream = Generator(seed, max(10, events // 6), passages, titles).generate(events)
    model = guard_model(stream.messages)
    for doc_id, final in stream.final.items():
        if model.get(doc_id) != (final.lsn, final.text is None):
            raise AssertionError(f"generator bug: {doc_id} ends as {model.get(doc_id)} under "
                                 f"the ordering rule but {final} by construction")
    return stream


# --------------------------------------------------------------------------------------
# Producer, consumer process, offsets
# --------------------------------------------------------------------------------------


class ProducerThread(threading.Thread):
    """Sends the messages at ``rate``/s on an absolute schedule; records delivery."""

    def __init__(self, bootstrap: str, messages: Sequence[Message], rate: float) -> None:
        super().__init__(name="crash-storm-producer", daemon=True)
        self.messages, self.rate = messages, rate
        self.producer = Producer({
            "bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
            # Strict per-partition order, without relying on idempotence support.
            "max.in.flight.requests.per.connection": 1,
        })
        self.lock = threading.Lock()
        self.sent = 0
        self.acked = 0
        self.offsets: list[tuple[int, int] | None] = [None] * len(messages)
        self.errors: list[str] = []
        self.max_late_s = 0.0
        self.stop = threading.Event()
        self.done = threading.Event()
        self.started_at = 0.0
        self.finished_at = 0.0

    def _delivered(self, index: int, error: Any, message: Any) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(str(error))
                return
            self.offsets[index] = (message.partition(), message.offset())
            self.acked += 1

    def run(self) -> None:
        try:
            self.started_at = start = time.monotonic()
            for i, m in enumerate(self.messages):
                if self.stop.is_set():
                    return
                due = start + i / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                self.max_late_s = max(self.max_late_s, time.monotonic() - due)
                self.producer.produce(TOPIC, key=m.key, value=m.value,
                                      on_delivery=lambda e, msg, i=i: self._delivered(i, e, msg))
                self.sent = i + 1
                self.producer.poll(0)
            remaining = self.producer.flush(60)
            if remaining:
                self.errors.append(f"{remaining} messages undelivered after flush")
        except Exception as error:  # surfaced by the main thread
            self.errors.append(repr(error))
        finally:
            self.finished_at = time.monotonic()
            self.done.set()


class Offsets:
    """The group's committed offsets, read from outside the group (no subscription)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.reader = Consumer({"bootstrap.servers": bootstrap, "group.id": GROUP,
                                "enable.auto.commit": False})
        self.partitions = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]

    def committed(self) -> list[int]:
        return [max(tp.offset, 0) for tp in self.reader.committed(self.partitions, timeout=10)]

    def count(self, topic: str, quiet_s: float = 3.0) -> int:
        """Messages in partition 0 of ``topic``, read from the start until ``quiet_s``
        brings nothing (the dead-letter topic the consumer creates has one partition)."""
        reader = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"{GROUP}-count",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        try:
            reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])  # 1 partition
            seen, quiet_until = 0, time.monotonic() + quiet_s
            while time.monotonic() < quiet_until:
                got = [m for m in reader.consume(100, 0.5) if m.error() is None]
                if got:
                    seen += len(got)
                    quiet_until = time.monotonic() + quiet_s
            return seen
        finally:
            reader.close()

    def close(self) -> None:
        self.reader.close()


class ConsumerProcess:
    def __init__(self, config_file: Path, log_file: Path) -> None:
        self.config_file, self.log_file = config_file, log_file
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log_file.open("ab") as out:
            out.write(f"--- start {self.starts} at {time.time():.3f}\n".encode())
            out.flush()
            self.process = consume_process(self.config_file, out)
        self.starts += 1

    def check_alive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise RuntimeError(f"the consumer exited by itself with code {code}:\n{self.tail()}")

    def sigkill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------------------
# The storm
# --------------------------------------------------------------------------------------


@dataclass
class KillRecord:
    at_s: float
    ready_s: float  # (re)start -> first new commit
    delay_s: float  # then this long before the SIGKILL
    produced: int  # messages the broker had acknowledged at the kill
    committed: int  # the group's committed offsets after the process died
    streaming: bool  # the producer was still sending
    committed_parts: list[int]  # per partition
    snapshot: Path  # copy of the state collection right after the kill
    applied_uncommitted: int = -1  # applied in the store but not committed (-1: unknown)


def storm(args: argparse.Namespace, stream: Stream, bootstrap: str, workdir: Path,
          result: dict[str, Any]) -> Path:
    """Produce, kill, restart, catch up, SIGTERM. Returns the store path."""
    store = workdir / "store"
    config_file = workdir / "embedstream.yaml"
    config_file.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": bootstrap, "topics": [TOPIC], "group_id": GROUP,
                  "options": {"session.timeout.ms": 6000}},
        "source": {"format": "debezium", "id_fields": ["id"], "text_fields": ["title", "body"]},
        "sink": {"kind": "qdrant-edge", "path": str(store), "collection": COLLECTION},
        "metrics": {"enabled": False},
    }))
    load_settings(config_file)  # valid, or stop here naming the field

    total = len(stream.messages)
    kill_rng = random.Random(args.seed * 7919 + 1)
    producer = ProducerThread(bootstrap, stream.messages, args.rate)
    offsets = Offsets(bootstrap)
    consumer = ConsumerProcess(config_file, workdir / "consumer.log")
    kills: list[KillRecord] = []
    t0 = time.monotonic()
    planned_s = total / args.rate
    kill_window_end = t0 + 0.9 * planned_s
    last_report = 0.0

    def report(force: bool = False) -> None:
        nonlocal last_report
        now = time.monotonic()
        if force or now - last_report >= 10:
            last_report = now
            committed = sum(offsets.committed())
            log(f"t={now - t0:6.1f}s produced {producer.acked}/{total} committed {committed} "
                f"lag {producer.acked - committed} kills {len(kills)}/{args.kills}")

    def check() -> None:
        consumer.check_alive()
        if producer.errors:
            raise RuntimeError(f"producer failed: {producer.errors[:3]}")

    try:
        producer.start()
        consumer.start()
        while len(kills) < args.kills:
            started = time.monotonic()
            before = sum(offsets.committed())
            deadline = started + 300
            while True:  # until this process has committed something new
                check()
                committed = sum(offsets.committed())
                if committed > before:
                    break
                if producer.done.is_set() and committed >= producer.acked:
                    break  # all caught up and nothing more coming: kill anyway
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no progress in 300 s after a restart:\n"
                                       f"{consumer.tail()}")
                report()
                time.sleep(0.1)
            ready_s = time.monotonic() - started
            # Spread the kills over the stream: mean delay = time left / kills left,
            # less the time a restart takes to make progress.
            mean_ready = (sum(k.ready_s for k in kills) + ready_s) / (len(kills) + 1)
            left = (kill_window_end - time.monotonic()) / (args.kills - len(kills))
            mean_delay = max(3.0, left - mean_ready)
            delay = kill_rng.uniform(0.0, 2 * mean_delay)
            until = time.monotonic() + delay
            while time.monotonic() < until:
                check()
                report()
                time.sleep(min(0.1, max(0.0, until - time.monotonic())))
            produced, streaming = producer.acked, not producer.done.is_set()
            consumer.sigkill()
            committed_parts = offsets.committed()
            committed = sum(committed_parts)
            # The state collection as the crash left it, read after the run (a copy:
            # the next consumer must find the store exactly as the crash left it).
            state_dir = store / f"{physical_collection(store)}{STATE_SUFFIX}"
            snapshot = workdir / "state-at-kill" / f"{len(kills) + 1:02d}"
            if state_dir.is_dir():
                shutil.copytree(state_dir, snapshot)
            kills.append(KillRecord(round(time.monotonic() - t0, 2), round(ready_s, 2),
                                    round(delay, 2), produced, committed, streaming,
                                    committed_parts, snapshot))
            log(f"SIGKILL {len(kills)}/{args.kills} at t={time.monotonic() - t0:.1f}s "
                f"(ready {ready_s:.1f}s + delay {delay:.1f}s): acknowledged {produced}, "
                f"committed {committed}, uncommitted {produced - committed}")
            consumer.start()

        log("all kills done; waiting for the producer and the catch-up")
        while not producer.done.is_set():
            check()
            report()
            time.sleep(0.2)
        check()
        stream_s = producer.finished_at - producer.started_at
        # End offsets from the produce acknowledgements: Tansu's ListOffsets answer
        # (get_watermark_offsets) trails after batched produces, so it is not used.
        ends = [0] * PARTITIONS
        for where in producer.offsets:
            if where is not None:
                ends[where[0]] = max(ends[where[0]], where[1] + 1)
        if sum(ends) != total or producer.acked != total:
            raise RuntimeError(f"end offsets {ends} (sum {sum(ends)}), acknowledged "
                               f"{producer.acked}, expected {total}")
        catchup_from = time.monotonic()
        deadline = catchup_from + max(600.0, total / 20)
        while offsets.committed() != ends:
            check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the last consumer did not catch up: committed "
                                   f"{offsets.committed()} of {ends}\n{consumer.tail()}")
            report()
            time.sleep(0.2)
        report(force=True)
        catchup_s = time.monotonic() - catchup_from

        assert consumer.process is not None
        stop_at = time.monotonic()
        consumer.process.send_signal(signal.SIGTERM)
        try:
            sigterm_code: int | None = consumer.process.wait(30)
        except subprocess.TimeoutExpired:
            sigterm_code = None
            log(f"the consumer did not exit within 30 s of SIGTERM:\n{consumer.tail()}")
            consumer.cleanup()
        sigterm_s = time.monotonic() - stop_at
        log(f"SIGTERM: exit code {sigterm_code} after {sigterm_s:.2f}s")
        if sigterm_code != 0:
            log(consumer.tail())
        committed_after_stop = offsets.committed()

        # Per partition, the broker's offsets must follow the produce order.
        last_offset: dict[int, int] = {}
        order_ok = True
        for where in producer.offsets:
            if where is None:
                order_ok = False
                continue
            partition, offset = where
            if offset <= last_offset.get(partition, -1):
                order_ok = False
            last_offset[partition] = offset
        doc_partitions: dict[str, set[int]] = defaultdict(set)
        for m, where in zip(stream.messages, producer.offsets, strict=True):
            if where is not None:
                doc_partitions[m.doc_id].add(where[0])
        order_ok = order_ok and all(len(p) == 1 for p in doc_partitions.values())
        dlq = offsets.count(f"{GROUP}.{TOPIC}.dlq")  # the per-group dead-letter topic
        uncommitted = [k for k in kills if k.committed < k.produced]
        doc_partition = {doc: min(parts) for doc, parts in doc_partitions.items()}
        for kill in kills:
            kill.applied_uncommitted = applied_beyond_commit(kill, doc_partition)
        applied = [k.applied_uncommitted for k in kills if k.applied_uncommitted >= 0]
        result.update({
            "kills": len(kills),
            "kills_with_uncommitted_work": len(uncommitted),
            "kills_while_streaming": sum(k.streaming for k in kills),
            "kills_with_applied_uncommitted_writes": sum(a > 0 for a in applied),
            "applied_uncommitted_at_kill_mean": round(float(np.mean(applied)), 1)
            if applied else None,
            "applied_uncommitted_at_kill_max": max(applied, default=None),
            "applied_uncommitted_per_kill": [k.applied_uncommitted for k in kills],
            "kill_delays_s": [k.delay_s for k in kills],
            "uncommitted_at_kill_mean": round(
                float(np.mean([k.produced - k.committed for k in kills])) if kills else 0.0, 1),
            "uncommitted_at_kill_max": max((k.produced - k.committed for k in kills), default=0),
            "consumer_starts": consumer.starts,
            "restart_to_progress_s_mean": round(
                float(np.mean([k.ready_s for k in kills])) if kills else 0.0, 2),
            "kill_times_s": [k.at_s for k in kills],
            "stream_s": round(stream_s, 1),
            "producer_max_late_s": round(producer.max_late_s, 2),
            "last_kill_s": kills[-1].at_s if kills else None,
            "catchup_s": round(catchup_s, 1),
            "sigterm_exit_code": sigterm_code,
            "sigterm_s": round(sigterm_s, 2),
            "committed_after_sigterm_equals_end": committed_after_stop == ends,
            "partition_order_ok": order_ok,
            "dlq_records": dlq,
        })
        return store
    finally:
        producer.stop.set()
        consumer.cleanup()
        offsets.close()
        if producer.is_alive():
            producer.join(5)


def applied_beyond_commit(kill: KillRecord, doc_partition: dict[str, int]) -> int:
    """Messages the store had applied past the group's commit when the kill landed:
    per partition, (highest offset in a document's state + 1) - committed offset.
    The state point is written last in every apply, so this is a lower bound."""
    if not kill.snapshot.is_dir():
        return -1
    import qdrant_edge as qe

    applied = [0] * PARTITIONS
    shard = qe.EdgeShard.load(str(kill.snapshot), None)
    try:
        offset: Any = None
        while True:
            records, offset = shard.scroll(qe.ScrollRequest(
                offset=offset, limit=SCROLL_PAGE, with_payload=True, with_vector=False))
            for record in records:
                payload = record.payload or {}
                partition = doc_partition.get(str(payload.get("doc_id")))
                if partition is not None and isinstance(payload.get("offset"), int):
                    applied[partition] = max(applied[partition], payload["offset"] + 1)
            if offset is None:
                break
    finally:
        shard.close()
    return sum(max(0, a - c) for a, c in zip(applied, kill.committed_parts, strict=True))


# --------------------------------------------------------------------------------------
# Verification against the oracle
# --------------------------------------------------------------------------------------


def verify(store: Path, stream: Stream, sample: int, seed: int,
           result: dict[str, Any]) -> None:
    from embedstream.stream.chunking import TokenChunker

    log("verifying the store against the oracle")
    model = stock_model()
    # As embedstream.stream.app.service.build_pipeline does (chunk.max_tokens default 256).
    max_seq = int(model.max_seq_length or model.tokenizer.model_max_length)
    chunker = TokenChunker(model.tokenizer, max_tokens=min(256, max_seq - 2))

    sink = QdrantEdgeSink(store, COLLECTION)
    sink.open(None)
    try:
        points = list(sink.points())
        states = sink.document_states(list(stream.final))
    finally:
        sink.close()

    problems: dict[str, list[str]] = defaultdict(list)
    by_doc: dict[str, list[Any]] = defaultdict(list)
    for point in points:
        doc_id = point.payload.get("doc_id")
        if not isinstance(doc_id, str):
            problems[f"<point {point.id}>"].append("point without a doc_id")
            continue
        by_doc[doc_id].append(point)

    live = {d: f for d, f in stream.final.items() if f.text is not None}
    deleted = {d: f for d, f in stream.final.items() if f.text is None}
    for doc_id in sorted(set(by_doc) - set(live)):
        why = "deleted" if doc_id in deleted else "never existed"
        problems[doc_id].append(f"in the store with {len(by_doc[doc_id])} chunks but {why}")
    chunks_checked = chunks_expected = 0
    for doc_id, final in sorted(live.items()):
        assert final.text is not None
        stored = sorted(by_doc.get(doc_id, []), key=lambda p: p.payload.get("chunk_index", -1))
        expected = chunker.chunk(final.text)
        chunks_checked += len(stored)
        chunks_expected += len(expected)
        if not stored:
            problems[doc_id].append(f"live (lsn {final.lsn}) but absent from the store")
            continue
        indexes = [p.payload.get("chunk_index") for p in stored]
        if indexes != list(range(len(stored))):
            problems[doc_id].append(f"chunk indexes {indexes} are not 0..n-1")
        if len(stored) != len(expected):
            problems[doc_id].append(f"{len(stored)} chunks stored, {len(expected)} expected")
        versions = sorted({p.payload.get("version") for p in stored}, key=str)
        if versions != [final.lsn]:
            problems[doc_id].append(f"versions {versions}, expected {final.lsn}")
        for point, chunk in zip(stored, expected, strict=False):
            got = point.payload
            if got.get("text") != final.text[got.get("start", 0):got.get("end", 0)]:
                problems[doc_id].append(f"chunk {got.get('chunk_index')}: text is not "
                                        "final_text[start:end]")
            want = {"chunk_index": chunk.index, "start": chunk.start, "end": chunk.end,
                    "text": chunk.text, "content_hash": chunk.content_hash}
            have = {k: got.get(k) for k in want}
            if have != want:
                diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
                problems[doc_id].append(f"chunk {chunk.index} differs (stored, expected): "
                                        f"{str(diff)[:300]}")
            if point.id != chunk_point_id(doc_id, int(got.get("chunk_index", -1))):
                problems[doc_id].append(f"chunk {chunk.index}: unexpected point id {point.id}")
    for doc_id, final in stream.final.items():
        state = states.get(doc_id)
        if state is None:
            problems[doc_id].append("no state point")
        elif final.text is None and not state.deleted:
            problems[doc_id].append(f"state says live (version {state.version}), "
                                    "but the document is deleted")
        elif final.text is not None and (state.deleted or state.version != final.lsn):
            problems[doc_id].append(f"state {state}, expected live at version {final.lsn}")

    # Vectors: a seeded sample against stock encode.
    rng = random.Random(seed * 31 + 7)
    sampled = rng.sample(points, min(sample, len(points)))
    min_cos = None
    if sampled:
        expected_vectors = model.encode([str(p.payload.get("text", "")) for p in sampled],
                                        normalize_embeddings=True, batch_size=64)
        stored_vectors = np.asarray([p.vector for p in sampled], dtype=np.float32)
        cosines = np.sum(expected_vectors * stored_vectors, axis=1) / np.maximum(
            np.linalg.norm(stored_vectors, axis=1), 1e-12)
        min_cos = float(cosines.min())
        for point, cosine in zip(sampled, cosines, strict=True):
            if cosine < MIN_COSINE:
                problems[str(point.payload.get("doc_id"))].append(
                    f"chunk {point.payload.get('chunk_index')}: cosine {cosine:.4f} "
                    "with stock encode")

    for doc_id, issues in sorted(problems.items())[:10]:
        log(f"MISMATCH {doc_id}: {'; '.join(issues[:4])}")
    result.update({
        "documents_checked": len(stream.final),
        "live_documents": len(live),
        "deleted_documents": len(deleted),
        "points_in_store": len(points),
        "chunks_checked": chunks_checked,
        "chunks_expected": chunks_expected,
        "vectors_checked": len(sampled),
        "min_cosine": None if min_cos is None else round(min_cos, 5),
        "mismatches": len(problems),
    })
    if problems:
        result["mismatch_examples"] = {d: i[:3] for d, i in sorted(problems.items())[:5]}


# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="messages in the stream")
    parser.add_argument("--kills", type=int, default=25, help="SIGKILLs of the consumer")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="events produced per second (default: the stream lasts ~8 min, "
                             "about as long as 25 kill-restart cycles take)")
    parser.add_argument("--seed", type=int, default=20240601)
    parser.add_argument("--vector-sample", type=int, default=1000,
                        help="chunks whose vectors are compared with stock encode")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.events < 100 or args.kills < 0 or args.rate <= 0:
        parser.error("need --events >= 100, --kills >= 0 and --rate > 0")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks below

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    started, others = time.monotonic(), OtherLoad()
    stream = build_stream(args.seed, args.events)
    counts = stream.counts
    log(f"stream: {len(stream.messages)} messages over {len(stream.final)} documents "
        f"({ {k: counts[k] for k in sorted(counts)} }); ~{len(stream.messages) / args.rate:.0f}s "
        f"at {args.rate:g}/s, {args.kills} kills")
    result: dict[str, Any] = {
        "events": len(stream.messages),
        "creates": counts.get("c", 0), "updates": counts.get("u", 0),
        "deletes": counts.get("d", 0), "tombstones": counts.get("tombstone", 0),
        "recreates": counts.get("recreate", 0), "duplicates": counts.get("retry", 0),
        "replayed": counts.get("replayed", 0), "stale_replays": counts.get("stale", 0),
        "rate": args.rate, "seed": args.seed, "partitions": PARTITIONS,
    }
    workdir = Path(tempfile.mkdtemp(prefix="crash-storm-"))
    try:
        with local_broker([TOPIC], partitions=PARTITIONS,
                          log_file=workdir / "tansu.log") as broker:
            log(f"work directory {workdir}")
            store = storm(args, stream, broker.bootstrap_servers, workdir, result)
        verify(store, stream, args.vector_sample, args.seed, result)
    except Exception as error:  # still one JSON line last, saying what went wrong
        log(traceback.format_exc())
        result.update({"error": f"{type(error).__name__}: {str(error)[:2000]}",
                       "wall_s": round(time.monotonic() - started, 1), "ok": False,
                       "machine": machine()})
        print(json.dumps(result))
        return 1
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    # Every child has been waited for by now, so their CPU time is ours, not others'.
    result["others_cores"] = others.cores()
    ok = (result["mismatches"] == 0 and result["kills"] == args.kills
          and result["sigterm_exit_code"] == 0 and result["sigterm_s"] < 30
          and result["dlq_records"] == 0 and result["partition_order_ok"]
          and result["committed_after_sigterm_equals_end"])
    result["ok"] = ok
    result["machine"] = machine()
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
