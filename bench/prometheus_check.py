"""A real Prometheus scraping a real consumer: do the dashboard's queries give figures?

Starts the bundled Tansu broker, ``embedstream consume`` as a subprocess (native
source, Qdrant Edge in a temporary directory, the default model, metrics on a free
port), and ``prometheus`` (``--prometheus``, default ``/usr/bin/prometheus``;
Debian's ``prometheus`` package) scraping it every 2 s. A producer sends native
events at ``--rate`` per second for ``--duration`` seconds, each stamped with its
produce time (``ts_ms``) so freshness is measured. Then it asks Prometheus's HTTP
API for p50/p99 freshness, total lag and events/s, prints what it read, and as its
last stdout line one JSON object with those figures. Everything it started is
stopped at the end, also on failure.

Not measured here: anything about throughput limits (see stream_freshness.py).
The figures are Prometheus's view (rates over 30 s windows, histogram buckets),
so they are coarse by design; ``null`` means the query returned no series.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from _common import MODEL, consume_process, free_port, local_broker, log, machine

TOPIC = "docs"
_FRESHNESS = "sum(rate(embedstream_freshness_seconds_bucket[30s])) by (le)"
QUERIES = {
    "freshness_p50_s": f"histogram_quantile(0.5, {_FRESHNESS})",
    "freshness_p99_s": f"histogram_quantile(0.99, {_FRESHNESS})",
    "lag_messages": "sum(embedstream_consumer_lag_messages)",
    "events_per_s": "sum(rate(embedstream_events_total[30s]))",
}


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body


def wait_http(url: str, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer at {url} in {timeout_s:.0f}s") from None
            time.sleep(0.5)


def query(prom: str, expr: str) -> float | None:
    """The single value of an instant query, or None when it returned no series."""
    url = f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    answer = json.loads(get(url))
    if answer.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: {answer}")
    result = answer["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else round(value, 4)  # NaN: no events in the window


def scrape_health(prom: str) -> str:
    targets = json.loads(get(f"{prom}/api/v1/targets"))["data"]["activeTargets"]
    return ", ".join(f"{t['scrapeUrl']}={t['health']}" for t in targets) or "no targets"


def stop(process: subprocess.Popen[bytes] | None, name: str) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        log(f"{name} did not stop on SIGTERM; killing it")
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=4.0, help="events per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of producing")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "/usr/bin/prometheus")
    parser.add_argument("--model", default=MODEL)
    args = parser.parse_args(argv)
    if not Path(args.prometheus).exists():
        log(f"no prometheus binary at {args.prometheus} (apt-get install prometheus)")
        return 2

    consumer: subprocess.Popen[bytes] | None = None
    prometheus: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="prometheus-check-") as scratch, \
            local_broker([TOPIC], partitions=2, log_file=Path(scratch) / "tansu.log") as broker:
        try:
            tmp = Path(scratch)
            metrics_port, prom_port = free_port(), free_port()
            # JSON is YAML: both configs are written with json (no YAML writer needed).
            config = tmp / "embedstream.yaml"
            config.write_text(json.dumps({
                "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [TOPIC],
                          "group_id": "prometheus-check",
                          "options": {"session.timeout.ms": 6000}},
                "source": {"format": "native"},
                "embed": {"model": args.model, "device": "cpu"},
                "sink": {"kind": "qdrant-edge", "path": str(tmp / "store"),
                         "collection": "docs"},
                "metrics": {"enabled": True, "host": "127.0.0.1", "port": metrics_port},
            }))
            with (tmp / "consumer.log").open("wb") as output:
                consumer = consume_process(config, output)
            log(f"consumer: pid {consumer.pid}, metrics on 127.0.0.1:{metrics_port}")
            wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 180, "the consumer (ready)")

            prom_config = tmp / "prometheus.yml"
            prom_config.write_text(json.dumps({
                "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
                "scrape_configs": [{"job_name": "embedstream", "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
            }))
            prom = f"http://127.0.0.1:{prom_port}"
            prometheus = subprocess.Popen(
                [args.prometheus, f"--config.file={prom_config}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=(tmp / "prometheus.log").open("wb"), stderr=subprocess.STDOUT)
            log(f"prometheus: pid {prometheus.pid} on {prom}")
            wait_http(f"{prom}/-/ready", 60, "prometheus")

            producer = Producer({"bootstrap.servers": broker.bootstrap_servers,
                                 "linger.ms": 5})
            sent = 0
            started = time.monotonic()
            log(f"producing {args.rate:g} events/s for {args.duration:g}s ...")
            while (elapsed := time.monotonic() - started) < args.duration:
                due = int(elapsed * args.rate) + 1
                while sent < due:
                    doc = f"doc-{sent % 50}"  # updates as well as creates
                    producer.produce(TOPIC, key=doc.encode(), value=json.dumps({
                        "id": doc, "version": sent + 1, "ts_ms": int(time.time() * 1000),
                        "text": f"Revision {sent} of document {doc}: a change event that "
                                "embedstream embeds and writes to the vector store.",
                    }).encode())
                    sent += 1
                producer.poll(0)
                # Sleep to the next scheduled send (absolute schedule: no drift).
                time.sleep(max(0.0, started + sent / args.rate - time.monotonic()))
            producer.flush(30)
            producer.close()  # before the broker stops: no disconnect noise on stderr
            time.sleep(6)  # the last events applied and scraped (3 scrape intervals)

            figures: dict[str, Any] = {name: query(prom, expr) for name, expr in QUERIES.items()}
            for name, expr in QUERIES.items():
                print(f"{name:18} {figures[name]!s:>10}   {expr}")
            applied = query(prom, 'sum(embedstream_events_total{outcome="applied"})')
            print(f"{'applied_total':18} {applied!s:>10}   (sent {sent})")
            print(f"scrape targets: {scrape_health(prom)}")
            figures.update(sent=sent, applied=applied, rate=args.rate,
                           duration_s=args.duration, scrape_interval_s=2, machine=machine())
            print(json.dumps(figures, sort_keys=True))
            return 0
        except BaseException:
            log("failed; consumer log tail:")
            if (Path(scratch) / "consumer.log").exists():
                log((Path(scratch) / "consumer.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            stop(prometheus, "prometheus")
            stop(consumer, "consumer")


if __name__ == "__main__":
    raise SystemExit(main())
