"""Retrieval benchmark: BEIR SciFact nDCG@10 through embedstream's chunks.

The corpus (``corpus.jsonl``: ``_id``, ``title``, ``text``) is indexed with the real
pipeline from :func:`embedstream.stream.app.service.build_pipeline` (default settings: chunker with
``chunk.max_tokens`` 256 capped to the model's 254, all-MiniLM-L6-v2 on the CPU, a
Qdrant Edge store in a temporary directory). A document's text follows the stream's
convention for several text fields: ``"\\n\\n".join`` of the non-empty title and text.
Its chunks are embedded with the pipeline's embedder and written through the sink with
:func:`embedstream.stream.plan.build_write`, as the consumer writes them (Kafka is left out: it
changes nothing about what is stored).

Search: each test query (``qrels/test.tsv``, 300 queries; ``--split train``: the 809
train queries, for choosing settings) goes through ``embedstream search``'s own path
(:func:`embedstream.stream.app.query_jobs.search_jobs`) in each ``--mode``: ``dense``
(documents by their best chunk), ``sparse`` (by their document BM25 vector,
``retrieval.bm25``) and ``hybrid`` (both fused, ``retrieval.fusion``), all on one
collection written with sparse vectors (``dense_ndcg_at_10``, ``sparse_ndcg_at_10``,
``hybrid_ndcg_at_10``; ``ndcg_at_10`` is the dense one). ``exact_ndcg_at_10`` repeats the
dense ranking with an exact numpy search over all the vectors read back from the store
(``sink.points()``), to show what the store's approximate search costs, if anything.

Two indexes, same chunks, same write and search path, each in its own store: one with
the backend and precision ``--backend``/``--precision`` give (default ``auto``: the one
chosen for this machine, kept from an earlier run or calibrated on the first texts,
inside ``index_s``), and one with torch fp32, the quality guard's reference
(``fp32_*``; skipped when the chosen one is torch fp32, or with ``--no-fp32``).
``ndcg_diff`` and ``exact_ndcg_diff`` are chosen minus fp32 (the goal: within 0.005).

Reference, same run: stock ``SentenceTransformer.encode`` (normalised) on whole documents
as BEIR feeds them (``title + " " + text``, truncated by the model at 256 tokens), exact
cosine search (``--no-stock`` skips it). nDCG@10 is computed as pytrec_eval/BEIR do:
gain = qrels score, ideal DCG from the judged documents. The last stdout line is one
JSON object, with ``backend``, ``precision``, ``cpu_flags``, ``encoder`` and ``machine``;
progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.query_jobs import QueryJob, embed_jobs, search_jobs
from embedstream.stream.app.service import Pipeline, build_pipeline
from embedstream.stream.config import (
    Bm25Settings,
    EmbedSettings,
    MetricsSettings,
    RetrievalSettings,
    Settings,
    SinkSettings,
    SourceSettings,
)
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.filters import Filter
from embedstream.stream.plan import PreparedEvent, build_write, fold
from embedstream.stream.retrieval import MODES

from _common import SHARED_DATA, encoder_info, log, machine, stock_model

DEFAULT_DATA = SHARED_DATA / "beir" / "scifact"
DOCS_PER_WRITE = 500

Ranking = dict[str, float]  # doc id -> score


def load(data: Path, split: str = "test"
         ) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, dict[str, int]]]:
    """Corpus rows, the split's queries by id, and its qrels (query -> doc -> score > 0)."""
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open() if line.strip()]
    qrels: dict[str, dict[str, int]] = {}
    for line in (data / "qrels" / f"{split}.tsv").read_text().splitlines()[1:]:
        query, doc, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(query, {})[doc] = int(score)
    queries = {}
    for line in (data / "queries.jsonl").open():
        row = json.loads(line)
        if row["_id"] in qrels:
            queries[row["_id"]] = row["text"]
    return corpus, queries, qrels


def sampled(corpus: Sequence[dict[str, Any]], qrels: Mapping[str, Mapping[str, int]],
            others: int) -> list[dict[str, Any]]:
    """Every document some test query judges relevant, plus ``others`` of the rest drawn
    at random (seed 0), in corpus order: nDCG is higher than on the whole corpus (fewer
    distractors), but two backends compared on it see the same documents."""
    judged = {doc for docs in qrels.values() for doc in docs}
    rest = [i for i, row in enumerate(corpus) if str(row["_id"]) not in judged]
    keep = set(np.random.default_rng(0).choice(rest, min(others, len(rest)), replace=False))
    return [row for i, row in enumerate(corpus) if str(row["_id"]) in judged or i in keep]


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


def row_text(row: Mapping[str, Any]) -> str:
    """A corpus row's text as the stream takes several text fields: the non-empty title
    and text joined by a blank line."""
    return "\n\n".join(p for p in (row.get("title"), row.get("text")) if p and p.strip())


def index(pipeline: Pipeline, corpus: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Chunk, embed and write every document; returns counts."""
    chunks = tokens = 0
    for first in range(0, len(corpus), DOCS_PER_WRITE):
        prepared = []
        for offset, row in enumerate(corpus[first:first + DOCS_PER_WRITE], first):
            text = row_text(row)
            event = ChangeEvent(str(row["_id"]), Op.UPSERT, 1, Position("scifact", 0, offset),
                                text=text, kind="create")
            prepared.append(PreparedEvent(event, pipeline.chunker.chunk(text)))
        texts = {c.content_hash: c.text for p in prepared for c in p.chunks}
        vectors = dict(zip(texts, pipeline.embedder.embed(list(texts.values())), strict=True))
        pipeline.sink.apply([build_write(fold(None, [p]), vectors, pipeline.sparse)
                             for p in prepared])
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


def run(settings: Settings, args: argparse.Namespace, corpus: Sequence[dict[str, Any]],
        ids: Sequence[str], texts: Sequence[str],
        qrels: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Index the corpus into a fresh store with ``settings`` (the stream's write path, or
    ``rebuild``), then search it: nDCG@10 through the store and exhaustively, the counts,
    the seconds and the encoder it ran on."""
    started = time.perf_counter()
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
        jobs = [QueryJob(query, text, Filter()) for query, text in zip(ids, texts, strict=True)]
        by_mode: dict[str, float] = {}
        extra = [k for k in (args.rrf_k or [])[1:] if "hybrid" in args.modes]
        for mode, retrieval in [*((m, settings.retrieval) for m in args.modes),
                                *((f"hybrid_rrf{k}", settings.retrieval.model_copy(
                                    update={"rrf_k": k})) for k in extra)]:
            found = search_jobs(pipeline.embedder, pipeline.sink, jobs, 10,
                                mode.split("_")[0], pipeline.sparse, retrieval)
            rankings = {str(job.id): {str(h.payload["doc_id"]): h.score for h in hits}
                        for job, hits in found}
            by_mode[mode] = round(ndcg_at_10(rankings, qrels), 4)
        query_vectors = embed_jobs(pipeline.embedder, jobs)
        points = list(pipeline.sink.points())
        matrix = np.asarray([p.vector for p in points], np.float32)
        exhaustive = exact(matrix, [str(p.payload["doc_id"]) for p in points], ids,
                           query_vectors)
        return {"ndcg_at_10": by_mode.get("dense"), "modes": by_mode,
                "exact_ndcg_at_10": round(ndcg_at_10(exhaustive, qrels), 4),
                **counts, "index_s": round(indexed_s, 1), "spec": pipeline.chunker.spec,
                "encoder": encoder_info(pipeline.embedder)}
    finally:
        pipeline.close()


def retrieval_settings(args: argparse.Namespace) -> RetrievalSettings:
    """The ``retrieval`` section: defaults, with what the flags set."""
    bm25 = {name: value for name, value in (("k", args.bm25_k), ("b", args.bm25_b),
                                            ("avg_len", args.bm25_avg_len)) if value is not None}
    tuned = {name: value for name, value in (("fusion", args.fusion),
                                             ("rrf_k", args.rrf_k and args.rrf_k[0]))
             if value is not None}
    return RetrievalSettings(sparse="none" if args.modes == ["dense"] else "bm25",
                             bm25=Bm25Settings(**bm25), **tuned)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR scifact folder")
    parser.add_argument("--mode", default="all", choices=("all", *MODES),
                        help="search mode(s) to score on the one collection (default: all "
                             "three; the collection gets sparse vectors unless only dense)")
    parser.add_argument("--split", default="test", choices=("test", "train"),
                        help="the queries and qrels scored (tune on train, never on test)")
    parser.add_argument("--bm25-k", type=float, default=None, help="retrieval.bm25.k")
    parser.add_argument("--bm25-b", type=float, default=None, help="retrieval.bm25.b")
    parser.add_argument("--bm25-avg-len", type=float, default=None,
                        help="retrieval.bm25.avg_len")
    parser.add_argument("--fusion", default=None, choices=("rrf", "dbsf"))
    parser.add_argument("--rrf-k", type=int, nargs="+", default=None,
                        help="retrieval.rrf_k; more values: hybrid scored again with each "
                             "(hybrid_rrf<K>_ndcg_at_10), on the same collection")
    parser.add_argument("--limit", type=int, default=None, help="first N docs (smoke test)")
    parser.add_argument("--sample", type=int, default=None,
                        help="every judged doc plus N others drawn at random (seed 0): "
                             "a smaller corpus on which every query can still find its docs")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx", "openvino"))
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "fp32", "bf16", "fp16", "int8"))
    parser.add_argument("--no-fp32", action="store_true",
                        help="skip the torch fp32 index (the chosen backend only)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock reference")
    parser.add_argument("--rebuild", action="store_true",
                        help="index with `embedstream rebuild` (bulk engine) instead of the "
                             "stream's write path")
    args = parser.parse_args(argv)
    if args.rebuild and (args.limit or args.sample is not None):
        parser.error("--rebuild reads the whole corpus file; drop --limit and --sample")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.modes = list(MODES) if args.mode == "all" else [args.mode]
    retrieval = retrieval_settings(args)
    corpus, queries, qrels = load(args.data, args.split)
    corpus = corpus[:args.limit]
    if args.sample is not None:
        corpus = sampled(corpus, qrels, args.sample)
    ids, texts = list(queries), list(queries.values())
    started = time.perf_counter()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        def settings(name: str, backend: str, precision: str) -> Settings:
            return Settings(
                source=SourceSettings(id_fields=("_id",), text_fields=("title", "text")),
                embed=EmbedSettings(backend=backend, precision=precision),  # type: ignore[arg-type]
                retrieval=retrieval,
                sink=SinkSettings(kind="qdrant-edge", path=Path(scratch) / name,
                                  collection="scifact"),
                metrics=MetricsSettings(enabled=False),
            )
        runs["chosen"] = run(settings("chosen", args.backend, args.precision), args, corpus,
                             ids, texts, qrels)
        log(f"chosen backend: {runs['chosen']} after {time.perf_counter() - started:.0f}s")
        chosen = runs["chosen"]["encoder"]
        if (chosen["backend"], chosen["precision"]) == ("torch", "fp32"):
            runs["fp32"] = runs["chosen"]  # the same vectors: nothing to compare
        elif not args.no_fp32:
            runs["fp32"] = run(settings("fp32", "torch", "fp32"), args, corpus, ids, texts,
                               qrels)
            log(f"torch fp32: {runs['fp32']} after {time.perf_counter() - started:.0f}s")
    mine = runs["chosen"]
    result: dict[str, Any] = {
        **{f"{mode}_ndcg_at_10": score for mode, score in mine["modes"].items()},
        "ndcg_at_10": mine["ndcg_at_10"], "exact_ndcg_at_10": mine["exact_ndcg_at_10"],
    }
    if "fp32" in runs:
        fp32 = runs["fp32"]
        result.update({
            "fp32_ndcg_at_10": fp32["ndcg_at_10"],
            "fp32_exact_ndcg_at_10": fp32["exact_ndcg_at_10"],
            # chosen minus fp32: negative when the chosen backend retrieves worse.
            "ndcg_diff": round(mine["ndcg_at_10"] - fp32["ndcg_at_10"], 4),
            "exact_ndcg_diff": round(mine["exact_ndcg_at_10"] - fp32["exact_ndcg_at_10"], 4),
            "fp32_index_s": fp32["index_s"],
        })
    result.update({"backend": mine["encoder"]["backend"],
                   "precision": mine["encoder"]["precision"],
                   "variant": mine["encoder"]["variant"],
                   "cpu_flags": mine["encoder"]["cpu_flags"]})
    stock_s = None
    if not args.no_stock:
        stock_started = time.perf_counter()
        result["stock_ndcg_at_10"] = round(ndcg_at_10(stock_rankings(corpus, ids, texts), qrels), 4)
        stock_s = round(time.perf_counter() - stock_started, 1)
    result.update({
        "docs": len(corpus), "chunks": mine["chunks"], "queries": len(ids),
        "mean_chunk_tokens": round(mine["chunk_tokens"] / max(1, mine["chunks"]), 1),
        "search": "embedstream search: dense = doc by best chunk, sparse = doc vector, "
                  "hybrid = both fused",
        "split": args.split, "retrieval": retrieval.model_dump(),
        "chunker": mine["spec"], "index_s": mine["index_s"], "stock_s": stock_s,
        "indexed_by": "rebuild" if args.rebuild else "stream write path",
        "corpus": "whole" if args.sample is None and not args.limit
        else f"sample: judged docs + {args.sample} others" if args.sample is not None
        else f"first {args.limit} docs",
        "wall_s": round(time.perf_counter() - started, 1),
        "encoder": mine["encoder"],
        "machine": machine(),
    })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
