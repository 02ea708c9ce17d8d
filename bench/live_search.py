"""Search latency through the running consumer, while it consumes, against the same
searches in process with the consumer stopped.

Real pieces throughout: the bundled Tansu broker, ``embedstream consume`` as a
subprocess (all-MiniLM-L6-v2 on the CPU, a Qdrant Edge store), MS MARCO passages as
native change events, MS MARCO queries.

1. Backlog: ``--backlog`` passages are produced and the consumer applies them.
2. Live: a producer thread sends the next passages at ``--rate`` events/s (on absolute
   times, so sleeps do not drift) while ``--searches`` queries (k=10, the 100 queries
   cycled) go one after another to the consumer's ``POST /search``, found the way
   ``embedstream search`` finds it (the store's lock and the address beside it). The
   consumer's ``/metrics`` says how many events it applied meanwhile. Then
   ``embedstream search`` itself is timed a few times (``cli_live_s``: no model loaded).
3. Reference, in the same run: the consumer stopped (SIGTERM), the same store opened in
   this process (``build_pipeline``), the same queries embedded and searched one by
   one (``inprocess_*``), and ``embedstream search`` timed once (``cli_local_s``: it
   loads the model).

The last stdout line is one JSON object; progress goes to stderr. The machine may be
shared: ``other_load_cores`` and ``inprocess_other_load_cores`` are the CPU cores used
by processes other than this one during each measured phase (the first counts the
consumer itself, embedding the stream and answering; the phases cannot overlap, as the
store opens in one process at a time).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from embedstream.sinks.edge_holder import holder, served_at
from embedstream.stream.app.broker import free_port
from embedstream.stream.app.query_jobs import QueryJob, search_jobs
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import load_settings
from embedstream.stream.filters import Filter

from _common import (
    MODEL,
    MSMARCO,
    REPO,
    OtherLoad,
    consume_process,
    encoder_info,
    local_broker,
    log,
    machine,
    read_passages,
)

TOPIC = "bench.live"
K = 10
WARMUP = 20


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def event(doc: int, text: str) -> tuple[bytes, bytes]:
    return (json.dumps({"id": doc}).encode(),
            json.dumps({"id": doc, "text": text, "version": 1}).encode())


def applied(metrics_port: int) -> int:
    """Events the consumer has applied, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(m) for m in re.findall(
        r'^embedstream_events_total\{[^}]*outcome="applied"[^}]*\} (\S+)$', text, re.M)))


def wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def service_search(url: str, query: str) -> float:
    address = url.removeprefix("http://").rsplit(":", 1)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(address[0], int(address[1]), timeout=60)
    try:
        connection.request("POST", "/search", json.dumps({"query": query, "k": K}))
        answer = connection.getresponse()
        body = answer.read()
    finally:
        connection.close()
    took = time.perf_counter() - started
    if answer.status != 200 or len(json.loads(body)["hits"]) != K:
        raise RuntimeError(f"search answered {answer.status}: {body[:300]!r}")
    return took


def cli_search(config: Path, query: str) -> float:
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "embedstream.stream.app.cli", "search", query,
                          "-k", str(K), "--config", str(config)], cwd=REPO, timeout=300,
                         capture_output=True, text=True)
    if run.returncode != 0 or len(run.stdout.splitlines()) != K:
        raise RuntimeError(f"embedstream search failed: {run.stderr[-2000:]}")
    return time.perf_counter() - started


def stream_at(producer: Producer, passages: list[str], start: int, rate: float,
              stop: threading.Event, sent: list[int]) -> None:
    """Send ``passages[start:]`` (cycled) at ``rate`` per second until ``stop``."""
    t0, i = time.monotonic(), 0
    while not stop.is_set():
        key, value = event(start + i, passages[(start + i) % len(passages)] + f" (live {i})")
        producer.produce(TOPIC, key=key, value=value)
        producer.poll(0)
        i += 1
        sent[0] = i
        stop.wait(max(0.0, t0 + i / rate - time.monotonic()))
    producer.flush(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=300, help="passages indexed first")
    parser.add_argument("--rate", type=float, default=20.0, help="events/s while searching")
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--cli-runs", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    passages = read_passages(limit=None)
    queries = read_passages(MSMARCO / "queries.tsv")
    jobs = [queries[i % len(queries)] for i in range(args.searches)]
    result: dict[str, Any] = {"bench": "live_search", "searches": args.searches, "k": K,
                              "backlog": args.backlog, "rate_target": args.rate}
    with tempfile.TemporaryDirectory(prefix="live-search-") as scratch, \
            local_broker([TOPIC], partitions=2, log_file=Path(scratch) / "tansu.log") as broker:
        tmp, metrics_port = Path(scratch), free_port()
        config = tmp / "embedstream.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [TOPIC],
                      "group_id": "live-search", "options": {"session.timeout.ms": 6000}},
            "source": {"format": "native"},
            "embed": {"model": MODEL, "device": "cpu"},
            "sink": {"kind": "qdrant-edge", "path": str(tmp / "store"), "collection": "docs"},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
        }))
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 5})
        for i in range(args.backlog):
            key, value = event(i, passages[i])
            producer.produce(TOPIC, key=key, value=value)
        producer.flush(30)
        with (tmp / "consumer.log").open("wb") as output:
            consumer = consume_process(config, output)
        try:
            store = tmp / "store"
            wait(lambda: served_at(store, holder(store, "docs") or "") is not None
                 or consumer.poll() is not None, 300, "the consumer's query endpoint")
            url = served_at(store, holder(store, "docs") or "")
            assert url is not None, (tmp / "consumer.log").read_text()[-3000:]
            log(f"consumer pid {consumer.pid} answers at {url}")
            wait(lambda: applied(metrics_port) >= args.backlog, 300, "the backlog")
            log(f"backlog of {args.backlog} applied")

            stop, sent = threading.Event(), [0]
            streamer = threading.Thread(target=stream_at, args=(
                producer, passages, args.backlog, args.rate, stop, sent))
            streamer.start()
            other = OtherLoad()
            for query in queries[:WARMUP]:
                service_search(url, query)
            before, t0 = applied(metrics_port), time.monotonic()
            live = [service_search(url, query) for query in jobs]
            applied_per_s = (applied(metrics_port) - before) / (time.monotonic() - t0)
            cli_live = [cli_search(config, query) for query in queries[:args.cli_runs]]
            stop.set()
            streamer.join(60)
            result.update({
                "service_ms": percentiles(live), "applied_per_s": round(applied_per_s, 1),
                "events_sent": sent[0], "cli_live_s": round(statistics.median(cli_live), 2),
                "other_load_cores": other.cores()})
            log(f"through the service: {result['service_ms']} ms; applied "
                f"{applied_per_s:.1f} events/s meanwhile")
        finally:
            consumer.send_signal(signal.SIGTERM)
            code = consumer.wait(60)
        result["consumer_exit"] = code

        settings = load_settings(config)
        pipeline = build_pipeline(settings)
        try:
            result["encoder"] = encoder_info(pipeline.embedder)
            result["points"] = sum(1 for _ in pipeline.sink.points())

            def one(query: str) -> float:
                t = time.perf_counter()
                [(_, hits)] = search_jobs(pipeline.embedder, pipeline.sink,
                                          [QueryJob(None, query, Filter())], K)
                assert len(hits) == K
                return time.perf_counter() - t

            for query in queries[:WARMUP]:
                one(query)
            other = OtherLoad()
            reference = [one(query) for query in jobs]
            result["inprocess_other_load_cores"] = other.cores()
        finally:
            pipeline.close()
        result["inprocess_ms"] = percentiles(reference)
        result["cli_local_s"] = round(cli_search(config, queries[0]), 2)
    service, inproc = result["service_ms"], result["inprocess_ms"]
    result.update({
        "p50_ratio": round(service["p50"] / inproc["p50"], 2),
        "p99_ratio": round(service["p99"] / inproc["p99"], 2),
        "wall_s": round(time.perf_counter() - started, 1), "machine": machine()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
