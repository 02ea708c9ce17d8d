"""The zero-gap handover, end to end: a rebuild from Kafka while events keep
arriving and the live consumer keeps running, then the alias swap. Real broker,
real Qdrant Edge store, a tiny random model (the plumbing is what is tested)."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.sinks.factory import build_admin, build_sink
from embedstream.stream.app import service
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.errors import FingerprintMismatch
from embedstream.stream.metrics import Metrics
from embedstream.stream.store import Sink

from .streamkit import create_topic, run_until, unique, wait_for

DOCS = 60


class Writes:
    """Every document write to every collection: (collection, doc_id, version, offset)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int, int]] = []
        self.lock = threading.Lock()

    def wrap(self, sink: Sink) -> Sink:
        writes = self

        class Recording:
            def apply(self, batch: Any) -> None:
                sink.apply(batch)
                with writes.lock:
                    writes.log += [(sink.collection, w.doc_id, w.state.version, w.state.offset)
                                   for w in batch]

            def __getattr__(self, name: str) -> Any:
                return getattr(sink, name)

        return Recording()  # type: ignore[return-value]

    def to(self, collection: str) -> list[tuple[str, int, int]]:
        return [(d, v, o) for c, d, v, o in self.log if c == collection]


class Feed:
    """Produces versioned native events (updates and deletes of DOCS documents, and new
    documents) until stopped, remembering each document's latest event."""

    def __init__(self, bootstrap: str, topic: str, one_per_batch: bool = False) -> None:
        # Tansu reports a partition's end as the base offset of its last record batch + 1,
        # so a snapshot over multi-record batches covers less (the handover then applies
        # the rest). One record per batch makes its reported end exact.
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2,
                                  **({"batch.num.messages": 1} if one_per_batch else {})})
        self.topic = topic
        self.version = 0
        self.latest: dict[str, dict[str, Any]] = {}
        self.ends: dict[int, int] = {}
        self.rng = random.Random(3)
        self.stop = threading.Event()

    def send(self, n: int) -> None:
        for _ in range(n):
            self.version += 1
            # Half are new documents, written once: losing one of those would show.
            doc = f"n{self.version}" if self.rng.random() < 0.5 \
                else f"d{self.rng.randrange(DOCS)}"
            deleted = self.rng.random() < 0.1
            value = {"id": doc, "version": self.version, "deleted": deleted,
                     "text": f"Document {doc}, revision {self.version}. It says something."}
            self.latest[doc] = value
            self.producer.produce(self.topic, key=doc.encode(), value=json.dumps(value).encode(),
                                  on_delivery=self._delivered)
        self.producer.poll(0)

    def _delivered(self, error: Any, message: Any) -> None:
        assert error is None, error
        p = message.partition()
        self.ends[p] = max(self.ends.get(p, 0), message.offset() + 1)

    def run(self) -> None:
        while not self.stop.is_set():
            self.send(3)
            time.sleep(0.03)
        assert self.producer.flush(30) == 0


@pytest.mark.slow
@pytest.mark.timeout(360)  # the main thread's waits may add up to ~300 s
def test_rebuild_from_kafka_hands_over_with_no_event_lost_or_applied_twice(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    topic, group = unique("handover"), unique("g")
    bootstrap = broker.bootstrap_servers
    create_topic(bootstrap, topic, partitions=2)
    settings = Settings(
        kafka={"bootstrap_servers": bootstrap, "topics": [topic], "group_id": group,
               "options": {"session.timeout.ms": 6000}},
        source={"format": "native", "version": "auto"}, embed={"model": str(tiny_model_dir)},
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 200},
        metrics={"enabled": False},
        bulk={"write_documents": 16, "checkpoint_interval_s": 0.3},
    )
    writes = Writes()
    # Every sink the live consumer opens (the first, and the one it follows to) records.
    monkeypatch.setattr(service, "build_sink",
                        lambda s, physical=None, **options: writes.wrap(
                            build_sink(s, physical=physical, **options)))
    feed = Feed(bootstrap, topic)
    feed.send(300)  # history the rebuild reads from the topic
    assert feed.producer.flush(30) == 0

    pipeline = build_pipeline(settings)
    live = build_consumer(pipeline, Metrics())
    first = pipeline.sink.collection
    stop_live = threading.Event()
    errors: list[BaseException] = []

    def run_live() -> None:
        try:
            run_until(live, stop_live.is_set, 330, "the test to stop the live consumer")
        except BaseException as error:
            errors.append(error)

    consumer_thread = threading.Thread(target=run_live)
    feed_thread = threading.Thread(target=feed.run)
    consumer_thread.start()
    feed_thread.start()
    try:
        wait_for(lambda: sum(live.committed.values()) >= 300, 60, "the live consumer to start")
        report = rebuild(settings, RebuildOptions(source="kafka"),
                         sink_factory=lambda name: writes.wrap(
                             build_sink(settings.sink, physical=name)))
        target = report.target
        assert target != first and report.previous == first
        # Events arrived during the rebuild: the catch-up and the live stream shared them.
        wait_for(lambda: live.sink.collection == target, 30, "the live consumer to follow")
        time.sleep(1.0)  # more live events after the swap
    finally:
        feed.stop.set()
        feed_thread.join()
    try:
        ends = {(topic, p): o for p, o in feed.ends.items()}
        wait_for(lambda: all(live.committed.get(tp, 0) >= o for tp, o in ends.items()), 60,
                 "the live consumer to reach the end")
    finally:
        stop_live.set()
        consumer_thread.join()
        live.close()
    assert not errors, errors
    covered = sum(report.covered.values())
    handed = sum(report.handover.values())
    # The snapshot, the catch-up and the live stream each had events to apply.
    assert 0 < covered < handed < sum(ends.values()), (report.covered, report.handover, ends)

    # Nothing lost: the new collection holds every document's latest event.
    sink = live.sink  # it followed the alias
    pipeline.sink = sink
    assert sink.collection == target
    states = sink.document_states(list(feed.latest))
    for doc, event in feed.latest.items():
        assert states[doc].version == event["version"], doc
        assert states[doc].deleted == event["deleted"], doc
    texts = {p.payload["doc_id"]: p.payload["text"] for p in sink.points()}
    assert texts == {d: e["text"] for d, e in feed.latest.items() if not e["deleted"]}
    # Nothing applied twice: no event was written to the new collection more than once.
    into_target = writes.to(target)
    assert len(into_target) == len(set(into_target))
    assert admin_target(settings) == target
    pipeline.close()


def admin_target(settings: Settings) -> str | None:
    admin = build_admin(settings.sink)
    try:
        return admin.resolve(settings.sink.collection)
    finally:
        admin.close()


def test_a_model_change_is_a_rebuild_into_a_new_collection(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": f"Text number {i}."}) + "\n"
                              for i in range(40)))
    old = Settings(source={"text_fields": ["text"]}, embed={"model": str(tiny_model_dir)},
                   sink={"path": str(tmp_path / "store"), "collection": "docs"},
                   metrics={"enabled": False})
    rebuild(old, RebuildOptions(source=str(corpus), handover=False))
    # Another chunking is another fingerprint: the stream refuses to mix it in...
    new = old.model_copy(update={"chunk": old.chunk.model_copy(update={"max_tokens": 32})})
    with pytest.raises(FingerprintMismatch):
        build_pipeline(new)
    # ...and a rebuild under it goes into a new collection, which the alias then names.
    report = rebuild(new, RebuildOptions(source=str(corpus), handover=False))
    assert report.previous is not None and report.target != report.previous
    pipeline = build_pipeline(new)
    try:
        assert pipeline.sink.collection == report.target
        assert len(pipeline.sink.document_states([str(i) for i in range(40)])) == 40
    finally:
        pipeline.close()
    with pytest.raises(FingerprintMismatch):  # the old settings no longer fit the alias
        build_pipeline(old)


class FailingAfter:
    """A sink whose ``apply`` fails from the n-th call on: a rebuild killed mid-way."""

    def __init__(self, sink: Sink, calls: int) -> None:
        self.sink, self.calls = sink, calls

    def apply(self, batch: Any) -> None:
        self.calls -= 1
        if self.calls < 0:
            raise OSError("killed")
        self.sink.apply(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


@pytest.mark.slow
def test_a_rebuild_from_kafka_resumes_per_partition(broker: LocalBroker, tmp_path: Path,
                                                    tiny_model_dir: Path) -> None:
    topic = unique("resume")
    bootstrap = broker.bootstrap_servers
    create_topic(bootstrap, topic, partitions=3)
    settings = Settings(
        kafka={"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique("g"),
               "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        embed={"model": str(tiny_model_dir), "backend": "torch", "precision": "fp32"},
        sink={"path": str(tmp_path / "store"), "collection": "docs"},
        metrics={"enabled": False},
        bulk={"write_documents": 10, "checkpoint_interval_s": 0.001},
    )
    feed = Feed(bootstrap, topic, one_per_batch=True)
    feed.send(400)
    assert feed.producer.flush(30) == 0
    with pytest.raises(OSError, match="killed"):
        rebuild(settings, RebuildOptions(source="kafka", handover=False),
                sink_factory=lambda name: FailingAfter(  # type: ignore[return-value]
                    build_sink(settings.sink, physical=name), 12))
    report = rebuild(settings, RebuildOptions(source="kafka", handover=False))
    assert 0 < report.resumed_from < 400
    assert report.records == 400 - report.resumed_from  # nothing read twice
    pipeline = build_pipeline(settings)
    try:
        states = pipeline.sink.document_states(list(feed.latest))
        assert {d: (s.version, s.deleted) for d, s in states.items()} == {
            d: (e["version"], e["deleted"]) for d, e in feed.latest.items()}
    finally:
        pipeline.close()
