"""The shipped dashboard and alert rules: the rules pass ``promtool check`` and
their unit tests, every dashboard query is valid PromQL, and every metric either
references is one a real consumer (and a real rebuild) exports on ``/metrics``."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.health import Health, serve_http
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "helm" / "embedstream" / "files"
ALERTS = FILES / "alerts.yaml"
DASHBOARD = FILES / "dashboard.json"
ALERT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
_NAME = re.compile(r"\bembedstream_[a-z_]+")
_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus; `make setup` "
                    "does it when run as root)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def sample_value(exposition: str, name: str) -> float | None:
    """The value of the unlabelled sample ``name``, or the sum of its labelled ones."""
    values = [float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", exposition, re.MULTILINE)]
    return sum(values) if values else None


def series_names(exposition: str) -> set[str]:
    """The sample names Prometheus stores for the exposition's metrics, from their
    ``# TYPE`` lines, so a labelled metric counts even before its first child:
    counters as written (``*_total``), histograms as ``_bucket``/``_sum``/``_count``,
    gauges (and info metrics, exposed as gauges) as written."""
    names: set[str] = set()
    for name, kind in _TYPE.findall(exposition):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target and query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            found.append((f"variable {var['name']}", var["query"]["query"]))
    return found


def alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by what they stand for in a plain query."""
    return (expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")
            .replace("$job", ".*").replace("$route", ".*"))


# -- rules -------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    checked = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "11 rules found" in checked.stdout
    tested = subprocess.run([tool, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert {name for name, _ in alert_expressions()} == {
        "EmbedstreamLagGrowing", "EmbedstreamFreshnessSLO", "EmbedstreamDLQRate",
        "EmbedstreamStalled", "EmbedstreamSinkErrors", "EmbedstreamNotReady",
        "EmbedstreamStoreDiskFull", "EmbedstreamStoreDiskFilling", "EmbedstreamSourceOnlySkipped",
        "EmbedstreamRouteWithoutChunks", "EmbedstreamStoreMaintenanceSlow"}
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])


# -- dashboard -----------------------------------------------------------------------------


def test_the_dashboard_has_its_panels_and_every_query_is_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    datasource = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("lag", "freshness", "events", "embedded vs reused", "token fill",
                   "latency p99", "sink errors", "dlq", "paused", "ready", "commits / s",
                   "since last commit", "padding", "rebuild progress"):
        assert wanted in titles, f"no panel about {wanted!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
    # promtool parses each query as a recording rule: a syntax error fails the check.
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(queries) if not expr.startswith("label_values(")]}]}
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_route_labelled_panels_follow_the_route_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    route = next(v for v in dashboard["templating"]["list"] if v["name"] == "route")
    assert route["query"]["query"].startswith("label_values(embedstream_events_total{")
    assert route["query"]["query"].endswith(", route)") and route["includeAll"] is True
    labelled = ("embedstream_events_total", "embedstream_skipped_total",
                "embedstream_source_only_skipped", "embedstream_dlq_records_total",
                "embedstream_freshness_seconds")
    filtered = set()
    for title, expr in dashboard_queries():
        if any(name in expr for name in labelled) and not title.startswith("variable"):
            assert 'route=~"$route"' in expr, title
            assert "by (route, " in expr or "by (route)" in expr, title  # a line per route
            filtered |= {name for name in labelled if name in expr}
    assert filtered == set(labelled)


# -- what the service exports -------------------------------------------------------------


@pytest.fixture()
def consumer_exposition(broker: LocalBroker, tmp_path: Path,
                        tiny_model_dir: Path) -> Iterator[str]:
    """``/metrics`` of a real consumer that applied a few documents and dead-lettered
    an undecodable message, scraped over HTTP."""
    topic, group = unique("obs"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": group, "options": {"session.timeout.ms": 6000}},
        source={"format": "native"}, embed={"model": str(tiny_model_dir)},
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 0},
        metrics={"enabled": False},
    )
    metrics = Metrics()
    health = Health(60.0, ready_gauge=metrics.ready)
    port = free_port()
    serve_http(metrics, health, "127.0.0.1", port)
    pipeline = build_pipeline(settings)
    stream = build_consumer(pipeline, metrics, health=health)
    try:
        good = [(f"d{i}".encode(), json.dumps({"id": f"d{i}", "text": f"Document {i}. " * 5,
                                               "version": 1, "ts_ms": int(time.time() * 1000)})
                 .encode()) for i in range(4)]
        produce(broker.bootstrap_servers, topic, [*good, (b"bad", b"\xff\xfe not json")])
        def done() -> bool:
            text = scrape(port)
            return ((sample_value(text, "embedstream_events_total") or 0) >= 5
                    and (sample_value(text, "embedstream_commits_total") or 0) >= 1
                    and sample_value(text, "embedstream_consumer_lag_messages") is not None)

        run_until(stream, done, 60, "the events, a commit and the lag on /metrics")
        yield scrape(port)
    finally:
        stream.close()
        pipeline.close()


@pytest.mark.slow
def test_every_metric_the_dashboard_and_alerts_use_is_exported(
        consumer_exposition: str) -> None:
    text = consumer_exposition
    # The labelled series a dashboard shows once events flow really appear.
    for name in ("embedstream_events_total", "embedstream_dlq_records_total",
                 "embedstream_chunks_total", "embedstream_freshness_seconds_bucket",
                 "embedstream_embed_padding_ratio_count",
                 "embedstream_sink_operation_duration_seconds_bucket"):
        assert (sample_value(text, name) or 0) > 0, name
    assert sample_value(text, "embedstream_consumer_lag_messages") is not None
    assert sample_value(text, "embedstream_ready") == 1.0
    assert (sample_value(text, "embedstream_last_commit_timestamp_seconds") or 0) > 0
    exported = series_names(text)
    referenced = {(where, name) for where, expr in dashboard_queries() + alert_expressions()
                  for name in _NAME.findall(expr)}
    missing = sorted((where, name) for where, name in referenced if name not in exported)
    assert not missing, f"queries use metrics the service does not export: {missing}"
    # Both files use the new metrics, so the check above covers them too.
    names = {name for _, name in referenced}
    assert {"embedstream_embed_padding_ratio_sum", "embedstream_rebuild_progress_ratio",
            "embedstream_rebuild_records_total"} <= names


def test_a_rebuild_serves_its_progress(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "title": f"Title {i}",
                                          "text": f"Body of document {i}. " * (1 + i % 7)})
                              + "\n" for i in range(40)) + "not json\n")
    port = free_port()
    settings = Settings(source={"id_fields": ["_id"], "text_fields": ["title", "text"]},
                        embed={"model": str(tiny_model_dir), "backend": "torch",
                               "precision": "fp32"},
                        sink={"path": str(tmp_path / "store"), "collection": "docs"},
                        metrics={"enabled": True, "host": "127.0.0.1", "port": port})
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    assert (report.records, report.failures) == (41, 1)
    # The server outlives the run (a daemon thread), so the final figures are readable.
    text = scrape(port)
    assert sample_value(text, "embedstream_rebuild_records_total") == report.records
    assert sample_value(text, "embedstream_rebuild_chunks_total") == report.chunks
    assert sample_value(text, "embedstream_rebuild_failures_total") == report.failures
    assert sample_value(text, "embedstream_rebuild_progress_ratio") == 1.0
    padding = sample_value(text, "embedstream_rebuild_padding_ratio")
    assert padding is not None and abs(padding - report.padding_fraction) < 1e-3
    assert sample_value(text, "embedstream_ready") == 1.0


def test_a_rebuild_given_metrics_fills_them_without_serving(tmp_path: Path,
                                                            tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "text": f"Text {i}. " * 3}) + "\n"
                              for i in range(10)))
    settings = Settings(source={"id_fields": ["_id"], "text_fields": ["text"]},
                        embed={"model": str(tiny_model_dir)},
                        sink={"path": str(tmp_path / "store"), "collection": "docs"},
                        metrics={"enabled": False})
    metrics = Metrics()
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False),
                     metrics=metrics)
    value: Any = metrics.registry.get_sample_value
    assert value("embedstream_rebuild_records_total") == report.records == 10
    assert value("embedstream_rebuild_chunks_total") == report.chunks
    assert value("embedstream_rebuild_failures_total") == 0
    assert value("embedstream_rebuild_progress_ratio") == 1.0


def test_the_embedder_counts_the_padding_of_its_forward_passes(tiny_model_dir: Path) -> None:
    from embedstream.stream.embedding import pack_batches
    from embedstream.stream.local_encoder import LocalEncoder

    embedder = LocalEncoder(str(tiny_model_dir), device="cpu", batch_tokens=64)
    texts = ["short", "a somewhat longer text " * 3, "mid length text here"]
    lengths = [len(embedder.tokenizer(t)["input_ids"]) for t in texts]
    embedder.embed(texts)
    assert embedder.last_tokens == sum(lengths)
    # Packing (longest first, 64 padded tokens a pass at most, cut where cheapest)
    # decides the padded positions.
    packed = pack_batches(lengths, 64, call_tokens=embedder.runner.call_tokens)
    assert embedder.last_padded_tokens == sum(len(b) * max(lengths[i] for i in b) for b in packed)
    assert embedder.last_padded_tokens > embedder.last_tokens
    embedder.embed([])
    assert (embedder.last_tokens, embedder.last_padded_tokens) == (0, 0)
