"""Retrieval benchmark: BEIR SciFact nDCG@10 through embedstream's chunks.

The corpus (``corpus.jsonl``: ``_id``, ``title``, ``text``) is indexed with the real
pipeline from :func:`embedstream.stream.app.service.build_pipeline` (default settings: chunker with
``chunk.max_tokens`` 256 capped to the model's 254, all-MiniLM-L6-v2 on the CPU, a
Qdrant Edge store in a temporary directory). A document's text follows the stream's
convention for several text fields: ``"\\n\\n".join`` of the non-empty title and text.
Its chunks are embedded with the pipeline's embedder and written through the sink with
:func:`embedstream.stream.plan.build_write`, as the consumer writes them (Kafka is left out: it
changes nothing about what is stored).

Search: each test query (``qrels/test.tsv``, 300 queries) is embedded with the same
embedder and sent to the sink's ``search`` for the ``--hits`` (100) nearest chunks; a
document scores its best chunk, and documents are ranked by that score. ``exact_ndcg_at_10``
repeats the ranking with an exact numpy search over all the vectors read back from the
store (``sink.points()``), to show what the store's approximate search costs, if anything.

Reference, same run: stock ``SentenceTransformer.encode`` (normalised) on whole documents
as BEIR feeds them (``title + " " + text``, truncated by the model at 256 tokens), exact
cosine search. nDCG@10 is computed as pytrec_eval/BEIR do: gain = qrels score, ideal DCG
from the judged documents. The last stdout line is one JSON object; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.service import Pipeline, build_pipeline
from embedstream.stream.config import MetricsSettings, Settings, SinkSettings, SourceSettings
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.plan import PreparedEvent, build_write, fold

from _common import SHARED_DATA, log, machine, stock_model

DEFAULT_DATA = SHARED_DATA / "beir" / "scifact"
DOCS_PER_WRITE = 500

Ranking = dict[str, float]  # doc id -> score


def load(data: Path) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, dict[str, int]]]:
    """Corpus rows, test queries by id, and test qrels (query -> doc -> score > 0)."""
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open() if line.strip()]
    qrels: dict[str, dict[str, int]] = {}
    for line in (data / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        query, doc, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(query, {})[doc] = int(score)
    queries = {}
    for line in (data / "queries.jsonl").open():
        row = json.loads(line)
        if row["_id"] in qrels:
            queries[row["_id"]] = row["text"]
    return corpus, queries, qrels


def ndcg_at_10(rankings: Mapping[str, Ranking], qrels: Mapping[str, Mapping[str, int]]) -> float:
    total = 0.0
    for query, judged in qrels.items():
        ranked = sorted(rankings.get(query, {}).items(), key=lambda item: -item[1])[:10]
        dcg = sum(judged.get(doc, 0) / math.log2(i + 2) for i, (doc, _) in enumerate(ranked))
        ideal = sorted(judged.values(), reverse=True)[:10]
        total += dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return total / len(qrels)


def best_chunk(doc_ids: Sequence[str], scores: Sequence[float]) -> Ranking:
    """Document score = its best chunk's score."""
    ranking: Ranking = {}
    for doc, score in zip(doc_ids, scores, strict=True):
        if score > ranking.get(doc, -math.inf):
            ranking[doc] = float(score)
    return ranking


def index(pipeline: Pipeline, corpus: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Chunk, embed and write every document; returns counts."""
    chunks = tokens = 0
    for first in range(0, len(corpus), DOCS_PER_WRITE):
        prepared = []
        for offset, row in enumerate(corpus[first:first + DOCS_PER_WRITE], first):
            text = "\n\n".join(p for p in (row.get("title"), row.get("text")) if p and p.strip())
            event = ChangeEvent(str(row["_id"]), Op.UPSERT, 1, Position("scifact", 0, offset),
                                text=text, kind="create")
            prepared.append(PreparedEvent(event, pipeline.chunker.chunk(text)))
        texts = {c.content_hash: c.text for p in prepared for c in p.chunks}
        vectors = dict(zip(texts, pipeline.embedder.embed(list(texts.values())), strict=True))
        pipeline.sink.apply([build_write(fold(None, [p]), vectors) for p in prepared])
        chunks += sum(len(p.chunks) for p in prepared)
        tokens += sum(p.n_tokens for p in prepared)
        log(f"indexed {first + len(prepared)}/{len(corpus)} docs, {chunks} chunks")
    return {"chunks": chunks, "chunk_tokens": tokens}


def exact(matrix: npt.NDArray[np.float32], doc_ids: Sequence[str], ids: Sequence[str],
          queries: npt.NDArray[np.float32]) -> dict[str, Ranking]:
    scores = queries @ matrix.T
    return {q: best_chunk(doc_ids, row) for q, row in zip(ids, scores, strict=True)}


def stock_rankings(corpus: Sequence[dict[str, Any]], ids: Sequence[str],
                   texts: Sequence[str]) -> dict[str, Ranking]:
    model = stock_model()
    docs = [(str(r.get("title") or "") + " " + str(r.get("text") or "")).strip() for r in corpus]
    # batch_size 8 (x 256 tokens) only for speed on CPU (see embedstream.stream.embedding);
    # same vectors.
    matrix = model.encode(docs, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    queries = model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True)
    return exact(matrix, [str(r["_id"]) for r in corpus], ids, queries)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR scifact folder")
    parser.add_argument("--hits", type=int, default=100, help="chunks fetched per query")
    parser.add_argument("--limit", type=int, default=None, help="first N docs (smoke test)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock reference")
    parser.add_argument("--rebuild", action="store_true",
                        help="index with `embedstream rebuild` (bulk engine, bf16 where it "
                             "calibrates) instead of the stream's write path")
    args = parser.parse_args(argv)
    if args.rebuild and args.limit:
        parser.error("--rebuild reads the whole corpus file; drop --limit")
    corpus, queries, qrels = load(args.data)
    corpus = corpus[:args.limit]
    ids, texts = list(queries), list(queries.values())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(
            source=SourceSettings(id_fields=("_id",), text_fields=("title", "text")),
            sink=SinkSettings(kind="qdrant-edge", path=Path(scratch) / "store",
                              collection="scifact"),
            metrics=MetricsSettings(enabled=False),
        )
        if args.rebuild:
            report = rebuild(settings, RebuildOptions(source=str(args.data / "corpus.jsonl"),
                                                      handover=False))
            counts = {"chunks": report.chunks, "chunk_tokens": report.tokens}
        # Opened through the alias the rebuild moved: its fingerprint must match the stream's.
        pipeline = build_pipeline(settings)
        try:
            if not args.rebuild:
                counts = index(pipeline, corpus)
            indexed_s = time.perf_counter() - started
            query_vectors = pipeline.embedder.embed(texts)
            store: dict[str, Ranking] = {}
            for query, vector in zip(ids, query_vectors, strict=True):
                hits = pipeline.sink.search(vector.tolist(), args.hits)
                store[query] = best_chunk([str(h.payload["doc_id"]) for h in hits],
                                          [h.score for h in hits])
            points = list(pipeline.sink.points())
            matrix = np.asarray([p.vector for p in points], np.float32)
            exhaustive = exact(matrix, [str(p.payload["doc_id"]) for p in points], ids,
                               query_vectors)
            spec = pipeline.chunker.spec
        finally:
            pipeline.close()
    result: dict[str, Any] = {
        "ndcg_at_10": round(ndcg_at_10(store, qrels), 4),
        "exact_ndcg_at_10": round(ndcg_at_10(exhaustive, qrels), 4),
    }
    log(f"chunked: {result} after {time.perf_counter() - started:.0f}s")
    stock_s = None
    if not args.no_stock:
        stock_started = time.perf_counter()
        result["stock_ndcg_at_10"] = round(ndcg_at_10(stock_rankings(corpus, ids, texts), qrels), 4)
        stock_s = round(time.perf_counter() - stock_started, 1)
    result.update({
        "docs": len(corpus), "chunks": counts["chunks"], "queries": len(ids),
        "mean_chunk_tokens": round(counts["chunk_tokens"] / max(1, counts["chunks"]), 1),
        "search": f"sink.search top {args.hits} chunks, doc = best chunk",
        "chunker": spec, "index_s": round(indexed_s, 1), "stock_s": stock_s,
        "indexed_by": "rebuild" if args.rebuild else "stream write path",
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": machine(),
    })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
