"""Size limits: a message or document over its limit is a counted dead letter,
never a crash, and a dead-letter value over its cap is cut, saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, read_all, run_until, unique


def native(doc: str, text: str) -> tuple[bytes, bytes]:
    return doc.encode(), json.dumps({"id": doc, "text": text, "version": 1}).encode()


@pytest.mark.slow
def test_oversized_messages_and_documents_are_dead_lettered_and_the_stream_goes_on(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    topic = unique("limits")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000},
               "dlq_max_value_bytes": 1000},
        source={"format": "native", "max_message_bytes": 5000, "max_document_chars": 2000},
        embed={"model": str(tiny_model_dir)},
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 0},
        metrics={"enabled": False},
    )
    sentence = "Otters hold hands while they sleep. "
    huge_message = native("huge", sentence * 200)  # ~7 kB: over the message limit
    long_document = native("long", sentence * 60)  # ~2.2k chars in ~2.2 kB: over the document limit
    messages = [native("a", sentence), huge_message, long_document, native("b", sentence * 50)]
    produce(broker.bootstrap_servers, topic, messages)
    pipeline = build_pipeline(settings)
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)
    try:
        run_until(stream, lambda: sum(stream.committed.values()) >= len(messages), 60,
                  f"all {len(messages)} messages to be committed")
        stored = pipeline.sink.document_states(["a", "b", "huge", "long"])
    finally:
        stream.close()
        pipeline.close()

    assert set(stored) == {"a", "b"}, "the documents within the limits are applied"
    dead = {d.key(): d for d in read_all(broker.bootstrap_servers,
                                         settings.kafka.dlq_topic_for(topic), 2)}
    assert set(dead) == {b"huge", b"long"}
    huge, long_ = dict(dead[b"huge"].headers()), dict(dead[b"long"].headers())
    assert huge["embedstream.error.reason"] == b"message_too_large"
    assert long_["embedstream.error.reason"] == b"document_too_large"
    # Cut to the cap, with the original size; the source offset finds the whole message.
    assert huge["embedstream.dlq.truncated"] == str(len(huge_message[1])).encode()
    assert dead[b"huge"].value() == huge_message[1][:1000]
    assert huge["embedstream.source.offset"] == b"1"
    assert "embedstream.dlq.truncated" in long_  # 2.2 kB is over the 1 kB cap too
    assert metrics.registry.get_sample_value("embedstream_dlq_truncated_records_total") == 2
    for reason in ("message_too_large", "document_too_large"):
        assert metrics.registry.get_sample_value(
            "embedstream_dlq_records_total", {"reason": reason, "route": "default"}) == 1
