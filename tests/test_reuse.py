"""Embed only what changed: unchanged chunk texts reuse their stored vectors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import Pipeline, build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique

PARAGRAPHS = [
    f"Section {i}. " + " ".join(f"Sentence {j} of section {i} talks about subject {i * 7 + j}."
                                for j in range(12))
    for i in range(10)
]


def native(doc_id: str, paragraphs: list[str], version: int) -> tuple[bytes, bytes]:
    text = "\n\n".join(paragraphs)
    return doc_id.encode(), json.dumps({"id": doc_id, "text": text, "version": version}).encode()


def counter(metrics: Metrics, name: str, outcome: str) -> float:
    return metrics.registry.get_sample_value(name, {"outcome": outcome}) or 0.0


class Run:
    def __init__(self, broker: LocalBroker, pipeline: Pipeline, topic: str) -> None:
        self.broker, self.pipeline, self.topic = broker, pipeline, topic
        self.metrics = Metrics()
        self.stream = build_consumer(pipeline, self.metrics)
        self.sent = 0

    def send(self, *messages: tuple[bytes, bytes]) -> dict[str, float]:
        before = {o: counter(self.metrics, "embedstream_chunks_total", o)
                  for o in ("embedded", "reused")}
        produce(self.broker.bootstrap_servers, self.topic, messages)
        self.sent += len(messages)
        run_until(self.stream, lambda: sum(self.stream.committed.values()) >= self.sent, 60,
                  f"{self.sent} messages to be committed")
        return {o: counter(self.metrics, "embedstream_chunks_total", o) - before[o]
                for o in before}


@pytest.fixture()
def run(broker: LocalBroker, tmp_path: Any) -> Any:
    topic = unique("reuse")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "native"}, chunk={"max_tokens": 64},
        sink={"kind": "qdrant-edge", "path": str(tmp_path / "store"), "collection": "docs"},
        metrics={"enabled": False},
    )
    pipeline = build_pipeline(settings)
    runner = Run(broker, pipeline, topic)
    yield runner
    runner.stream.close()
    pipeline.close()


def assert_vectors_match_texts(pipeline: Pipeline) -> None:
    points = list(pipeline.sink.points())
    fresh = pipeline.embedder.embed([str(p.payload["text"]) for p in points])
    stored = np.asarray([p.vector for p in points], np.float32)
    assert np.min(np.sum(fresh * stored, axis=1)) >= 0.999


@pytest.mark.slow
def test_an_edit_embeds_only_its_neighbourhood(run: Run) -> None:
    first = run.send(native("doc", PARAGRAPHS, 1))
    assert first["reused"] == 0 and first["embedded"] >= 10
    edited = PARAGRAPHS.copy()
    edited[5] = "Section 5 was rewritten. It now says something else entirely about otters."
    second = run.send(native("doc", edited, 2))
    assert 1 <= second["embedded"] <= 3, second
    # Everything but the rewritten section's neighbourhood comes back from the store.
    assert second["reused"] / (second["reused"] + second["embedded"]) >= 0.9, second
    assert_vectors_match_texts(run.pipeline)


@pytest.mark.slow
def test_reordered_chunks_reuse_vectors_and_keep_them_with_their_texts(run: Run) -> None:
    run.send(native("doc", PARAGRAPHS, 1))
    swapped = run.send(native("doc", PARAGRAPHS[5:] + PARAGRAPHS[:5], 2))
    assert swapped["embedded"] <= 2, swapped
    assert_vectors_match_texts(run.pipeline)


@pytest.mark.slow
def test_identical_chunks_in_one_batch_are_embedded_once(run: Run) -> None:
    boilerplate = "This page is part of the handbook. Edits are reviewed weekly."
    docs = [native(f"d{i}", [boilerplate, f"Page {i} is about animal number {i}."], 1)
            for i in range(5)]
    outcome = run.send(*docs)
    points = list(run.pipeline.sink.points())
    shared = [p for p in points if boilerplate in str(p.payload["text"])]
    assert len(shared) == 5
    assert outcome["embedded"] + outcome["reused"] == len(points)
    assert outcome["embedded"] == len({str(p.payload["text"]) for p in points})
    assert_vectors_match_texts(run.pipeline)
