"""Rebuild memory against corpus size: peak RSS of ``rebuild --source kafka`` at two sizes.

A topic of N small documents (native events, one short sentence each) is
produced to the bundled broker, then ``embedstream rebuild --source kafka
--no-handover`` runs in a subprocess of its own into a Qdrant Edge store (``--into
store``, the default: the store lives in the rebuild's process, so its memory counts)
or into a vector file (``--into npy|parquet``, ``--output``: the rebuild's own memory,
the fold and the pipeline, without a store's); its peak RSS is the kernel's (``wait4``
rusage). Embedding is not what this measures: the
embedder is a **cheap stand-in** (the test embedding server answering random unit
vectors of ``--dimension`` over the OpenAI-compatible API), so the model's memory
is not in the figures and the run takes minutes, not hours.

The last line: ``peak_rss_ratio`` (largest size over the smallest; the goal of
issue 24: <= 1.2 for 1M against 100K) with each size's figures and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from confluent_kafka import Producer

from embedstream.stream.app.embedding_server import EmbeddingServer

from _common import local_broker, log, machine


def cheap_encode(dimension: int) -> object:
    """Random unit vectors (a stand-in embedder: the rebuild's memory is the measure)."""
    rng = np.random.default_rng(7)

    def encode(texts: list[str]) -> tuple[npt.NDArray[np.float32], int]:
        vectors = rng.standard_normal((len(texts), dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors, sum(len(t.split()) for t in texts)

    return encode


def produce(bootstrap: str, topic: str, docs: int) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50,
                         "batch.num.messages": 10000, "queue.buffering.max.messages": 500000})
    started = time.perf_counter()
    for i in range(docs):
        value = json.dumps({"id": f"doc-{i}", "version": 1,
                            "text": f"Document {i} is about subject {i * 7919 % 1000}."})
        while True:
            try:
                producer.produce(topic, key=f"doc-{i}".encode(), value=value.encode())
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("not everything was produced")
    return time.perf_counter() - started


def rebuild_peak(bootstrap: str, topic: str, store: Path, api: str,
                 into: str) -> dict[str, float]:
    config = store.parent / f"{topic}.json"
    config.write_text(json.dumps({
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": f"g-{topic}",
                  "options": {"session.timeout.ms": 6000}},
        "source": {"format": "native", "text_fields": ["text"]},
        "embed": {"provider": "openai", "model": "cheap-stand-in", "api_base": api,
                  "request_max_inputs": 512, "max_concurrency": 2},
        "sink": {"path": str(store), "collection": "docs"},
        "metrics": {"enabled": False}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_")}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "rebuild", "--config",
         str(config), "--source", "kafka", "--no-handover",
         *([] if into == "store" else ["--output", str(store.with_suffix(f".{into}"))])],
        env={**env, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    assert child.stderr is not None
    peaks = {"RssAnon": 0, "RssFile": 0}
    sampler = threading.Thread(target=sample_status, args=(child.pid, peaks), daemon=True)
    sampler.start()
    tail = child.stderr.read().decode(errors="replace")[-2000:]
    _, status, usage = os.wait4(child.pid, 0)
    sampler.join(5)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"rebuild failed ({child.returncode}): {tail}")
    return {"rebuild_s": round(time.perf_counter() - started, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
            # Sampled every 0.1 s: anonymous memory (the process's own) and mapped files
            # (the store's pages, which the kernel may drop and read back).
            "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"]}


def sample_status(pid: int, peaks: dict[str, int]) -> None:
    path = Path(f"/proc/{pid}/status")
    while True:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            name, _, value = line.partition(":")
            if name in peaks:
                peaks[name] = max(peaks[name], int(value.split()[0]) * 1024)
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--docs", default="100000,1000000",
                        help="comma-separated corpus sizes (documents)")
    parser.add_argument("--dimension", type=int, default=32)
    parser.add_argument("--into", choices=("store", "npy", "parquet"), default="store",
                        help="the rebuild's target: the Qdrant Edge store (in the rebuild's "
                        "process, so its memory counts), or a vector file (--output)")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.docs.split(",")]
    topics = [f"memory-{n}" for n in sizes]
    results = []
    with local_broker(topics) as broker, tempfile.TemporaryDirectory() as scratch, \
            EmbeddingServer(cheap_encode(args.dimension), model="cheap-stand-in") as api:
        for size, topic in zip(sizes, topics, strict=True):
            produce_s = produce(broker.bootstrap_servers, topic, size)
            log(f"{size} documents produced in {produce_s:.1f} s; rebuilding")
            figures = rebuild_peak(broker.bootstrap_servers, topic,
                                   Path(scratch) / f"store-{size}", api.url, args.into)
            line = {"docs": size, **figures,
                    "rss_bytes_per_doc": round(figures["peak_rss_bytes"] / size, 1),
                    "produce_s": round(produce_s, 1), "into": args.into,
                    "embedder": f"stand-in: random unit vectors, dimension {args.dimension}"}
            log(json.dumps(line))
            results.append(line)
    print(json.dumps({
        "peak_rss_ratio": round(results[-1]["peak_rss_bytes"] / results[0]["peak_rss_bytes"], 3),
        "peak_anon_ratio": round(results[-1]["peak_anon_bytes"] / results[0]["peak_anon_bytes"],
                                 3),
        "into": args.into, "sizes": sizes, "peak_rss_bytes": [r["peak_rss_bytes"] for r in results],
        "rebuild_s": [r["rebuild_s"] for r in results], "runs": results,
        "machine": machine()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
