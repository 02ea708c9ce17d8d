"""``embed.provider: openai`` end to end: the consumer (dead letters for refused texts,
backpressure through an outage) and the bulk rebuild under a 429 storm, against the
real HTTP server of :mod:`embedstream.stream.app.embedding_server` and the real broker
and store."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.embedding_server import EmbeddingServer
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import before_deadline, create_topic, produce, read_all, run_until, unique
from .test_faults import docs, native, sample, stored_docs
from .test_rebuild import SCIFACT

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture()
def api(embedding_server: EmbeddingServer) -> Iterator[EmbeddingServer]:
    """The session's embeddings API (conftest), reset."""
    embedding_server.reset()
    yield embedding_server
    embedding_server.reset()


def remote_embed(api: EmbeddingServer, **overrides: Any) -> dict[str, Any]:
    return {"provider": "openai", "model": MODEL, "api_base": api.url, "max_wait_ms": 20,
            "backoff_initial_s": 0.05, **overrides}


def vectors_are_the_models(points: list[Any], minilm: Any) -> float:
    """The smallest cosine between a stored vector and the local model's for its text."""
    fresh = minilm.embed([str(p.payload["text"]) for p in points])
    return float(np.sum(fresh * np.asarray([p.vector for p in points], np.float32), axis=1).min())


@pytest.mark.slow
def test_the_stream_dead_letters_refused_texts_and_waits_out_an_outage(
        broker: LocalBroker, api: EmbeddingServer, tmp_path: Path, minilm: Any) -> None:
    api.reset()
    api.reject_marker = "REFUSED"
    topic, group = unique("remote"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": group, "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        embed=remote_embed(api, give_up_after_s=1.0, backoff_max_s=0.3),
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 200},
        metrics={"enabled": False})
    metrics = Metrics()
    pipeline = build_pipeline(settings, metrics=metrics)
    stream = build_consumer(pipeline, metrics)
    try:
        refused = native("d5", "This text is REFUSED by the provider every time.", 1)
        produce(broker.bootstrap_servers, topic, [*docs(range(5)), refused, *docs(range(6, 12))])
        run_until(stream, lambda: sum(stream.committed.values()) >= 12, 60, "the first docs")
        assert set(stored_docs(pipeline.sink, 12)) == {f"d{i}" for i in range(12)} - {"d5"}
        [dead] = read_all(broker.bootstrap_servers, settings.kafka.dlq_topic_for(topic), 1)
        headers = dict(dead.headers())
        assert headers["embedstream.error.reason"] == b"embed_rejected"
        assert (dead.key(), dead.value()) == refused

        # An outage: 503s past give_up_after_s. The consumer pauses, commits nothing
        # and dead-letters nothing; when the API is back, everything is applied.
        api.fail_next(503, count=10_000)
        produce(broker.bootstrap_servers, topic, docs(range(12, 16)))
        # Stepped, not run(): leaving run() retries the batch for a while first.
        paused = before_deadline(
            lambda: sample(metrics, "embedstream_paused_partitions") >= 1, 30, "a pause")
        while not paused():
            stream.step()
        paused_at = dict(stream.committed)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            stream.step()
        assert stream.committed == paused_at and sum(paused_at.values()) == 12
        api.reset()
        run_until(stream, lambda: sum(stream.committed.values()) >= 16, 60,
                  "the recovery after the outage")
        assert set(stored_docs(pipeline.sink, 16)) == {f"d{i}" for i in range(16)} - {"d5"}
        assert sample(metrics, "embedstream_dlq_records_total", reason="embed_rejected",
                      route="default") == 1
        assert sample(metrics, "embedstream_embed_requests_total", outcome="unavailable") >= 2
        assert vectors_are_the_models(list(pipeline.sink.points()), minilm) >= 0.999
    finally:
        stream.close()
        pipeline.close()


@pytest.mark.slow
def test_a_rebuild_under_a_429_storm_slows_to_the_limit_and_writes_every_vector(
        api: EmbeddingServer, tmp_path: Path, minilm: Any) -> None:
    limit_per_s = 4.0
    api.reset()
    api.reject_marker = "REFUSED-BY-PROVIDER"
    with SCIFACT.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(60), handle, strict=False)]
    for row in rows:  # short texts, quick to embed: the limit, not the model, sets the pace
        row["text"] = row["text"][:300]
    rows[7]["text"] += " REFUSED-BY-PROVIDER"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = Settings(
        source={"id_fields": ["_id"], "text_fields": ["title", "text"]},
        embed=remote_embed(api, request_max_inputs=4, max_concurrency=4),
        sink={"path": str(tmp_path / "store"), "collection": "docs"},
        metrics={"enabled": False}, bulk={"state_dir": str(tmp_path / "state")})
    metrics = Metrics()
    api.rate_limit(limit_per_s)  # the server's limit; the client sends 4 at a time
    started = time.monotonic()
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False),
                     metrics=metrics)
    elapsed = time.monotonic() - started

    served = sorted(entry.at for entry in api.log if entry.status == 200)
    throttled = api.count(429)
    assert throttled > 0 and sample(metrics, "embedstream_embed_retries_total") >= throttled
    # Slowed to the limit: the served rate stays at it, and the retries did not
    # swamp the server (the Retry-After holds every request back, not just one).
    assert (len(served) - 1) / (served[-1] - served[0]) <= limit_per_s * 1.1
    assert throttled <= 2 * len(served)
    assert elapsed >= (len(served) - 1) / limit_per_s * 0.9
    # Every record but the refused one is written; it is in the failure list.
    assert report.records == 60 and report.documents == 59 and report.failures == 1
    [failure] = [json.loads(line) for line in
                  Path(str(report.failures_file)).read_text().splitlines()]
    assert failure["reason"] == "embed_rejected" and failure["doc_id"] == str(rows[7]["_id"])
    pipeline = build_pipeline(Settings(
        source=settings.source, embed=remote_embed(api), sink=settings.sink,
        metrics={"enabled": False}))
    try:
        points = list(pipeline.sink.points())
        assert len(points) == report.chunks
        assert {p.payload["doc_id"] for p in points} == \
            {str(r["_id"]) for r in rows} - {str(rows[7]["_id"])}
        assert vectors_are_the_models(points, minilm) >= 0.999
    finally:
        pipeline.close()
    print(f"rebuild under a 429 storm: {len(served)} requests served, {throttled} answered 429,"
          f" {elapsed:.1f}s")
