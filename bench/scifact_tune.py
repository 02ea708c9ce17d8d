"""Choose ``retrieval`` settings on BEIR SciFact's train split (never its test queries).

The dense side is indexed once (the stream's write path, as ``bench/scifact.py`` does)
and each train query's dense document ranking (best chunk, ``retrieval.depth``) kept.
Then for each BM25 setting on a grid (``k``, ``b``, ``avg_len``) the documents' sparse
vectors are written into a fresh Qdrant Edge store of their own (the sink's document
points, IDF modifier) and searched with the product's code
(:func:`embedstream.stream.retrieval.sparse_documents`), and both rankings are fused by
each fusion setting (RRF with several ``rrf_k``, DBSF). Prints one JSON line per
setting on stderr and, last on stdout, one line with the best sparse and the best
hybrid setting, their train nDCG@10, the defaults' figures and the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scifact import DEFAULT_DATA, index, load, ndcg_at_10, row_text

from embedstream.sinks import QdrantEdgeSink
from embedstream.stream.app.query_jobs import QueryJob, embed_jobs
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import (
    Bm25Settings,
    MetricsSettings,
    RetrievalSettings,
    Settings,
    SinkSettings,
    SourceSettings,
)
from embedstream.stream.filters import Filter
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.retrieval import (
    Query,
    dense_documents,
    fuse_dbsf,
    fuse_rrf,
    sparse_documents,
)
from embedstream.stream.sparse import Bm25Encoder
from embedstream.stream.store import DocState, DocumentWrite

from _common import log, machine

Ranked = list[tuple[str, float]]


def sparse_rankings(corpus: Sequence[dict[str, Any]], texts: Sequence[str],
                    settings: RetrievalSettings, depth: int, scratch: Path) -> list[Ranked]:
    """Each query's sparse document ranking under ``settings``, from a fresh store."""
    encoder = Bm25Encoder(settings)
    sink = QdrantEdgeSink(scratch, "bm25")
    sink.open(Fingerprint(model="none", revision="none", dimension=1, normalized=True,
                          chunker="none", sparse=encoder.spec))
    try:
        writes = []
        for offset, row in enumerate(corpus):
            writes.append(DocumentWrite(str(row["_id"]), DocState(1, offset, False),
                                        sparse=encoder.encode_document(row_text(row))))
        for start in range(0, len(writes), 1000):
            sink.apply(writes[start:start + 1000])
        return [[(str(h.payload["doc_id"]), h.score) for h in sparse_documents(
            sink, Query((), encoder.encode_query(text)), depth)] for text in texts]
    finally:
        sink.close()


def score(rankings: Sequence[Ranked], ids: Sequence[str], qrels: Any) -> float:
    return round(ndcg_at_10({q: dict(r[:10]) for q, r in zip(ids, rankings, strict=True)},
                            qrels), 4)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--k", type=float, nargs="+", default=[0.9, 1.2, 1.5])
    parser.add_argument("--b", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--avg-len", type=float, nargs="+",
                        default=[100.0, 150.0, 200.0, 256.0, 320.0])
    parser.add_argument("--rrf-k", type=int, nargs="+", default=[10, 20, 40, 60, 100])
    parser.add_argument("--depth", type=int, nargs="+", default=[RetrievalSettings().depth],
                        help="retrieval.depth values (each ranking cut there before fusing)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    corpus, queries, qrels = load(args.data, "train")
    ids, texts = list(queries), list(queries.values())
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(
            source=SourceSettings(id_fields=("_id",), text_fields=("title", "text")),
            sink=SinkSettings(kind="qdrant-edge", path=Path(scratch) / "dense",
                              collection="scifact"),
            metrics=MetricsSettings(enabled=False))
        pipeline = build_pipeline(settings)
        try:
            index(pipeline, corpus)
            jobs = [QueryJob(q, t, Filter()) for q, t in zip(ids, texts, strict=True)]
            vectors = embed_jobs(pipeline.embedder, jobs)
            dense = [[(str(h.payload["doc_id"]), h.score) for h in dense_documents(
                pipeline.sink, Query(v.tolist()), max(args.depth))] for v in vectors]
        finally:
            pipeline.close()
        dense_ndcg = score(dense, ids, qrels)
        log(f"dense train nDCG@10 {dense_ndcg} after {time.perf_counter() - started:.0f}s")
        for n, (k, b, avg_len) in enumerate(itertools.product(args.k, args.b, args.avg_len)):
            retrieval = RetrievalSettings(sparse="bm25",
                                          bm25=Bm25Settings(k=k, b=b, avg_len=avg_len))
            sparse = sparse_rankings(corpus, texts, retrieval, max(args.depth),
                                     Path(scratch) / f"bm25-{n}")
            row: dict[str, Any] = {"k": k, "b": b, "avg_len": avg_len,
                                   "sparse": score(sparse, ids, qrels)}
            for depth in args.depth:
                pairs = [(d[:depth], s[:depth]) for d, s in zip(dense, sparse, strict=True)]
                at = "" if len(args.depth) == 1 else f"@{depth}"
                for rrf_k in args.rrf_k:
                    row[f"rrf_{rrf_k}{at}"] = score([fuse_rrf(p, rrf_k) for p in pairs], ids,
                                                    qrels)
                row[f"dbsf{at}"] = score([fuse_dbsf(p) for p in pairs], ids, qrels)
            log(json.dumps(row))
            results.append(row)
    ats = [""] if len(args.depth) == 1 else [f"@{d}" for d in args.depth]
    fusions = [f"{f}{at}" for at in ats for f in [*(f"rrf_{k}" for k in args.rrf_k), "dbsf"]]
    best_sparse = max(results, key=lambda r: r["sparse"])
    best_hybrid = max(((r, f) for r in results for f in fusions), key=lambda rf: rf[0][rf[1]])
    default = RetrievalSettings()
    defaults = next((r for r in results if (r["k"], r["b"], r["avg_len"]) == (
        default.bm25.k, default.bm25.b, default.bm25.avg_len)), None)
    print(json.dumps({
        "split": "train", "queries": len(ids), "docs": len(corpus), "dense": dense_ndcg,
        "best_sparse": best_sparse,
        "best_hybrid": {**{k: best_hybrid[0][k] for k in ("k", "b", "avg_len")},
                        "fusion": best_hybrid[1], "ndcg_at_10": best_hybrid[0][best_hybrid[1]]},
        "defaults": defaults, "grid": len(results), "depth": args.depth,
        "wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
