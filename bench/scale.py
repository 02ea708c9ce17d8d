"""How the store's costs grow with its size: 10K, 100K, 1M chunk points (issue 24).

A store is grown in steps (``--steps``, default 10,000, 100,000 and 1,000,000 chunk
points; ``--max`` leaves out larger steps, or is added as the last one) through the
sinks' public calls, as the consumer writes: per batch of ``--batch`` new documents of
1-3 chunks each, the version guard (``document_states``), one ``apply``, and a ``flush``
once a second. At each step, over ``--samples`` random documents each, it measures:

* ``apply_ms``: an update that replaces a document's 1-3 chunks (one document per
  ``apply``, after its own version-guard read, timed apart as ``state_read_ms``), and
  ``delete_ms``: a delete (the document is then written again: the store keeps its size);
* ``search_ms`` and ``filtered_search_ms``: top 10 through ``Sink.search`` for
  ``--queries`` queries (the 100 MS MARCO sample queries, then copies of them perturbed
  as the points are), unfiltered and filtered on an indexed keyword (``category``,
  20 values: ~5% of the points), with ``recall_at_10`` of each against exact search
  (numpy over every point), through the sink's own search parameters;
* ``rss_bytes_per_point`` (``/proc/self/status``, less the RSS before the store was
  opened; split into anonymous and file-backed) and ``disk_bytes_per_point`` (allocated
  blocks, as ``du``, of the store's directory);
* Edge: ``reopen_s``, the open plus first search of a fresh process after a writer was
  killed with SIGKILL having written ``--kill-points`` points since its last flush (so
  the open replays them from the write-ahead log); ``reopen_wall_s`` adds the process's
  start-up;
* ``max_sink_block_ms``: the longest one call the consumer's loop makes (version-guard
  read, apply, flush, ``maintain()``, shown as ``optimize``) held the caller, from the
  start; ``gil_max_gap_ms``: the longest gap of a pure-Python thread that wakes every
  millisecond, i.e. how long a call kept the interpreter (the GIL) from every other
  thread (over the growth, the updates and deletes and the searches; not the bench's own
  close and reopen).

Vectors: real embeddings of the MS MARCO sample, perturbed per copy (see
``_scale_corpus``): embedding is not what is measured. Edge index (``--index``):
``sink`` (the default) is the sink with its ``sink.index`` settings (the defaults, or
``--index-json`` over them) kept up by the consumer's own policy: ``maintain()`` when
``maintenance_due()`` says so, after a flush, never forced before measuring; ``none`` is
a store with no index (plain segments, never optimized: every search scans fp32), the
store as the sink left it before ``sink.index`` existed. The server path is
``QdrantClient(":memory:")``, qdrant-client's local mode (numpy brute force, payload
indexes ignored, every delete-by-filter a scan in Python), grown while the next step is
expected to fit ``--server-max``, ``--server-budget-s`` and ``--server-max-rss``; a line
says where it stopped.

Output: one JSON line per sink and step (each sink runs in a child process of its own,
so RSS is that sink's), then, last, the summary for Edge at its largest step: the
figures above, ``apply_growth`` and ``growth`` (each measure at the largest step over its
value at the first), the index and the machine. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.sinks.qdrant_server import QdrantServerSink
from embedstream.stream.filters import Filter, Match
from embedstream.stream.store import Sink

from _common import MODEL, PASSAGES, OtherLoad, log, machine
from _scale_corpus import Corpus, K, cache_file, category, load_sample, more_queries
from _scale_tools import (
    ALIAS,
    FIELDS,
    INDEXES,
    Calls,
    Ticker,
    disk_bytes,
    edge_sink,
    fingerprint,
    index_info,
    index_of,
    memory,
    percentiles,
)

# -- one sink, all steps (a child process) -----------------------------------------------

class Run:
    """A sink grown step by step, and what it measured."""

    def __init__(self, args: argparse.Namespace, kind: str, store: Path) -> None:
        self.args, self.kind, self.store = args, kind, store
        base, queries = load_sample(Path(args.cache))
        self.queries = more_queries(queries, args.queries, args.sigma, args.seed)
        self.dimension = base.shape[1]
        self.corpus = Corpus(base, args.sigma, args.seed, max(args.steps))
        self.calls, self.ticker, self.docs, self.offset = Calls(), Ticker(), 0, 0
        self.rng = np.random.default_rng(args.seed + 1)
        self.baseline = memory()
        self.sink: Sink = self._open()

    def _open(self) -> Sink:
        if self.kind == "edge":
            return edge_sink(self.store, self.dimension, index_of(self.args))
        sink = QdrantServerSink(":memory:", ALIAS, filter_fields=FIELDS)
        sink.open(fingerprint(self.dimension))
        return sink

    def _next_offset(self) -> int:
        self.offset += 1
        return self.offset

    def _maintain(self) -> None:
        """As the consumer does after a checkpoint: the sink's maintenance when it is due
        (never forced before measuring: a step is measured as the policy leaves it)."""
        if self.kind == "edge" and self.sink.maintenance_due():
            self.calls("optimize", self.sink.maintain)

    def grow(self, points: int) -> float:
        """Write new documents until the store holds ``points``; the points per second
        of the sink calls' own time (making the writes is the bench's cost, not counted)."""
        target, flushed = self.corpus.docs_for(points), 0.0
        first = self.corpus.points_in(self.docs)
        while self.docs < target:
            docs = range(self.docs, min(target, self.docs + self.args.batch))
            self.calls("read_state", self.sink.document_states, [f"d{d}" for d in docs])
            writes = [self.corpus.write(d, 1, self._next_offset()) for d in docs]
            self.calls("apply_batch", self.sink.apply, writes)
            self.docs = docs[-1] + 1
            self.calls.points = self.corpus.points_in(self.docs)
            if time.perf_counter() - flushed >= 1.0:  # as the consumer: once a second
                self.calls("flush", self.sink.flush)
                flushed = time.perf_counter()
            self._maintain()
            if (self.docs // self.args.batch) % 200 == 0:  # progress of a long step
                log(f"{self.kind}: {self.corpus.points_in(self.docs):,} points; longest "
                    f"call so far {self.calls.longest[0]:.0f} ms ({self.calls.longest[1]})")
        self.calls("flush", self.sink.flush)
        seconds = sum(sum(ms) for ms in self.calls.ms.values()) / 1000
        return (self.corpus.points_in(self.docs) - first) / max(seconds, 1e-9)

    def rewrite(self, doc: int, op: str, deleted: bool) -> None:
        """One document through the version guard, then written (deleted) alone."""
        doc_id = f"d{doc}"
        stored = self.calls("state_read", self.sink.document_states, [doc_id])
        write = self.corpus.write(doc, stored[doc_id].version + 1, self._next_offset(), deleted)
        self.calls(op, self.sink.apply, [write])

    def churn(self) -> None:
        """Updates and deletes of random documents (each deleted one written again)."""
        samples = self.args.samples if self.kind == "edge" else self.args.server_samples
        chosen = self.rng.choice(self.docs, min(2 * samples, self.docs), False)
        flushed = time.perf_counter()
        for i, doc in enumerate(chosen.tolist()):
            if i % 2 == 0:
                self.rewrite(doc, "update", deleted=False)
            else:
                self.rewrite(doc, "delete", deleted=True)
                self.rewrite(doc, "recreate", deleted=False)
            if time.perf_counter() - flushed >= 1.0:
                self.calls("flush", self.sink.flush)
                flushed = time.perf_counter()
                self._maintain()
        self.calls("flush", self.sink.flush)

    def search(self, truth: list[set[str]], truth_filtered: list[set[str]]) -> dict[str, Any]:
        """Search latency and recall@10 through the sink, unfiltered and filtered; for an
        Edge index, also through the shard with the search parameters the sink cannot pass."""

        def plain(i: int, query: list[float]) -> list[tuple[str, Any]]:
            return [(h.id, h.payload) for h in self.sink.search(query, K)]

        def filtered(i: int, query: list[float]) -> list[tuple[str, Any]]:
            only = Filter(must=(Match("category", category(i)),))
            found = [(h.id, h.payload) for h in self.sink.search(query, K, only)]
            if any(payload.get("category") != category(i) for _, payload in found):
                raise SystemExit(f"query {i}: a hit outside its filter")
            return found

        out: dict[str, Any] = {}
        out["search_ms"], out["recall_at_10"] = self._searches(plain, truth)
        out["filtered_search_ms"], out["filtered_recall_at_10"] = self._searches(
            filtered, truth_filtered)
        return out

    def _searches(self, search: Callable[[int, list[float]], list[tuple[str, Any]]],
                  truth: list[set[str]]) -> tuple[dict[str, float], float]:
        """Latency percentiles (ms) of ``search`` over the queries, and mean recall@10."""
        queries: list[list[float]] = self.queries.tolist()  # as a caller passes them
        for i in range(min(10, len(queries))):  # warm-up: lazily loaded files
            search(i, queries[i])
        times, recall = [], []
        for i, query in enumerate(queries):
            started = time.perf_counter()
            found = search(i, query)
            times.append((time.perf_counter() - started) * 1000)
            recall.append(len(truth[i] & {pid for pid, _ in found}) / K)
        return percentiles(times), round(float(np.mean(recall)), 4)

    def reopen_after_kill(self) -> dict[str, Any]:
        """Kill a writer with SIGKILL after unflushed writes, then time a fresh process's
        open and first search; the bench's own sink is closed meanwhile."""
        self.calls("close", self.sink.close)
        common = [sys.executable, __file__, "--_store", str(self.store), "--cache",
                  self.args.cache, "--sigma", str(self.args.sigma), "--seed",
                  str(self.args.seed), "--steps", ",".join(map(str, self.args.steps))]
        writer = subprocess.Popen([*common, "--_role", "writer", "--_docs", str(self.docs),
                                   "--kill-points", str(self.args.kill_points)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None
            written = writer.stdout.readline().strip()  # its writes are in; no flush
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        if not written:
            raise SystemExit(f"the writer failed (exit {writer.returncode})")
        started = time.perf_counter()
        opened = subprocess.run([*common, "--_role", "reopen"], check=True,
                                capture_output=True, text=True)
        wall = time.perf_counter() - started
        figures = json.loads(opened.stdout.strip().splitlines()[-1])
        self.sink = self.calls("reopen", self._open)
        if self.sink.maintenance_due():  # as the consumer does at start, before it polls
            self.calls("open_maintain", self.sink.maintain)
        return {"reopen_s": round(figures["open_s"] + figures["first_search_s"], 3),
                "reopen_open_s": figures["open_s"], "reopen_wall_s": round(wall, 3),
                "killed_after_points": int(written)}

    def _searched(self, points: int) -> dict[str, Any]:
        """:meth:`search` against the exact answers, with ``gil_max_gap_ms`` over the growth,
        churn and searches: not over the bench's own work (exact search in numpy)."""
        held = self.ticker.take()
        truth = self.corpus.exact(self.queries, points)
        self.ticker.take()
        found = self.search(*truth)
        return {**found, "gil_max_gap_ms": max(held, self.ticker.take())}

    def step(self, points: int) -> dict[str, Any]:
        started, others = time.perf_counter(), OtherLoad()
        self.calls.ms.clear()  # each step's figures are its own; the longest call is kept
        rate = self.grow(points)
        self._maintain()
        grown = {op: round(max(ms), 1) for op, ms in self.calls.ms.items()}
        optimized = self.calls.figures("optimize")
        self.calls.ms.clear()
        self.churn()
        self._maintain()
        held = self.calls.ms.get("optimize", [])
        now = self.corpus.points_in(self.docs)
        line: dict[str, Any] = {
            "sink": self.kind, "points": now, "documents": self.docs,
            "grow_points_per_s": round(rate), "grow_max_ms": grown,
            "apply_ms": self.calls.figures("update"), "delete_ms": self.calls.figures("delete"),
            "state_read_ms": self.calls.figures("state_read"),
            "flush_ms": self.calls.figures("flush"),
            "optimize_ms": optimized,
            "optimize_after_churn_ms": round(held[-1], 1) if held else None,
            **self._searched(now),
            **{f"{name}_bytes_per_point" if name == "rss" else f"rss_{name}_bytes_per_point":
               round((value - self.baseline[name]) / now) for name, value in memory().items()},
        }
        if self.kind == "edge":
            line["disk_bytes_per_point"] = round(disk_bytes(self.store) / now)
            line.update(self.reopen_after_kill())
            self.ticker.take()
        else:
            line["disk_bytes_per_point"] = line["reopen_s"] = None
        line["open_maintain_ms"] = round(max(self.calls.ms["open_maintain"], default=0), 1)
        line["max_sink_block_ms"] = round(self.calls.longest[0], 1)
        line["max_sink_block_op"] = self.calls.longest[1]
        line["max_sink_block_at_points"] = self.calls.longest_at
        line["index"] = index_info(self.args, self.sink)
        line["step_s"] = round(time.perf_counter() - started, 1)
        line["other_load_cores"] = others.cores()  # the machine is shared: CPU others used
        return line


def run_sink(args: argparse.Namespace, kind: str) -> None:
    """Every step of one sink; a JSON line each (the parent relays them). SIGTERM ends
    it through ``SystemExit``, so the store's directory is removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.store_dir) as tmp:
        run, spent = Run(args, kind, Path(tmp)), time.perf_counter()
        try:
            last: dict[str, Any] | None = None
            for target in args.steps:
                why = last and kind == "server" and _server_stop(args, last, target, spent)
                if why:
                    print(json.dumps({"sink": kind, "stopped_before_points": target,
                                      "why": why}), flush=True)
                    return
                log(f"{kind}: growing to {target:,} points")
                last = run.step(target)
                print(json.dumps(last), flush=True)
        finally:
            run.sink.close()


def _server_stop(args: argparse.Namespace, last: dict[str, Any], target: int,
                 started: float) -> str | None:
    """Why the in-memory server path stops before ``target`` points (None: it goes on)."""
    # Local mode's costs grow at least linearly with the points (it scans in Python).
    step_s = last["step_s"] * target / last["points"]
    left = args.server_budget_s - (time.perf_counter() - started)
    if target > args.server_max:
        return f"--server-max {args.server_max}"
    if last["rss_bytes_per_point"] * target > args.server_max_rss:
        return f"RSS would pass --server-max-rss {args.server_max_rss} bytes"
    if step_s > left:
        return f"the step would take ~{step_s:.0f} s; {left:.0f} s left of --server-budget-s"
    return None


# -- the writer killed with SIGKILL and the process that reopens (children) ----------------

def writer(args: argparse.Namespace) -> None:
    """Update ``--kill-points`` points' documents (never flushed), say so, wait to die.
    It maintains the store as the consumer would (when due): a consumer killed mid-run
    leaves at most ``every_points`` unindexed, not everything it wrote."""
    base, _ = load_sample(Path(args.cache))
    corpus = Corpus(base, args.sigma, args.seed, max(args.steps))
    sink = edge_sink(Path(args._store), base.shape[1], index_of(args))
    docs = range(min(args._docs, corpus.docs_for(args.kill_points)))
    for start in range(0, len(docs), 500):
        batch = [f"d{d}" for d in docs[start:start + 500]]
        stored = sink.document_states(batch)
        sink.apply([corpus.write(int(d[1:]), stored[d].version + 1, 0) for d in batch])
        if sink.maintenance_due():
            sink.maintain()
    print(corpus.points_in(len(docs)), flush=True)
    time.sleep(3600)


def reopen(args: argparse.Namespace) -> None:
    _, queries = load_sample(Path(args.cache))
    started = time.perf_counter()
    sink = edge_sink(Path(args._store), queries.shape[1], index_of(args))
    opened = time.perf_counter()
    sink.search(queries[0].tolist(), K)
    searched = time.perf_counter()
    print(json.dumps({"open_s": round(opened - started, 3),
                      "first_search_s": round(searched - opened, 3)}), flush=True)
    sink.close()


# -- the parent: runs each sink in a child, then the summary ------------------------------

GROWTH = ("apply_ms.p50", "apply_ms.p99", "delete_ms.p99", "state_read_ms.p99",
          "search_ms.p50", "search_ms.p99", "filtered_search_ms.p99", "recall_at_10",
          "filtered_recall_at_10", "reopen_s", "rss_bytes_per_point", "disk_bytes_per_point",
          "max_sink_block_ms", "gil_max_gap_ms", "grow_points_per_s")


def _get(line: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        line = line.get(part) if isinstance(line, dict) else None  # type: ignore[assignment]
    return line


def summary(args: argparse.Namespace, lines: dict[str, list[dict[str, Any]]],
            started: float) -> dict[str, Any]:
    edge, server = lines.get("edge", []), lines.get("server", [])
    first, last = (edge[0], edge[-1]) if edge else ({}, {})

    def growth(key: str) -> float | None:
        a, b = _get(first, key), _get(last, key)
        return round(b / a, 3) if a and b is not None else None

    return {
        "summary": "edge", "points": last.get("points"),
        "apply_p99_ms": _get(last, "apply_ms.p99"), "apply_growth": growth("apply_ms.p99"),
        "search_p99_ms": _get(last, "search_ms.p99"),
        "filtered_search_p99_ms": _get(last, "filtered_search_ms.p99"),
        "recall_at_10": last.get("recall_at_10"),
        "filtered_recall_at_10": last.get("filtered_recall_at_10"),
        "reopen_s": last.get("reopen_s"), "rss_bytes_per_point": last.get("rss_bytes_per_point"),
        "disk_bytes_per_point": last.get("disk_bytes_per_point"),
        "max_sink_block_ms": last.get("max_sink_block_ms"),
        "max_sink_block_op": last.get("max_sink_block_op"),
        "max_sink_block_at_points": last.get("max_sink_block_at_points"),
        "open_maintain_ms": max((x.get("open_maintain_ms") or 0 for x in edge), default=None),
        "gil_max_gap_ms": max((x["gil_max_gap_ms"] for x in edge), default=None),
        "index": last.get("index"), "growth_from_points": first.get("points"),
        "growth": {key: growth(key) for key in GROWTH},
        "server_largest_points": max((x.get("points", 0) for x in server), default=None),
        "server_stopped": next((x for x in server if "stopped_before_points" in x), None),
        "vectors": {"source": f"{PASSAGES.parent.name}: passages and queries embedded with "
                    f"{MODEL} (torch fp32), cached in {args.cache}",
                    "perturbation": f"point g = passage g % P + N(0, {args.sigma}^2) per "
                    "dimension, renormalized", "seed": args.seed,
                    "queries": f"{args.queries}: the sample's, then copies perturbed alike"},
        "wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="10000,100000,1000000",
                        help="chunk points at each step, comma-separated")
    parser.add_argument("--max", type=int, default=None,
                        help="leave out steps above it; a step of its own when larger")
    parser.add_argument("--sinks", default="edge,server")
    parser.add_argument("--index", choices=INDEXES, default="sink",
                        help="Edge's index: sink (the sink's own settings and the consumer's "
                             "maintenance policy), none, or one the bench sets up")
    parser.add_argument("--index-json", default=None,
                        help="with --index sink: sink.index settings over the defaults")
    parser.add_argument("--batch", type=int, default=500, help="new documents per apply")
    parser.add_argument("--samples", type=int, default=500,
                        help="updates, and deletes, per step (Edge)")
    parser.add_argument("--server-samples", type=int, default=50,
                        help="the same for the server path (each call scans every point)")
    parser.add_argument("--queries", type=int, default=500,
                        help="searches per step (the sample has 100; more are perturbed copies)")
    parser.add_argument("--sigma", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kill-points", type=int, default=20_000)
    parser.add_argument("--server-max", type=int, default=1_000_000)
    parser.add_argument("--server-budget-s", type=float, default=150)
    parser.add_argument("--server-max-rss", type=int, default=4 * 2**30)
    parser.add_argument("--store-dir", default=None, help="where the store is made")
    parser.add_argument("--cache", default=None, help="the embeddings' file")
    for hidden in ("--_role", "--_store", "--_child"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_docs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = sorted(int(s) for s in str(args.steps).split(",") if s)
    if args.max is not None:
        steps = [s for s in steps if s <= args.max]
        if not steps or steps[-1] < args.max:
            steps.append(args.max)
    args.steps = steps
    args.cache = args.cache or str(cache_file())
    return args


def main() -> int:
    args = parse()
    roles: dict[str, Callable[[argparse.Namespace], None]] = {"writer": writer,
                                                              "reopen": reopen}
    if args._role in roles:
        roles[args._role](args)
        return 0
    if args._child:
        run_sink(args, args._child)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops it cleanly
    started, lines = time.perf_counter(), defaultdict(list)
    load_sample(Path(args.cache))  # embed once, before the children read it
    log(f"steps {args.steps}; vectors: MS MARCO sample embeddings + N(0, {args.sigma}^2) "
        f"noise per copy (cache {args.cache})")
    for kind in args.sinks.split(","):
        child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--cache",
                                  args.cache, "--_child", kind], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None
            for raw in child.stdout:
                print(raw.rstrip("\n"), flush=True)
                lines[kind].append(json.loads(raw))
        except BaseException:  # stopped early (SIGTERM, Ctrl-C): the child removes its store
            child.terminate()
            raise
        finally:
            child.wait()
        if child.returncode:
            raise SystemExit(f"the {kind} run failed (exit {child.returncode})")
    print(json.dumps(summary(args, lines, started)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
