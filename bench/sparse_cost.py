"""What document sparse vectors cost: rebuild speed, store size and stream freshness,
``retrieval.sparse: bm25`` against ``none``, same run.

1. Rebuild: ``embedstream rebuild`` (the real bulk path, into a Qdrant Edge store in a
   temporary directory, default settings: the backend chosen for this machine) of
   ``--docs`` SciFact abstracts (title and text: ~230 words, longer than passages, so
   BM25's share is at its largest) or MS MARCO passages (``--corpus msmarco``), with
   ``none`` and ``bm25`` alternating, ``--repeat`` times each; the best of each counts.
   ``rebuild_ratio`` = bm25 docs/s over none docs/s (the goal: >= 0.9).
2. Store: the bytes on disk (allocated blocks) of the chunk collection and of the state
   collection after each rebuild; ``bytes_per_chunk`` (chunk collection over chunks) and
   ``sparse_bytes_per_doc`` (the state collection's growth over documents).
3. BM25 alone: microseconds to encode a document, and to write document states with
   and without sparse vectors (``bm25_encode_us_per_doc``, ``state_write_us_per_doc``).
4. Stream: ``bench/stream_freshness.py --load 0.5`` with ``--sparse none`` and
   ``--sparse bm25``, alternating ``--repeat`` times (each its own process): the best
   p50/p99 freshness and backlog drain of each, their ratios, and every run's figures.

The last stdout line is one JSON object with the machine; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.sinks import QdrantEdgeSink
from embedstream.stream.config import (
    MetricsSettings,
    RetrievalSettings,
    Settings,
    SinkSettings,
    SourceSettings,
)
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.sparse import Bm25Encoder
from embedstream.stream.store import DocState, DocumentWrite

from _common import PASSAGES, SHARED_DATA, log, machine

SCIFACT = SHARED_DATA / "beir" / "scifact" / "corpus.jsonl"
HERE = Path(__file__).resolve().parent


def write_corpus(kind: str, docs: int, path: Path) -> int:
    """``docs`` documents as JSONL ``{"id", "title", "text"}``; how many were written."""
    rows: list[dict[str, str]] = []
    if kind == "scifact":
        with SCIFACT.open(encoding="utf-8") as handle:
            for _, line in zip(range(docs), handle, strict=False):
                row = json.loads(line)
                rows.append({"id": str(row["_id"]), "title": row["title"], "text": row["text"]})
    else:
        for line in PASSAGES.read_text(encoding="utf-8").splitlines()[:docs]:
            pid, text = line.split("\t", 1)
            rows.append({"id": pid, "title": "", "text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def disk_bytes(path: Path) -> int:
    """Allocated bytes under ``path`` (what ``du`` counts)."""
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def one_rebuild(corpus: Path, sparse: str, store: Path) -> dict[str, Any]:
    settings = Settings(
        source=SourceSettings(id_fields=("id",), text_fields=("title", "text")),
        sink=SinkSettings(kind="qdrant-edge", path=store, collection="cost"),
        retrieval=RetrievalSettings(sparse=sparse),  # type: ignore[arg-type]
        metrics=MetricsSettings(enabled=False))
    started = time.perf_counter()
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    seconds = time.perf_counter() - started
    state = [d for d in store.iterdir() if d.is_dir() and d.name.endswith("_state")]
    chunks = [d for d in store.iterdir() if d.is_dir() and not d.name.endswith("_state")]
    return {"seconds": seconds, "docs": report.documents, "chunks": report.chunks,
            "chunk_bytes": sum(map(disk_bytes, chunks)),
            "state_bytes": sum(map(disk_bytes, state)),
            "backend": report.backend, "precision": report.precision}


def freshness(sparse: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(HERE / "stream_freshness.py"), "--load", str(args.load),
               "--duration", str(args.duration), "--backlog", str(args.backlog),
               "--sparse", sparse]
    log(f"running {' '.join(command[1:])}")
    done = subprocess.run(command, capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def bm25_micro(kind: str, docs: int) -> dict[str, Any]:
    """BM25's own cost, measured alone (low noise): encoding a document's whole text,
    and writing document states with and without their sparse vectors to a Qdrant Edge
    store in writes of 20 documents (the stream's batch size at low load)."""
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.jsonl"
        write_corpus(kind, docs, corpus)
        texts = [f"{r['title']}\n\n{r['text']}".strip() for r in map(json.loads,
                                                                    corpus.open())]
        encoder = Bm25Encoder(RetrievalSettings(sparse="bm25"))
        started = time.perf_counter()
        vectors = [encoder.encode_document(t) for t in texts]
        encode_us = (time.perf_counter() - started) / len(texts) * 1e6
        write_us: dict[str, float] = {}
        for sparse in ("none", "bm25", "none", "bm25"):
            sink = QdrantEdgeSink(Path(scratch) / f"{sparse}-{len(write_us)}", "micro")
            sink.open(Fingerprint(model="m", revision="r", dimension=1, normalized=True,
                                  chunker="c", sparse=encoder.spec if sparse == "bm25"
                                  else "none"))
            writes = [DocumentWrite(str(i), DocState(1, i, False),
                                    sparse=vectors[i] if sparse == "bm25" else None)
                      for i in range(len(texts))]
            started = time.perf_counter()
            for at in range(0, len(writes), 20):
                sink.document_states([w.doc_id for w in writes[at:at + 20]])
                sink.apply(writes[at:at + 20])
            took = (time.perf_counter() - started) / len(writes) * 1e6
            write_us[sparse] = min(write_us.get(sparse, took), took)
            sink.close()
    return {"bm25_encode_us_per_doc": round(encode_us, 1),
            "state_write_us_per_doc": {k: round(v, 1) for k, v in write_us.items()}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--corpus", choices=("scifact", "msmarco"), default="scifact")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--load", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--backlog", type=int, default=2000)
    parser.add_argument("--no-stream", action="store_true", help="rebuild and store only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "corpus.jsonl"
        docs = write_corpus(args.corpus, args.docs, corpus)
        for attempt in range(args.repeat):
            for sparse in ("none", "bm25"):
                run = one_rebuild(corpus, sparse, Path(scratch) / f"{sparse}-{attempt}")
                log(f"rebuild sparse={sparse}: {run}")
                if sparse not in best or run["seconds"] < best[sparse]["seconds"]:
                    best[sparse] = run
    none, bm25 = best["none"], best["bm25"]
    result: dict[str, Any] = {
        "rebuild_ratio": round(none["seconds"] / bm25["seconds"], 3),
        "none_docs_per_s": round(docs / none["seconds"], 1),
        "bm25_docs_per_s": round(docs / bm25["seconds"], 1),
        "bytes_per_chunk": round(none["chunk_bytes"] / none["chunks"]),
        "sparse_bytes_per_doc": round((bm25["state_bytes"] - none["state_bytes"]) / docs),
        "state_bytes_per_doc": {"none": round(none["state_bytes"] / docs),
                                "bm25": round(bm25["state_bytes"] / docs)},
        "corpus": args.corpus, "docs": docs, "chunks": none["chunks"],
        "backend": none["backend"], "precision": none["precision"],
    }
    result.update(bm25_micro(args.corpus, docs))
    if not args.no_stream:
        # Alternating, best of each (fastest drain, lowest percentiles): two runs in a row
        # on this shared machine differ by more than BM25 costs.
        runs: dict[str, list[dict[str, Any]]] = {"none": [], "bm25": []}
        for _ in range(args.repeat):
            for sparse in runs:
                runs[sparse].append(freshness(sparse, args))
        for sparse, figures in runs.items():
            result.update({f"{sparse}_p50_ms": min(f["p50_ms"] for f in figures),
                           f"{sparse}_p99_ms": min(f["p99_ms"] for f in figures),
                           f"{sparse}_backlog_per_s": max(f["backlog_per_s"] for f in figures),
                           f"{sparse}_runs": [{k: f[k] for k in (
                               "p50_ms", "p99_ms", "backlog_per_s", "load")} for f in figures]})
        result["backlog_ratio"] = round(result["bm25_backlog_per_s"]
                                        / result["none_backlog_per_s"], 3)
        result["p50_ratio"] = round(result["bm25_p50_ms"] / result["none_p50_ms"], 3)
        result["p99_ratio"] = round(result["bm25_p99_ms"] / result["none_p99_ms"], 3)
        result["cpu_flags"] = runs["none"][0]["cpu_flags"]
    result.update({"wall_s": round(time.perf_counter() - started, 1), "machine": machine()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
