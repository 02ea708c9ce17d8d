"""Keys whose events move between partitions, or into a recreated topic, on the
real broker and store: what a user sees is the last change made, not the one
with the greater offset of another log (see the version guard in stream/plan.py).

Events here are native ones without a ``version`` field, and tombstones: both
are ordered by their Kafka offset alone, which is meaningless across logs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, run_until, unique, wait_for

pytestmark = pytest.mark.slow


def settings_for(broker: LocalBroker, topic: str, store: Path, group: str,
                 model: Path) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": group, "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        embed={"model": str(model)},
        sink={"path": str(store), "collection": "docs"},
        metrics={"enabled": False},
    )


def doc(doc_id: str, text: str) -> tuple[bytes, bytes]:
    return json.dumps({"id": doc_id}).encode(), json.dumps({"id": doc_id, "text": text}).encode()


def send(bootstrap: str, topic: str, partition: int,
         messages: list[tuple[bytes, bytes | None]]) -> int:
    """Produce to one partition, in order; returns the offset of the last one."""
    producer = Producer({"bootstrap.servers": bootstrap})
    offsets: list[int] = []
    for key, value in messages:
        producer.produce(topic, key=key, value=value, partition=partition,
                         on_delivery=lambda err, msg: offsets.append(msg.offset()))
    assert producer.flush(30) == 0
    time.sleep(0.01)  # the next send has a later Kafka timestamp, as a later change would
    return offsets[-1]


def consume_all(settings: Settings, total: int, metrics: Metrics) -> dict[str, object]:
    """Run a consumer until ``total`` messages are committed; the stored texts by doc."""
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, metrics)
        try:
            run_until(stream, lambda: sum(stream.committed.values()) >= total, 90,
                      f"{total} messages to be committed")
        finally:
            stream.close()
        texts: dict[str, object] = {}
        for point in pipeline.sink.points():
            texts[str(point.payload["doc_id"])] = point.payload["text"]
        return texts
    finally:
        pipeline.close()


def test_a_tombstone_or_update_that_moved_partitions_wins(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    bootstrap, topic = broker.bootstrap_servers, unique("moving")
    create_topic(bootstrap, topic, partitions=2)
    fillers = [doc(f"filler{i}", f"Filler document {i}.") for i in range(22)]
    assert send(bootstrap, topic, 0, [*fillers, doc("gone", "Created, then deleted.")]) == 22
    assert send(bootstrap, topic, 0, [doc("edited", "The first text.")]) == 23
    metrics = Metrics()
    settings = settings_for(broker, topic, tmp_path / "store", unique("g"), tiny_model_dir)
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, metrics)
        try:
            run_until(stream, lambda: sum(stream.committed.values()) >= 24, 90,
                      "partition 0 to be committed")
            # Later, the keys hash to partition 1 (the topic gained a partition).
            tombstone = (json.dumps({"id": "gone"}).encode(), None)
            assert send(bootstrap, topic, 1, [doc("other", "Another document."), tombstone]) == 1
            assert send(bootstrap, topic, 1, [doc("edited", "The edited text.")]) == 2
            run_until(stream, lambda: sum(stream.committed.values()) >= 27, 90,
                      "partition 1 to be committed")
        finally:
            stream.close()
        texts = {str(p.payload["doc_id"]): p.payload["text"] for p in pipeline.sink.points()}
    finally:
        pipeline.close()

    assert "gone" not in texts, "a tombstone at a lower offset of another partition is ignored"
    assert texts["edited"] == "The edited text.", "an edit that moved partitions was dropped"
    assert len(texts) == 22 + 2
    moved = {op: metrics.registry.get_sample_value(
        "embedstream_events_total", {"op": op, "outcome": "moved", "route": "default"})
        for op in ("tombstone", "native")}
    assert moved == {"tombstone": 1.0, "native": 1.0}, "writes across partitions count as moved"


def test_events_of_a_recreated_topic_are_applied(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    bootstrap, topic = broker.bootstrap_servers, unique("recreated")
    create_topic(bootstrap, topic, partitions=1)
    send(bootstrap, topic, 0, [doc(f"doc{i}", f"Document {i}, first text.") for i in range(30)])
    settings = settings_for(broker, topic, tmp_path / "store", unique("g"), tiny_model_dir)
    assert len(consume_all(settings, 30, Metrics())) == 30

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic])[topic].result(10)
    wait_for(lambda: topic not in admin.list_topics(timeout=5).topics, 20, "the topic to go")
    create_topic(bootstrap, topic, partitions=1)
    send(bootstrap, topic, 0, [doc("doc5", "Document 5, written after the topic was recreated."),
                               doc("new", "A document of the new topic.")])

    # The same group: its committed offset (30) is past the new topic's end, so it
    # starts again from the beginning (auto.offset.reset), at offsets 0 and 1.
    texts = consume_all(settings, 2, Metrics())
    assert texts["doc5"] == "Document 5, written after the topic was recreated."
    assert texts["new"] == "A document of the new topic."
    assert len(texts) == 31
