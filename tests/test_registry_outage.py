"""A Schema Registry outage mid-stream, through the real broker, store and serializers.

The consumer has read the first schema; then the registry goes down and the
producer moves to a new schema version the consumer has never fetched. The
consumer must pause (not ready, partitions paused), commit nothing past what it
had applied and dead-letter nothing; once the registry answers again it resumes
by itself and the store ends as the oracle says.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.registry_server import SchemaRegistryServer
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique
from .test_routes import avro_debezium, envelope_events

pytestmark = pytest.mark.slow


@pytest.fixture
def registry() -> Iterator[SchemaRegistryServer]:
    with SchemaRegistryServer() as server:
        yield server


def final_texts(events: list[tuple[str, dict[str, Any] | None]]) -> dict[str, str]:
    """What the store must hold after ``events``: each document's last text, deleted ones absent."""
    final: dict[str, str | None] = {}
    for doc, event in events:
        if event is not None:
            final[doc] = event["after"]["body"] if event["op"] != "d" else None
    return {doc: text for doc, text in final.items() if text is not None}


def test_a_registry_outage_pauses_the_stream_and_it_resumes_by_itself(
        broker: LocalBroker, registry: SchemaRegistryServer, tiny_model_dir: Path,
        tmp_path: Path) -> None:
    bootstrap, topic = broker.bootstrap_servers, unique("crm.notes")
    create_topic(bootstrap, topic, partitions=2)
    rng = random.Random(3)
    first, _ = envelope_events(rng, "note", 6, 30)
    second, _ = envelope_events(rng, "note", 6, 30, first_lsn=10_000)
    live = final_texts(first + second)
    before = avro_debezium(registry.url, topic, first)
    ends = produce(bootstrap, topic, before)
    # The second half under a new schema version (one more optional field): its id is
    # one the consumer has not fetched yet, so it needs the registry to read it.
    after = avro_debezium(registry.url, topic, second, extra_field="priority")
    assert {m[1][1:5] for m in after if m[1]} != {m[1][1:5] for m in before if m[1]}

    settings = Settings(
        kafka={"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique("g"),
               "schema_registry": {"url": registry.url, "timeout_s": 2},
               "options": {"session.timeout.ms": 6000}},
        source={"text_fields": ["body"], "encoding": "schema-registry"},
        embed={"model": str(tiny_model_dir)},
        sink={"path": str(tmp_path / "store"), "collection": "notes", "flush_interval_ms": 100},
        metrics={"enabled": False},
    )
    metrics, health = Metrics(), Health(60)
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, metrics, health=health)
        try:
            first_total = sum(ends.values())
            run_until(stream, lambda: sum(stream.committed.values()) >= first_total, 90,
                      "the first schema's events to be committed")
            registry.outage(True)
            produce(bootstrap, topic, after)
            # Down: not ready, partitions paused, nothing more committed or dead-lettered.
            run_until(stream, lambda: not health.ready()[0], 60, "the outage to be noticed")
            assert "schema registry" in health.ready()[1]
            assert metrics.registry.get_sample_value("embedstream_paused_partitions") == 2
            held = dict(stream.committed)
            deadline = time.monotonic() + 4
            ready_seen: list[bool] = []

            def outage_lasted() -> bool:
                ready_seen.append(health.ready()[0])  # after every turn of the loop
                return time.monotonic() > deadline

            run_until(stream, outage_lasted, 30, "a while in the outage")
            assert stream.committed == held, "nothing is committed during the outage"
            assert len(ready_seen) > 3 and not any(ready_seen), \
                "not ready all through the outage, retries included"
            registry.outage(False)
            total = first_total + len(after)
            run_until(stream, lambda: sum(stream.committed.values()) >= total, 90,
                      "the stream to resume by itself and commit everything")
            assert health.ready()[0]
        finally:
            stream.close()
        stored: dict[str, list[tuple[int, str]]] = {}
        for point in pipeline.sink.points():
            stored.setdefault(str(point.payload["doc_id"]), []).append(
                (int(point.payload["chunk_index"]), str(point.payload["text"])))
    finally:
        pipeline.close()
    dead = sum(metrics.registry.get_sample_value(
        "embedstream_dlq_records_total", {"reason": reason, "route": "default"}) or 0
        for reason in ("unknown_schema", "schema_mismatch", "not_framed", "no_schema_registry"))
    assert dead == 0, "an outage dead-letters nothing"
    assert set(stored) == set(live)
    for doc, chunks in stored.items():
        assert " ".join(t for _, t in sorted(chunks)).split() == live[doc].split(), doc
    assert json.dumps(sorted(stored))  # ids are plain strings
