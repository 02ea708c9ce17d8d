"""Hundreds of malformed messages through the real broker and consumer: the
loop never dies, every bad record lands in the DLQ with the reason decoding
gives it, and every good record around them is applied."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.decode import decode_message
from embedstream.stream.errors import DecodeError
from embedstream.stream.events import ChangeEvent, Position
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, read_all, run_until, unique

DEBEZIUM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "debezium"


def good(doc: str, lsn: int) -> tuple[bytes, bytes]:
    return (json.dumps({"id": doc}).encode(), json.dumps({
        "before": None, "after": {"id": doc, "text": f"Document {doc} at {lsn}."}, "op": "c",
        "source": {"lsn": lsn, "ts_ms": 1_700_000_000_000}, "ts_ms": 1_700_000_000_000,
    }).encode())


def mutations(rng: random.Random, n: int) -> list[tuple[bytes | None, bytes]]:
    """Malformed variants of real and generated Debezium events."""
    real = [json.loads(p.read_text()) for p in sorted(DEBEZIUM.glob("*.json"))]
    wrong_values: list[Any] = [None, 0, -1, 1.5, "x", "", [], {}, [1, 2], True, "\ud800",
                               {"$oid": 5}, "9" * 400]
    out: list[tuple[bytes | None, bytes]] = []
    for i in range(n):
        doc = f"bad{i}"
        _, value = good(doc, 10 + i)
        event = json.loads(value)
        kind = i % 8
        if kind == 0:  # truncated JSON
            raw = value[: rng.randrange(1, len(value) - 1)]
        elif kind == 1:  # random bytes, often not UTF-8
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif kind == 2:  # a wrong type somewhere in the envelope
            path = rng.choice([("op",), ("after",), ("source",), ("source", "lsn"),
                               ("after", "id"), ("after", "text")])
            target = event
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = rng.choice(wrong_values)
            raw = json.dumps(event).encode()
        elif kind == 3:  # unknown op
            event["op"] = rng.choice(["x", "C", "upsert", "dd", "💥"])
            raw = json.dumps(event).encode()
        elif kind == 4:  # deeply nested
            depth = rng.randrange(500, 20_000)
            raw = b'{"op": "c", "after": ' + b"[" * depth + b"]" * depth + b"}"
        elif kind == 5:  # a real sample with its id removed
            sample = json.loads(json.dumps(rng.choice(real)))
            payload = sample.get("payload", sample)
            for side in ("before", "after"):
                if isinstance(payload.get(side), dict):
                    payload[side].pop("id", None)
            out.append((None, json.dumps(sample).encode()))
            continue
        elif kind == 6:  # not an object at all
            raw = json.dumps(rng.choice([[1, 2, 3], "a string", 42, None, [event]])).encode()
        else:  # a huge number, NaN, or a duplicate key fight
            raw = rng.choice([value.replace(b'"lsn": ' + str(10 + i).encode(), b'"lsn": 1e999'),
                              value.replace(b'"lsn": ' + str(10 + i).encode(), b'"lsn": NaN'),
                              b'{"op": "c", "op": 7, "after": {"id": 1}}'])
        out.append((json.dumps({"id": doc}).encode(), raw))
    return out


@pytest.mark.slow
def test_a_stream_of_malformed_messages_is_dead_lettered_and_never_stops_the_loop(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    rng = random.Random(2026)
    bad = mutations(rng, 320)
    goods = [good(f"g{i}", 1000 + i) for i in range(40)]
    messages: list[tuple[bytes | None, bytes | None]] = [*bad, *goods]
    rng.shuffle(messages)
    topic = unique("junk")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "debezium", "id_fields": ["id"], "text_fields": ["text"]},
        embed={"model": str(tiny_model_dir)},
        sink={"path": str(tmp_path / "store"), "collection": "docs"},
        metrics={"enabled": False},
    )
    # The oracle: what decoding alone says of each message.
    expected_reasons: dict[int, str] = {}
    live: set[str] = set()
    for offset, (key, value) in enumerate(messages):
        try:
            decoded = decode_message(key, value, Position(topic, 0, offset), settings.source)
        except DecodeError as error:
            expected_reasons[offset] = error.reason
            continue
        if isinstance(decoded, ChangeEvent):
            live.add(decoded.doc_id)
    assert len(expected_reasons) >= 250, "most mutations must really be malformed"

    produce(broker.bootstrap_servers, topic, messages)
    pipeline = build_pipeline(settings)
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)
    try:
        run_until(stream, lambda: sum(stream.committed.values()) >= len(messages), 90,
                  f"all {len(messages)} messages to be committed")
        stored = pipeline.sink.document_states(sorted(live | {f"g{i}" for i in range(40)}))
    finally:
        stream.close()
        pipeline.close()

    assert {f"g{i}" for i in range(40)} <= set(stored)
    dead = read_all(broker.bootstrap_servers, settings.kafka.dlq_topic_for(topic),
                    len(expected_reasons))
    got = {int(dict(d.headers())["embedstream.source.offset"]):
           dict(d.headers())["embedstream.error.reason"].decode() for d in dead}
    assert got == expected_reasons
    for offset, record in ((int(dict(d.headers())["embedstream.source.offset"]), d)
                           for d in dead):
        assert (record.key(), record.value()) == messages[offset], "original bytes kept"
    counted = sum(metrics.registry.get_sample_value(
        "embedstream_dlq_records_total", {"reason": r, "route": "default"}) or 0
        for r in set(got.values()))
    assert counted == len(expected_reasons)
