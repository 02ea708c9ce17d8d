"""Micro-batches that follow the load (``embed.batching``), against the real broker.

Adaptive: a lone event goes as soon as it is read, not ``max_wait_ms`` later; a
backlog still fills batches to their token budget. Fixed: a lone event waits for
the deadline (the behaviour adaptive replaces, kept for comparison).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.events import ChangeEvent
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique

pytestmark = pytest.mark.slow  # the real broker

WAIT_MS = 3000


def settings_for(broker: LocalBroker, topic: str, store: Path, model: Path,
                 batching: str, poll_max_messages: int = 1000) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000},
               "poll_max_messages": poll_max_messages},
        source={"format": "native"},
        embed={"model": str(model), "backend": "torch", "precision": "fp32",
               "batching": batching, "max_wait_ms": WAIT_MS},
        sink={"path": str(store), "collection": "docs", "flush_interval_ms": 200},
        metrics={"enabled": False})


def event(i: int) -> tuple[bytes, bytes]:
    return f"d{i}".encode(), json.dumps(
        {"id": f"d{i}", "text": f"Document {i} tells of subject {i * 7 % 31}.",
         "version": 1}).encode()


# poll_max_messages 1: every poll is "full", so only an empty poll can tell that
# nothing more was fetched (the consumer makes it without waiting while a batch is open).
@pytest.mark.parametrize(("batching", "poll_max_messages"),
                         [("adaptive", 1000), ("adaptive", 1), ("fixed", 1000)])
def test_a_lone_event_waits_for_the_deadline_only_when_batching_is_fixed(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path, batching: str,
        poll_max_messages: int) -> None:
    topic = unique("lone")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    pipeline = build_pipeline(settings_for(broker, topic, tmp_path / "store",
                                           tiny_model_dir, batching, poll_max_messages))
    applied_at: dict[str, float] = {}

    def on_applied(events: Sequence[ChangeEvent], acked_at: float) -> None:
        applied_at.update({e.doc_id: time.monotonic() for e in events})

    stream = build_consumer(pipeline, Metrics(), on_applied=on_applied)
    try:
        run_until(stream, lambda: bool(stream.assigned), 60)
        produce(broker.bootstrap_servers, topic, [event(0)])  # a warm-up: group and model
        run_until(stream, lambda: "d0" in applied_at, 30)
        sent = time.monotonic()
        produce(broker.bootstrap_servers, topic, [event(1)])
        run_until(stream, lambda: "d1" in applied_at, 30)
    finally:
        stream.close()
        pipeline.close()
    waited = applied_at["d1"] - sent
    if batching == "adaptive":
        # ~0.01-0.03 s here; an idle poll (0.5 s) must not be what closes the batch.
        assert waited < 0.25, f"adaptive: a lone event waited {waited:.2f} s"
    else:
        assert waited >= 0.9 * WAIT_MS / 1000, f"fixed: applied after {waited:.2f} s"


@pytest.mark.parametrize("poll_max_messages", [1000, 1])
def test_a_backlog_still_fills_batches_under_adaptive_batching(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path,
        poll_max_messages: int) -> None:
    topic, count = unique("backlog"), 300
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    produce(broker.bootstrap_servers, topic, [event(i) for i in range(count)])
    pipeline = build_pipeline(settings_for(broker, topic, tmp_path / "store",
                                           tiny_model_dir, "adaptive", poll_max_messages))
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)
    try:
        run_until(stream, lambda: stream.committed.get((topic, 0), 0) >= count, 90)
    finally:
        stream.close()
        pipeline.close()
    sample = metrics.registry.get_sample_value
    batches = sample("embedstream_batch_events_count") or 0.0
    events = sample("embedstream_batch_events_sum") or 0.0
    assert events == count
    # Read faster than it is embedded, the backlog goes in large batches, not one by one.
    assert batches <= count / 10, f"{batches:.0f} batches for {count} events"
