"""Schema Registry framed messages through the real broker: ``rebuild --source kafka``
from an Avro topic, and ``dlq replay`` deciding with the current registry settings.
The real serializers, embedstream's registry server over HTTP, a tiny random model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from confluent_kafka import Producer

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.cli import main
from embedstream.stream.app.dlq import replay_dead_letters
from embedstream.stream.app.registry_server import SchemaRegistryServer
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.dead_letters import (
    REASON_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.intake import take_in
from embedstream.stream.plan import PreparedEvent

from .registry_kit import CUSTOMERS, TOPIC, avro_messages, customer_events
from .streamkit import create_topic, unique


@pytest.fixture
def registry() -> Iterator[SchemaRegistryServer]:
    with SchemaRegistryServer() as server:
        yield server


def produce_one_per_batch(bootstrap: str, topic: str,
                          messages: list[tuple[bytes | None, bytes | None]],
                          headers: list[list[tuple[str, bytes]]] | None = None) -> None:
    # One record per batch: Tansu reports a partition's end as its last batch's base
    # offset + 1, and a rebuild without handover reads only up to that end.
    producer = Producer({"bootstrap.servers": bootstrap, "batch.num.messages": 1})
    for i, (key, value) in enumerate(messages):
        producer.produce(topic, key=key, value=value, partition=0 if headers else -1,
                         headers=headers[i] if headers else None)
    assert producer.flush(30) == 0


def oracle(events: list[tuple[bytes | None, bytes | None]]) -> dict[str, ChangeEvent]:
    """The documents left by ``events`` (JSON), read with the stream's rules: the
    latest upsert of each document that no later delete removed."""
    live: dict[str, ChangeEvent] = {}
    for offset, (key, value) in enumerate(events):
        taken = take_in(key, value, Position(TOPIC, 0, offset), CUSTOMERS, None)
        assert isinstance(taken, PreparedEvent), taken
        event = taken.event
        if event.op is Op.DELETE:
            live.pop(event.doc_id, None)
        else:
            live[event.doc_id] = event
    return live


@pytest.mark.slow
def test_a_rebuild_from_an_avro_topic_equals_the_json_oracle(
        broker: LocalBroker, registry: SchemaRegistryServer, tmp_path: Path,
        tiny_model_dir: Path) -> None:
    topic = unique("avro.customers")
    bootstrap = broker.bootstrap_servers
    create_topic(bootstrap, topic, partitions=2)
    messages = avro_messages(registry, topic)
    produce_one_per_batch(bootstrap, topic, messages)
    settings = Settings(
        kafka={"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique("g"),
               "schema_registry": {"url": registry.url}},
        source=CUSTOMERS.model_dump(),
        embed={"model": str(tiny_model_dir), "backend": "torch", "precision": "fp32"},
        sink={"path": str(tmp_path / "store"), "collection": "customers"},
        metrics={"enabled": False})
    registry.reset_log()
    report = rebuild(settings, RebuildOptions(source="kafka", handover=False))
    assert report.failures == 0 and report.records == len(messages)
    assert len(registry.requests("/schemas/ids/")) == 2  # the key's and the value's, once
    expected = oracle([(e.json_key, e.json_value) for e in customer_events()])
    pipeline = build_pipeline(settings)
    try:
        points = {p.payload["doc_id"]: p.payload for p in pipeline.sink.points()}
        states = pipeline.sink.document_states(["1", "2", "3", "4"])
    finally:
        pipeline.close()
    assert sorted(points) == sorted(expected) == ["1", "4"]
    for doc_id, event in expected.items():
        payload = points[doc_id]
        assert (payload["text"], payload["version"]) == (event.text, event.version)
        assert {k: payload[k] for k in event.metadata} == event.metadata
        assert states[doc_id].version == event.version and not states[doc_id].deleted
    # The deletes, versioned by their LSN (the tombstones after them change nothing).
    assert {d: (states[d].deleted, states[d].version) for d in ("2", "3")} == {
        "2": (True, 140), "3": (True, 156)}


@pytest.mark.slow
def test_dlq_replay_decides_with_the_current_registry_settings(
        broker: LocalBroker, registry: SchemaRegistryServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Avro messages dead-lettered while no registry was configured: replay leaves them
    while there is none, stops with exit status 2 while it is down, and would resubmit
    them all once it answers."""
    topic = unique("avro.customers")
    bootstrap = broker.bootstrap_servers
    group = unique("dlq")
    create_topic(bootstrap, topic, partitions=1)
    create_topic(bootstrap, f"{group}.{topic}.dlq", partitions=1)
    messages = avro_messages(registry, topic)
    produce_one_per_batch(bootstrap, f"{group}.{topic}.dlq", messages, headers=[
        [(REASON_HEADER, b"no_schema_registry"), (SOURCE_TOPIC_HEADER, topic.encode()),
         (SOURCE_PARTITION_HEADER, b"0"), (SOURCE_OFFSET_HEADER, str(i).encode())]
        for i in range(len(messages))])
    config = {"kafka": {"bootstrap_servers": bootstrap, "topics": [topic],
                        "group_id": group},
              "source": CUSTOMERS.model_dump(mode="json"), "metrics": {"enabled": False}}
    unconfigured = replay_dead_letters(Settings(**config), dry_run=True, timeout_s=10)
    # Tombstones too: their keys are framed.
    assert unconfigured.resubmitted == 0
    assert dict(unconfigured.still_failing) == {"no_schema_registry": len(messages)}
    config["kafka"]["schema_registry"] = {"url": registry.url, "timeout_s": 1}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    registry.outage(True)
    assert main(["dlq", "replay", "--dry-run", "--config", str(path)]) == 2
    assert "Schema Registry" in capsys.readouterr().err
    registry.outage(False)
    assert main(["dlq", "replay", "--dry-run", "--config", str(path)]) == 0
    assert capsys.readouterr().out.strip() == \
        f"dry run: would resubmit {len(messages)}, still failing 0"
