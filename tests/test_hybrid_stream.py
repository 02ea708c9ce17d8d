"""Stream = rebuild for hybrid and sparse search.

A corpus of real SciFact abstracts goes through the consumer (the real broker and an
Edge store, document BM25 vectors on) as a stream of 1,000+ Debezium events: creates,
edits that change only a few words, deletes (with tombstones) and re-creates. A fresh
``rebuild`` of the final corpus must then answer ``search --mode hybrid`` and
``--mode sparse`` with the same documents in the same order, scores within 1e-4: no
stale term weight after an edit, no ghost after a delete. The dense side uses a tiny
random model in fp32 (its vectors mean nothing, but are the same in both stores).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.devdata import revision_events
from embedstream.stream.app.query_jobs import QueryJob, search_jobs
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.filters import Filter
from embedstream.stream.metrics import Metrics

from .streamkit import DATA, create_topic, produce, run_until, unique

SCIFACT = DATA / "beir" / "scifact"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SCIFACT.is_dir(), reason="needs ../shared/data/beir/scifact"),
]
DOCS = 220
K = 10


def settings(tmp: Path, store: str, model: Path, broker: LocalBroker | None = None,
             topic: str = "unused") -> Settings:
    return Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers if broker else "127.0.0.1:1",
               "topics": [topic], "group_id": unique("hybrid"),
               "options": {"session.timeout.ms": 6000}},
        source={"format": "debezium", "id_fields": ["id"], "text_fields": ["text"]},
        embed={"model": str(model), "backend": "torch", "precision": "fp32"},
        sink={"kind": "qdrant-edge", "path": str(tmp / store), "collection": "docs"},
        retrieval={"sparse": "bm25"},
        metrics={"enabled": False},
    )


def history(seed: int = 11) -> tuple[list[dict[str, Any]], dict[str, str], list[str]]:
    """Revision rows for the stream, the final live corpus, and words that were edited
    in or out (queries that would expose a stale weight)."""
    rng = random.Random(seed)
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as handle:
        corpus = [json.loads(line) for _, line in zip(range(DOCS), handle, strict=False)]
    texts = {str(row["_id"]): f"{row['title']}\n\n{row['text']}" for row in corpus}
    vocabulary = sorted({w for t in texts.values() for w in t.split() if w.isalpha()})
    rows: list[dict[str, Any]] = []
    live: dict[str, str] = {}
    touched: list[str] = []

    def emit(doc_id: str, text: str | None) -> None:
        rows.append({"doc_id": doc_id, "text": text, "deleted": text is None,
                     "committed_at": f"2026-01-01T00:00:{len(rows) % 60:02d}Z"})
        if text is None:
            live.pop(doc_id, None)
        else:
            live[doc_id] = text

    for doc_id, text in texts.items():
        emit(doc_id, text)
    deleted: list[str] = []
    while len(rows) < 1_050:
        roll = rng.random()
        if roll < 0.06 and len(live) > DOCS // 2:
            doc_id = rng.choice(sorted(live))
            deleted.append(doc_id)
            touched += live[doc_id].split()[:2]
            emit(doc_id, None)
        elif roll < 0.09 and deleted:
            doc_id = deleted.pop(rng.randrange(len(deleted)))
            emit(doc_id, texts[doc_id])
        else:  # a small edit: one to three words swapped for others of the corpus
            doc_id = rng.choice(sorted(live))
            words = live[doc_id].split(" ")
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(words))
                new = rng.choice(vocabulary)
                touched += [words[at], new]
                words[at] = new
            emit(doc_id, " ".join(words))
    return rows, live, touched


def answers(settings: Settings, queries: list[str], mode: str) -> list[list[tuple[str, float]]]:
    pipeline = build_pipeline(settings)
    try:
        jobs = [QueryJob(i, q, Filter()) for i, q in enumerate(queries)]
        return [[(str(h.payload["doc_id"]), h.score) for h in hits]
                for _, hits in search_jobs(pipeline.embedder, pipeline.sink, jobs, K, mode,
                                           pipeline.sparse, settings.retrieval)]
    finally:
        pipeline.close()


def test_hybrid_and_sparse_search_after_a_stream_equal_a_fresh_rebuild(
        tmp_path: Path, broker: LocalBroker, tiny_model_dir: Path) -> None:
    rows, live, touched = history()
    messages = [(m.key, m.value) for m in revision_events(rows)]
    assert len(messages) >= 1_000
    topic = unique("hybrid")
    create_topic(broker.bootstrap_servers, topic, 2)
    ends = produce(broker.bootstrap_servers, topic, messages)
    streamed = settings(tmp_path, "stream", tiny_model_dir, broker, topic)
    pipeline = build_pipeline(streamed)
    try:
        consumer = build_consumer(pipeline, Metrics())
        try:
            run_until(consumer, lambda: sum(consumer.committed.values()) >= sum(ends.values()),
                      120, "every event committed")
        finally:
            consumer.close()
    finally:
        pipeline.close()

    corpus = tmp_path / "final.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": t}) + "\n"
                              for d, t in sorted(live.items())))
    rebuilt = settings(tmp_path, "rebuilt", tiny_model_dir)
    report = rebuild(rebuilt, RebuildOptions(source=str(corpus), handover=False))
    assert report.documents == len(live) and report.failures == 0

    rng = random.Random(5)
    queries = [q for q in (json.loads(line)["text"] for line in
                           (SCIFACT / "queries.jsonl").open(encoding="utf-8"))][:40]
    queries += [" ".join(rng.sample(touched, 3)) for _ in range(40)]
    for mode in ("sparse", "hybrid"):
        want, got = answers(rebuilt, queries, mode), answers(streamed, queries, mode)
        for query, expected, actual in zip(queries, want, got, strict=True):
            assert [d for d, _ in actual] == [d for d, _ in expected], (mode, query)
            assert [s for _, s in actual] == pytest.approx([s for _, s in expected],
                                                           abs=1e-4), (mode, query)
        assert sum(len(a) for a in got) > len(queries) * 3  # the queries find documents
        deleted = {r["doc_id"] for r in rows} - set(live)
        assert not {d for hits in got for d, _ in hits} & deleted  # no ghost
