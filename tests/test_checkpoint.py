"""Checkpoints: writes are searchable when applied; offsets are committed only
after the store has made them durable (``Sink.flush``), at most
``sink.flush_interval_ms`` later, and never while the store cannot flush."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import Pipeline, build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.consumer import StreamConsumer
from embedstream.stream.errors import SinkUnavailable
from embedstream.stream.metrics import Metrics
from embedstream.stream.store import Sink

from .streamkit import create_topic, produce, run_until, unique

pytestmark = pytest.mark.slow  # every test runs the real broker


class RecordingSink:
    """The real sink, logging each apply and flush with the offsets committed
    at that moment; ``flush_failures`` makes the next flushes fail."""

    def __init__(self, real: Sink) -> None:
        self.real = real
        self.stream: StreamConsumer | None = None
        self.log: list[tuple[str, int]] = []
        self.flush_failures = 0

    def committed(self) -> int:
        return sum(self.stream.committed.values()) if self.stream else 0

    def apply(self, writes: Any) -> None:
        self.real.apply(writes)
        self.log.append(("apply", self.committed()))

    def flush(self) -> None:
        if self.flush_failures:
            self.flush_failures -= 1
            raise SinkUnavailable("disk is not answering", retry_after=0.2)
        self.real.flush()
        self.log.append(("flush", self.committed()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def docs(n: int, version: int = 1) -> list[tuple[bytes, bytes]]:
    return [(f"d{i}".encode(), json.dumps({"id": f"d{i}", "text": f"Document {i} v{version}.",
                                           "version": version}).encode()) for i in range(n)]


def broker_committed(bootstrap: str, group: str, topic: str) -> int:
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = reader.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        reader.close()
    return max(found[0].offset, 0)


class Rig:
    def __init__(self, broker: LocalBroker, root: Path, model: str, interval_ms: int) -> None:
        self.topic, self.group = unique("ckpt"), unique("g")
        self.bootstrap = broker.bootstrap_servers
        create_topic(self.bootstrap, self.topic, partitions=1)
        settings = Settings(
            kafka={"bootstrap_servers": self.bootstrap, "topics": [self.topic],
                   "group_id": self.group, "options": {"session.timeout.ms": 6000}},
            source={"format": "native"}, embed={"model": model},
            sink={"path": str(root / "store"), "collection": "docs",
                  "flush_interval_ms": interval_ms},
            metrics={"enabled": False},
        )
        self.pipeline: Pipeline = build_pipeline(settings)
        self.sink = RecordingSink(self.pipeline.sink)
        self.pipeline.sink = self.sink
        self.stream = build_consumer(self.pipeline, Metrics())
        self.sink.stream = self.stream

    def stored(self) -> int:
        return len(self.sink.document_states([f"d{i}" for i in range(100)]))

    def close(self) -> None:
        self.stream.close()
        self.pipeline.close()


@pytest.fixture()
def rig_factory(broker: LocalBroker, tmp_path: Path,
                tiny_model_dir: Path) -> Iterator[Any]:
    rigs: list[Rig] = []

    def make(interval_ms: int) -> Rig:
        rigs.append(Rig(broker, tmp_path / str(len(rigs)), str(tiny_model_dir), interval_ms))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def test_applied_writes_are_searchable_before_their_checkpoint(rig_factory: Any) -> None:
    rig = rig_factory(60_000)  # no timed checkpoint during this test
    produce(rig.bootstrap, rig.topic, docs(5))
    seen_uncommitted: list[int] = []

    def all_stored() -> bool:
        if rig.stored() == 5:
            seen_uncommitted.append(rig.sink.committed())
            return True
        return False

    run_until(rig.stream, all_stored, 60, "the 5 documents to be stored")
    assert seen_uncommitted == [0], "every write was readable before anything was committed"
    # Stopping checkpoints: flush first, then the commit reaches the broker.
    assert rig.sink.log[-1] == ("flush", 0)
    assert rig.stream.committed == {(rig.topic, 0): 5}
    assert broker_committed(rig.bootstrap, rig.group, rig.topic) == 5


def test_checkpoints_follow_within_the_interval_and_only_after_a_flush(rig_factory: Any) -> None:
    rig = rig_factory(300)
    produce(rig.bootstrap, rig.topic, docs(5))
    # Without leaving run(): only the timer can commit here.
    run_until(rig.stream, lambda: sum(rig.stream.committed.values()) >= 5, 60,
              "a timed checkpoint of the 5 documents")
    assert rig.stream.committed == {(rig.topic, 0): 5}
    kinds = [kind for kind, _ in rig.sink.log]
    assert "apply" in kinds and kinds[-1] == "flush"
    produce(rig.bootstrap, rig.topic, docs(5, version=2))
    run_until(rig.stream, lambda: sum(rig.stream.committed.values()) >= 10, 60,
              "a timed checkpoint of the second versions")
    assert rig.stream.committed == {(rig.topic, 0): 10}
    # Every commit came after a flush that followed the last apply before it.
    for (kind, committed), (_, later) in zip(rig.sink.log, rig.sink.log[1:], strict=False):
        if later > committed:
            assert kind == "flush"


def test_nothing_is_committed_while_the_store_cannot_flush(rig_factory: Any) -> None:
    rig = rig_factory(0)  # a checkpoint after every batch
    rig.sink.flush_failures = 3
    produce(rig.bootstrap, rig.topic, docs(5))
    commits_while_failing: list[int] = []

    def done() -> bool:
        if rig.sink.flush_failures:
            commits_while_failing.append(rig.sink.committed())
        return sum(rig.stream.committed.values()) >= 5

    run_until(rig.stream, done, 60, "a checkpoint once the store flushes again")
    assert rig.sink.flush_failures == 0 and commits_while_failing
    assert set(commits_while_failing) == {0}
    assert rig.stream.committed == {(rig.topic, 0): 5}
    assert rig.stored() == 5
    assert broker_committed(rig.bootstrap, rig.group, rig.topic) == 5
