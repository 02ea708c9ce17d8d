"""Fault injection against the real broker and store: a store outage, a frozen
broker, a rebalance mid-stream, and embedding that runs out of memory."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, TopicPartition
from qdrant_client import QdrantClient

from embedstream.sinks.qdrant_server import QdrantServerSink
from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.app.service import Pipeline, build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.consumer import StreamConsumer
from embedstream.stream.errors import SinkUnavailable
from embedstream.stream.events import ChangeEvent
from embedstream.stream.health import Health, serve_http
from embedstream.stream.metrics import Metrics
from embedstream.stream.store import Sink

from .streamkit import before_deadline, create_topic, produce, read_all, run_until, unique

pytestmark = pytest.mark.slow  # every test runs the real broker


def native(doc: str, text: str, version: int) -> tuple[bytes, bytes]:
    return doc.encode(), json.dumps({"id": doc, "text": text, "version": version}).encode()


def docs(ids: range, version: int = 1) -> list[tuple[bytes, bytes]]:
    return [native(f"d{i}", f"Document {i} is about subject {i * 13 % 97}, version {version}.",
                   version) for i in ids]


def settings_for(bootstrap: str, topic: str, group: str, store: Path | None, model: Path,
                 **kafka_options: Any) -> Settings:
    sink: dict[str, Any] = ({"path": str(store), "collection": "docs"} if store else
                            {"kind": "qdrant", "url": ":memory:", "collection": "docs"})
    return Settings(
        kafka={"bootstrap_servers": bootstrap, "topics": [topic], "group_id": group,
               "options": {"session.timeout.ms": 6000, **kafka_options}},
        source={"format": "native"}, embed={"model": str(model), "max_wait_ms": 20},
        sink={**sink, "flush_interval_ms": 200}, metrics={"enabled": False},
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def stored_docs(sink: Sink, n: int) -> dict[str, int]:
    return {d: s.version for d, s in sink.document_states([f"d{i}" for i in range(n)]).items()
            if not s.deleted}


# -- store outage -------------------------------------------------------------------


class OutageSink:
    """The real sink, failing every call while an outage is on: at first at
    once (refused), later only after a delay (a timeout)."""

    def __init__(self, real: Sink) -> None:
        self.real = real
        self.outage_until = 0.0
        self.timeouts_from = 0.0
        self.failed_calls = 0

    def _check(self) -> None:
        now = time.monotonic()
        if now < self.outage_until:
            self.failed_calls += 1
            if now >= self.timeouts_from:
                time.sleep(1.0)
                raise SinkUnavailable("store timed out", retry_after=0.5)
            raise SinkUnavailable("connection refused", retry_after=0.5)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.real, name)
        if name in {"document_states", "apply", "flush", "stored_vectors"}:
            def call(*args: Any) -> Any:
                self._check()
                return attribute(*args)
            return call
        return attribute


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_store_outage_pauses_reports_not_ready_and_resumes(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    topic, group = unique("outage"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=2)
    # max.poll.interval.ms far below the outage: the consumer must keep polling.
    settings = settings_for(broker.bootstrap_servers, topic, group, tmp_path / "store",
                            tiny_model_dir, **{"max.poll.interval.ms": 7000})
    pipeline = build_pipeline(settings)
    sink = OutageSink(pipeline.sink)
    pipeline.sink = sink
    metrics, port = Metrics(), free_port()
    health = Health(60, ready_gauge=metrics.ready)
    serve_http(metrics, health, "127.0.0.1", port)
    stream = build_consumer(pipeline, metrics, health=health)
    try:
        produce(broker.bootstrap_servers, topic, docs(range(10)))
        run_until(stream, lambda: sum(stream.committed.values()) >= 10, 60, "the first docs")
        assert http_status(port, "/readyz") == 200

        start = time.monotonic()
        sink.outage_until, sink.timeouts_from = start + 15, start + 8
        produce(broker.bootstrap_servers, topic, docs(range(10, 30)))
        seen: list[tuple[int, int, float]] = []

        def during_outage() -> bool:
            if time.monotonic() < sink.outage_until - 0.5:
                if sink.failed_calls:  # the consumer has met the outage
                        seen.append((http_status(port, "/readyz"), http_status(port, "/healthz"),
                                 sample(metrics, "embedstream_paused_partitions")))
                # Nothing past the events applied before the outage is committed.
                assert sum(stream.committed.values()) == 10
                return False
            return True

        run_until(stream, during_outage, 60, "the outage to end")
        assert sink.failed_calls >= 4, "the consumer retried throughout the outage"
        assert seen and all(ready == 503 and live == 200 for ready, live, _ in seen)
        assert max(paused for _, _, paused in seen) >= 1

        run_until(stream, lambda: sum(stream.committed.values()) >= 30, 60,
                  "the recovery after the outage")
        assert http_status(port, "/readyz") == 200
        assert sample(metrics, "embedstream_paused_partitions") == 0
        assert len(stored_docs(sink.real, 30)) == 30
        # It never left the group: no partition was lost or revoked.
        assert sample(metrics, "embedstream_rebalance_partitions_total", event="lost") == 0
        assert sample(metrics, "embedstream_rebalance_partitions_total", event="revoked") == 0
        assert stream.assigned == {(topic, 0), (topic, 1)}
    finally:
        stream.close()
        pipeline.close()


# -- broker freeze ------------------------------------------------------------------


@pytest.mark.timeout(240)  # 30 s frozen by design; ~50 s in all
def test_broker_frozen_for_30s_recovers_with_nothing_lost_or_applied_twice(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    with LocalBroker(log_file=tmp_path / "tansu.log") as frozen:
        topic, group = unique("freeze"), unique("g")
        create_topic(frozen.bootstrap_servers, topic, partitions=2)
        settings = settings_for(frozen.bootstrap_servers, topic, group, tmp_path / "store",
                                tiny_model_dir)
        pipeline = build_pipeline(settings)
        applications: Counter[tuple[str, int]] = Counter()

        def applied(events: Sequence[ChangeEvent], _: float) -> None:
            applications.update((e.doc_id, e.version) for e in events)

        stream = build_consumer(pipeline, Metrics(), on_applied=applied)
        try:
            produce(frozen.bootstrap_servers, topic, docs(range(20)))
            run_until(stream, lambda: sum(stream.committed.values()) >= 20, 60,
                      "the first 20 docs")
            frozen.pause()
            thawed = threading.Event()
            # A test thread, not the consumer's: it thaws the broker 30 s on.
            threading.Timer(30, lambda: (frozen.resume(), thawed.set())).start()
            run_until(stream, thawed.is_set, 60, "the thaw")  # the loop survives
            produce(frozen.bootstrap_servers, topic, docs(range(20), 2) + docs(range(20, 30)))
            run_until(stream, lambda: sum(stream.committed.values()) >= 50, 120,
                      "the consumer to recover")
        finally:
            stream.close()
        versions = stored_docs(pipeline.sink, 30)
        pipeline.close()
    assert versions == {f"d{i}": 2 if i < 20 else 1 for i in range(30)}
    assert applications == Counter({(f"d{i}", 1): 1 for i in range(30)}
                                   | {(f"d{i}", 2): 1 for i in range(20)})


# -- rebalance ----------------------------------------------------------------------


@pytest.mark.timeout(300)  # its waits may add up to 210 s on a slow machine
def test_a_member_joins_and_another_leaves_mid_stream_and_nothing_is_lost(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    topic, group = unique("rebalance"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=4)
    settings = settings_for(broker.bootstrap_servers, topic, group, None, tiny_model_dir)
    store = QdrantClient(":memory:")  # one store shared by both members

    def member() -> tuple[Pipeline, StreamConsumer, Metrics]:
        pipeline = build_pipeline(settings, QdrantServerSink(":memory:", "docs", client=store))
        metrics = Metrics()
        return pipeline, build_consumer(pipeline, metrics, on_applied=applied), metrics

    applications: Counter[tuple[str, int]] = Counter()

    def applied(events: Sequence[ChangeEvent], _: float) -> None:
        applications.update((e.doc_id, e.version) for e in events)

    n_docs, rounds = 40, 6
    (pa, first, ma), (pb, second, mb) = member(), member()
    producer_done = threading.Event()

    def produce_rounds() -> None:  # the stream keeps flowing throughout
        for version in range(1, rounds + 1):
            produce(broker.bootstrap_servers, topic, docs(range(n_docs), version))
            time.sleep(1.5)
        producer_done.set()

    feeder = threading.Thread(target=produce_rounds)
    feeder.start()
    total = n_docs * rounds
    try:
        first.start()
        started = before_deadline(lambda: bool(applications), 60, "the first member to apply")
        while not started():
            first.step()
        second.start()  # joins: the partitions are shared out
        deadline = time.monotonic() + 60
        while not (second.assigned and first.assigned and len(applications) > n_docs):
            assert time.monotonic() < deadline, "the second member never got partitions"
            first.step()
            second.step()
        second.run(until=lambda: True)  # apply and checkpoint what it holds ...
        second.close()  # ... and leave: its partitions go back to the first
        run_until(first, lambda: producer_done.is_set() and sum(
            read_committed(broker, group, topic)) >= total, 90, "the stream to drain")
        versions = stored_docs(pa.sink, n_docs)
    finally:
        feeder.join()
        first.close()
        pa.close()
        pb.close()
    assert sample(mb, "embedstream_rebalance_partitions_total", event="assigned") >= 1
    assert sample(ma, "embedstream_rebalance_partitions_total", event="revoked") >= 1
    assert sample(ma, "embedstream_rebalance_partitions_total", event="lost") == 0
    assert versions == {f"d{i}": rounds for i in range(n_docs)}, "every document's last version"
    assert max(applications.values()) == 1, "no event applied twice"
    assert len(read_all(broker.bootstrap_servers, topic, total)) == total


def read_committed(broker: LocalBroker, group: str, topic: str,
                   partitions: int = 4) -> list[int]:
    reader = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
    try:
        found = reader.committed([TopicPartition(topic, p) for p in range(partitions)],
                                 timeout=10)
    finally:
        reader.close()
    return [max(tp.offset, 0) for tp in found]


# -- out of memory ------------------------------------------------------------------


class MemoryHungryEmbedder:
    """The real embedder, out of memory for more than ``limit`` texts at once
    and for any text containing ``POISON``."""

    def __init__(self, real: Any, limit: int) -> None:
        self.real, self.limit, self.calls = real, limit, 0

    def embed(self, texts: Sequence[str]) -> Any:
        self.calls += 1
        if len(texts) > self.limit or any("POISON" in t for t in texts):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real.embed(texts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@pytest.fixture()
def oom_rig(broker: LocalBroker, tmp_path: Path,
            tiny_model_dir: Path) -> Iterator[tuple[str, Pipeline, StreamConsumer, Metrics]]:
    topic, group = unique("oom"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = settings_for(broker.bootstrap_servers, topic, group, tmp_path / "store",
                            tiny_model_dir)
    pipeline = build_pipeline(settings)
    pipeline.embedder = MemoryHungryEmbedder(pipeline.embedder, limit=3)  # type: ignore[assignment]
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)
    yield topic, pipeline, stream, metrics
    stream.close()
    pipeline.close()


def test_out_of_memory_halves_the_batch_and_dead_letters_what_fails_alone(
        broker: LocalBroker, oom_rig: tuple[str, Pipeline, StreamConsumer, Metrics]) -> None:
    topic, pipeline, stream, metrics = oom_rig
    poison = native("d5", "This text is POISON to the model: it never fits in memory.", 1)
    messages = [*docs(range(5)), poison, *docs(range(6, 12))]
    # One batch: the consumer is behind, so everything is read before the first flush.
    produce(broker.bootstrap_servers, topic, messages)
    run_until(stream, lambda: sum(stream.committed.values()) >= 12, 60, "the batch")

    assert sample(metrics, "embedstream_embed_splits_total") >= 2
    assert set(stored_docs(pipeline.sink, 12)) == {f"d{i}" for i in range(12)} - {"d5"}
    [dead] = read_all(broker.bootstrap_servers,
                      pipeline.settings.kafka.dlq_topic_for(topic), 1)
    headers = dict(dead.headers())
    assert headers["embedstream.error.reason"] == b"embed_out_of_memory"
    assert (dead.key(), dead.value()) == poison
    assert sample(metrics, "embedstream_dlq_records_total", reason="embed_out_of_memory",
                  route="default") == 1
    # Every stored vector is the model's vector of its own text.
    points = list(pipeline.sink.points())
    fresh = np.asarray(pipeline.embedder.real.embed([p.payload["text"] for p in points]))
    assert np.min(np.sum(fresh * np.asarray([p.vector for p in points]), axis=1)) >= 0.999


def test_partitions_lost_past_max_poll_interval_are_dropped_uncommitted_and_replayed(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    topic, group = unique("lost"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = settings_for(broker.bootstrap_servers, topic, group, tmp_path / "store",
                            tiny_model_dir, **{"max.poll.interval.ms": 7000})
    settings = settings.model_copy(update={"sink": settings.sink.model_copy(
        update={"flush_interval_ms": 600_000})})  # applied, never checkpointed by the timer
    pipeline = build_pipeline(settings)
    applications: Counter[tuple[str, int]] = Counter()
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics, on_applied=lambda events, _: applications.update(
        (e.doc_id, e.version) for e in events))
    try:
        produce(broker.bootstrap_servers, topic, docs(range(10)))
        stream.start()
        applied = before_deadline(lambda: len(stored_docs(pipeline.sink, 10)) == 10, 60,
                                  "the 10 docs to be applied")
        while not applied():  # step, not run: run() checkpoints when it returns
            stream.step()
        # A stall longer than max.poll.interval.ms: the client leaves the group.
        time.sleep(9)

        def replayed() -> bool:
            stale = sample(metrics, "embedstream_events_total", op="native", outcome="stale",
                           route="default")
            lost = sample(metrics, "embedstream_rebalance_partitions_total", event="lost")
            if lost == 0:  # nothing may be committed for partitions it no longer owns
                assert read_committed(broker, group, topic, 1)[0] == 0
            return lost >= 1 and stale >= 10

        deadline = time.monotonic() + 60
        while not replayed():
            stream.step()
            assert time.monotonic() < deadline, "never lost and replayed"
        stream.run(until=lambda: True)
    finally:
        stream.close()
        pipeline.close()
    assert applications == Counter({(f"d{i}", 1): 1 for i in range(10)}), "replays were stale"
    assert read_committed(broker, group, topic, 1)[0] == 10
