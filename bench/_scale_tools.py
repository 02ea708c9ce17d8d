"""The scale bench's meters and its Edge settings.

Meters: :class:`Ticker` (the longest time the interpreter was held from a pure-Python
thread), :class:`Calls` (every sink call timed by op, and the longest of those the
consumer's loop makes), :func:`memory` (RSS, anonymous and file-backed) and
:func:`disk_bytes` (allocated, as ``du``).

Edge settings the sink has no option for (issue 24, item 2): :func:`edge_config` is
the ``EdgeConfig`` the bench reopens a new chunk shard with (the shard keeps it on
disk, so the sink's later opens use it), :func:`search_params` what a query of that
index could ask for, which ``Sink.search`` cannot pass, and :func:`edge_shard` reaches
the open sink's chunk shard through a private attribute to run ``optimize()`` and read
its segments, which the sink has no call for.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import qdrant_edge as qe

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.filters import FieldType
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import Sink

from _common import MODEL

__all__ = ["ALIAS", "FIELDS", "INDEXES", "Calls", "Ticker", "disk_bytes", "edge_config",
           "edge_shard", "edge_sink", "fingerprint", "index_info", "memory", "percentiles",
           "search_params", "search_params_text"]

ALIAS = "scale"
FIELDS: dict[str, FieldType] = {"category": "keyword"}
INDEXES = ("none", "int8", "binary", "hnsw", "hnsw-int8")
_T = TypeVar("_T")


class Ticker:
    """A pure-Python thread that wakes every millisecond. Its longest gap between two
    wake-ups is the longest time something kept the interpreter from it: a call into
    the store that holds the GIL (or, on a busy machine, the CPU given to others)."""

    def __init__(self) -> None:
        self._longest = 0.0
        threading.Thread(target=self._run, daemon=True, name="ticker").start()

    def _run(self) -> None:  # until the process ends (a daemon thread)
        last = time.perf_counter()
        while True:
            time.sleep(0.001)
            now = time.perf_counter()
            self._longest, last = max(self._longest, now - last), now

    def take(self) -> float:
        """The longest gap (ms) since the last ``take``."""
        longest, self._longest = self._longest, 0.0
        return round(longest * 1000, 1)


class Calls:
    """Times sink calls by op; keeps the longest of those the consumer's loop makes
    (not ``close`` and ``reopen``, which the bench makes to kill a writer)."""

    OUTSIDE_LOOP = frozenset({"close", "reopen"})

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.longest: tuple[float, str] = (0.0, "")

    def __call__(self, op: str, call: Callable[..., _T], *args: Any) -> _T:
        started = time.perf_counter()
        result = call(*args)
        ms = (time.perf_counter() - started) * 1000
        self.ms[op].append(ms)
        if op not in self.OUTSIDE_LOOP:
            self.longest = max(self.longest, (ms, op))
        return result

    def figures(self, op: str) -> dict[str, float] | None:
        return percentiles(self.ms[op]) if self.ms.get(op) else None


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(ordered[len(ordered) // 2], 3),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "max": round(ordered[-1], 3), "n": len(ordered)}


def memory() -> dict[str, int]:
    """This process's resident set now (bytes): ``rss``, and of it ``anon`` (heap: not
    reclaimable without swap) and ``file`` (pages of mapped files, which the kernel
    may drop and read again), from ``/proc/self/status``."""
    names = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    with open("/proc/self/status") as status:
        return {names[f[0]]: int(f[1]) * 1024 for f in map(str.split, status)
                if f and f[0] in names}


def disk_bytes(path: Path) -> int:
    """Bytes allocated under ``path`` (as ``du``: sparse files count what they hold)."""
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512
               for d, _, files in os.walk(path) for f in files)


def fingerprint(dimension: int) -> Fingerprint:
    return Fingerprint(model=MODEL, revision="scale-bench", dimension=dimension,
                       normalized=True, chunker="scale-bench")


def edge_sink(store: Path, dimension: int) -> QdrantEdgeSink:
    sink = QdrantEdgeSink(store, ALIAS, filter_fields=FIELDS)
    sink.open(fingerprint(dimension))
    return sink


def edge_shard(sink: Sink) -> qe.EdgeShard:
    """The open Edge sink's chunk shard. The sink has no call to run the optimizer or
    report segments, so the bench reaches the shard through a private attribute."""
    shard = sink._chunks if isinstance(sink, QdrantEdgeSink) else None
    if shard is None:
        raise TypeError("not an open Qdrant Edge sink")
    return shard


def _quantization(index: str) -> str | None:
    """``int8``, ``binary`` or None: the quantization an ``--index`` value names."""
    return next((q for q in ("int8", "binary") if q in index), None)


def edge_config(index: str, dimension: int, args: argparse.Namespace) -> qe.EdgeConfig:
    """The chunk shard's settings for ``index`` (an ``INDEXES`` value): the graph
    (``m`` 0: none), the quantization kept in RAM, the optimizer's thresholds."""
    quantization: qe.ScalarQuantizationConfig | qe.BinaryQuantizationConfig | None = None
    if _quantization(index) == "int8":
        quantization = qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, quantile=0.99,
                                                   always_ram=True)
    elif _quantization(index) == "binary":
        quantization = qe.BinaryQuantizationConfig(always_ram=True)
    return qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine,
                                    quantization_config=quantization),
        hnsw_config=qe.HnswIndexConfig(m=args.hnsw_m if index.startswith("hnsw") else 0,
                                       ef_construct=args.ef_construct,
                                       full_scan_threshold=args.full_scan_kb),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=args.indexing_threshold_kb,
                                           max_segment_size=args.max_segment_kb,
                                           default_segment_number=args.segment_number))


def search_params(args: argparse.Namespace) -> qe.SearchParams | None:
    """What a query of this index could ask for, which the sink's search cannot pass."""
    if args.index == "none":
        return None
    return qe.SearchParams(
        hnsw_ef=args.hnsw_ef if args.index.startswith("hnsw") else None,
        quantization=qe.QuantizationSearchParams(rescore=True, oversampling=args.oversampling)
        if _quantization(args.index) else None)


def search_params_text(args: argparse.Namespace) -> str:
    parts = [f"hnsw_ef={args.hnsw_ef}"] if args.index.startswith("hnsw") else []
    if _quantization(args.index):
        parts.append(f"rescore=True oversampling={args.oversampling}")
    return " ".join(parts)


def index_info(args: argparse.Namespace, sink: Sink) -> dict[str, Any]:
    """What the index is: graph, quantization, threads, segments, how it is kept up."""
    if not isinstance(sink, QdrantEdgeSink):
        return {"kind": "qdrant-client local mode (:memory:)", "graph": None,
                "quantization": None, "note": "numpy brute force; payload indexes ignored"}
    info = edge_shard(sink).info()
    found = {"segments": info.segments_count, "indexed_vectors": info.indexed_vectors_count,
             "search_threads": "auto (Edge: from the CPU count)"}
    if args.index == "none":
        return {"kind": "none", "graph": None, "quantization": None,
                "optimize": "never (as the sink leaves it: every search scans fp32)", **found}
    return {"kind": args.index,
            "graph": f"hnsw m={args.hnsw_m} ef_construct={args.ef_construct}"
            if args.index.startswith("hnsw") else "none (m 0)",
            "quantization": {"int8": "int8 scalar, in RAM, quantile 0.99",
                             "binary": "binary 1 bit, in RAM", None: None}[
                                 _quantization(args.index)], "indexing_threads": "auto",
            "optimize": f"optimize() every {args.optimize_every} points and before measuring",
            "indexing_threshold_kb": args.indexing_threshold_kb,
            "max_segment_kb": args.max_segment_kb,
            "segment_number": args.segment_number or "auto", **found}
