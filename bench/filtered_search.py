"""Filtered search with and without payload indexes on Qdrant Edge (issue 15).

A Qdrant Edge store (the embedstream sink, in a temporary directory) is filled with
``--points`` chunk points (default 100,000): random 384-dimensional unit vectors, a
keyword field ``category`` of 50 values (a match selects about 2%) and a float field
``price`` uniform in [0, 100) (``price < 2`` selects about 2%). Written through
``QdrantEdgeSink.apply`` in batches, as the consumer writes, and searched as
``embedstream search`` does (no optimizer run: the store as embedstream leaves it;
``--optimize`` builds the HNSW index first, as a separate figure).

Measured, each over ``--queries`` random query vectors (k=10), after a warm-up:

1. the store opened WITHOUT filter fields (no payload index on ``category`` or
   ``price``): unfiltered search, the keyword filter, the float range filter;
2. the same store reopened WITH ``filter_fields: {category: keyword, price: float}``,
   which creates the two payload indexes on open (timed: ``index_s``): the same.

Every filtered hit is checked to match its filter, and the hits of both runs are
compared (``same_hits``: the fraction of queries whose top ids are identical).
Figures: p50/p99 latency in milliseconds per case; ratios ``indexed / unindexed``
of the p50s (below 1: the index helps). The last stdout line is one JSON object;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.filters import FieldType, Filter, Match, Range
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite

from _common import log, machine

DIMENSION = 384
CATEGORIES = 50
FIELDS: dict[str, FieldType] = {"category": "keyword", "price": "float"}
FINGERPRINT = Fingerprint(model="bench-random", revision="0", dimension=DIMENSION,
                          normalized=True, chunker="none")
K = 10


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIMENSION), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def fill(sink: QdrantEdgeSink, points: int, batch: int, seed: int) -> float:
    """Write ``points`` one-chunk documents; the seconds it took."""
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for start in range(0, points, batch):
        n = min(batch, points - start)
        vectors, prices = _unit(rng, n), rng.uniform(0, 100, n)
        sink.apply([
            DocumentWrite(f"d{i}", DocState(1, i, False), [ChunkPoint(0, vectors[j], {
                "category": f"c{i % CATEGORIES:02d}", "price": round(float(prices[j]), 2),
                "text": ""})])
            for j, i in enumerate(range(start, start + n))])
        if (start // batch) % 10 == 0:
            log(f"written {start + n:,} of {points:,}")
    sink.flush()
    return time.perf_counter() - started


def measure(sink: QdrantEdgeSink, queries: np.ndarray, make: Callable[[int], Filter | None],
            holds: Callable[[dict[str, Any], int], bool]) -> tuple[dict[str, float], list[Any]]:
    """p50/p99 milliseconds of searching each query with ``make(i)``; every hit
    must satisfy ``holds``. Also the hit ids per query."""
    for i in range(min(10, len(queries))):  # warm-up: caches, lazily loaded files
        sink.search(queries[i].tolist(), K, make(i))
    times, found = [], []
    for i, query in enumerate(queries):
        vector, only = query.tolist(), make(i)
        started = time.perf_counter()
        hits = sink.search(vector, K, only)
        times.append((time.perf_counter() - started) * 1000)
        if not all(holds(dict(h.payload), i) for h in hits):
            raise SystemExit(f"query {i}: a hit does not match its filter")
        found.append([h.id for h in hits])
    times.sort()
    return ({"p50_ms": round(statistics.median(times), 3),
             "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 3)}, found)


def run_cases(sink: QdrantEdgeSink, queries: np.ndarray) -> tuple[dict[str, Any], list[Any]]:
    def category(i: int) -> str:
        return f"c{(i * 7) % CATEGORIES:02d}"

    cases: dict[str, tuple[Callable[[int], Filter | None],
                           Callable[[dict[str, Any], int], bool]]] = {
        "unfiltered": (lambda i: None, lambda p, i: True),
        "keyword": (lambda i: Filter(must=(Match("category", category(i)),)),
                    lambda p, i: p["category"] == category(i)),
        "float_range": (lambda i: Filter(must=(Range("price", lt=2.0),)),
                        lambda p, i: p["price"] < 2.0),
    }
    figures, hits = {}, []
    for name, (make, holds) in cases.items():
        figures[name], found = measure(sink, queries, make, holds)
        hits.append(found)
        log(f"  {name}: {figures[name]}")
    return figures, hits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=2000, help="documents per apply")
    parser.add_argument("--optimize", action="store_true",
                        help="run Edge's optimizers (build HNSW) before measuring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    queries = _unit(np.random.default_rng(args.seed + 1), args.queries)
    with tempfile.TemporaryDirectory(prefix="filtered-search-") as tmp:
        store = Path(tmp)
        plain = QdrantEdgeSink(store, "bench")
        plain.open(FINGERPRINT)
        try:
            log(f"writing {args.points:,} points (no payload index on the filter fields)")
            write_s = fill(plain, args.points, args.batch, args.seed)
        finally:
            plain.close()
        if args.optimize:  # the sink never runs Edge's optimizers: the shard itself does
            log("optimizing (building HNSW)")
            shard = qe.EdgeShard.load(str(store / plain.collection), None)
            shard.optimize()
            shard.close()
        plain = QdrantEdgeSink(store, "bench")
        plain.open(FINGERPRINT)
        try:
            log("searching without the payload indexes")
            unindexed, before = run_cases(plain, queries)
        finally:
            plain.close()
        indexed_sink = QdrantEdgeSink(store, "bench", filter_fields=FIELDS)
        opened = time.perf_counter()
        indexed_sink.open(FINGERPRINT)  # creates the two payload indexes on existing points
        index_s = time.perf_counter() - opened
        try:
            log(f"payload indexes created in {index_s:.2f}s; searching with them")
            indexed, after = run_cases(indexed_sink, queries)
        finally:
            indexed_sink.close()
    same = [sum(a == b for a, b in zip(x, y, strict=True)) / len(x)
            for x, y in zip(before, after, strict=True)]

    def ratio(case: str) -> float:
        return round(indexed[case]["p50_ms"] / unindexed[case]["p50_ms"], 4)

    result = {
        "points": args.points, "dimension": DIMENSION, "queries": args.queries, "k": K,
        "categories": CATEGORIES, "optimized": args.optimize,
        "write_s": round(write_s, 1), "index_s": round(index_s, 2),
        "unindexed": unindexed, "indexed": indexed,
        "keyword_ratio": ratio("keyword"), "float_range_ratio": ratio("float_range"),
        "unfiltered_ratio": ratio("unfiltered"),
        "same_hits": dict(zip(indexed, (round(s, 4) for s in same), strict=True)),
        "wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
