"""The scale bench's meters and its Edge settings.

Meters: :class:`Ticker` (the longest time the interpreter was held from a pure-Python
thread), :class:`Calls` (every sink call timed by op, and the longest of those the
consumer's loop makes), :func:`memory` (RSS, anonymous and file-backed) and
:func:`disk_bytes` (allocated, as ``du``).

The store's index: :func:`index_of` is the ``sink.index`` an ``--index`` value names
(``sink``: the sink's defaults, with ``--index-json`` over them; ``none``: no index, plain
segments never optimized), and :func:`edge_shard` reaches the open sink's chunk shard
through a private attribute to read its segments for the report.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import qdrant_edge as qe

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.config import IndexSettings
from embedstream.stream.filters import FieldType
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import Sink

from _common import MODEL

__all__ = ["ALIAS", "FIELDS", "INDEXES", "Calls", "Ticker", "disk_bytes", "edge_shard",
           "edge_sink", "fingerprint", "index_info", "index_of", "memory", "percentiles"]

ALIAS = "scale"
FIELDS: dict[str, FieldType] = {"category": "keyword"}
# "sink": the sink's own sink.index settings and the consumer's maintenance policy.
INDEXES = ("sink", "none")
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
    (not ``close`` and ``reopen``, which the bench makes to kill a writer, nor the
    maintenance the consumer makes at start, before it joins its group)."""

    OUTSIDE_LOOP = frozenset({"close", "reopen", "open_maintain"})

    def __init__(self) -> None:
        self.ms: dict[str, list[float]] = defaultdict(list)
        self.longest: tuple[float, str] = (0.0, "")
        self.points = 0  # the store's size as the caller last said (where the longest was)
        self.longest_at = 0

    def __call__(self, op: str, call: Callable[..., _T], *args: Any) -> _T:
        started = time.perf_counter()
        result = call(*args)
        ms = (time.perf_counter() - started) * 1000
        self.ms[op].append(ms)
        if op not in self.OUTSIDE_LOOP and (ms, op) > self.longest:
            self.longest, self.longest_at = (ms, op), self.points
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


def edge_sink(store: Path, dimension: int, index: IndexSettings | None = None) -> QdrantEdgeSink:
    """``index`` None: no index at all (plain segments, never optimized, exact scans)."""
    index = index or IndexSettings.model_validate(
        {"quantization": {"kind": "none"}, "maintenance": {"every_points": 0}})
    sink = QdrantEdgeSink(store, ALIAS, filter_fields=FIELDS, index=index)
    sink.open(fingerprint(dimension))
    return sink


def edge_shard(sink: Sink) -> qe.EdgeShard:
    """The open Edge sink's chunk shard. The sink has no call to run the optimizer or
    report segments, so the bench reaches the shard through a private attribute."""
    shard = sink._chunks if isinstance(sink, QdrantEdgeSink) else None
    if shard is None:
        raise TypeError("not an open Qdrant Edge sink")
    return shard


def index_info(args: argparse.Namespace, sink: Sink) -> dict[str, Any]:
    """What the index is: graph, quantization, threads, segments, how it is kept up."""
    if not isinstance(sink, QdrantEdgeSink):
        return {"kind": "qdrant-client local mode (:memory:)", "graph": None,
                "quantization": None, "note": "numpy brute force; payload indexes ignored"}
    info = edge_shard(sink).info()
    found = {"segments": info.segments_count, "indexed_vectors": info.indexed_vectors_count,
             "search_threads": "auto (Edge: from the CPU count)"}
    if args.index == "sink":
        index = index_of(args)
        assert index is not None
        return {"kind": "sink", "settings": index.model_dump(mode="json"),
                "optimize": f"the consumer's policy: maintain() once "
                            f"{index.maintenance.every_points} chunk points were written",
                **found}
    return {"kind": "none", "graph": None, "quantization": None,
            "optimize": "never: plain segments, every search scans fp32", **found}

def index_of(args: argparse.Namespace) -> IndexSettings | None:
    """``sink.index`` for ``--index sink`` (the defaults, with ``--index-json`` over them);
    None for ``--index none``."""
    if args.index == "none":
        return None
    return IndexSettings.model_validate(json.loads(args.index_json or "{}"))
