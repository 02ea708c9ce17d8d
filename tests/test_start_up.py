"""Start-up in the right order, and nothing empty in silence (issue 19).

The consumer checks Kafka and the store before it loads the model, creates
nothing when it cannot start, logs librdkafka's lines as JSON and one of a kind
per 10 s; a route whose documents give no text says so.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embedstream.sinks import QdrantEdgeSink
from embedstream.sinks._edge_admin import QdrantEdgeAdmin
from embedstream.stream.app.kafka_logs import RepeatFilter
from embedstream.stream.chunking import Chunk
from embedstream.stream.errors import SinkError
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.skip_watch import NO_CHUNKS_AFTER, SkipWatch

from .test_aliases import FP


def librdkafka_line(thread: str, fac: str = "FAIL") -> logging.LogRecord:
    # As confluent-kafka logs it: "%s [%s] %s" with facility, client name, text.
    return logging.LogRecord("embedstream.librdkafka", logging.ERROR, __file__, 1,
                             "%s [%s] %s", (fac, "rdkafka#producer-1",
                                            f"[thrd:{thread}]: {thread}: Connect failed"), None)


def test_repeated_librdkafka_lines_pass_once_per_ten_seconds_then_say_how_many_were_held() -> None:
    now = [0.0]
    repeat = RepeatFilter(clock=lambda: now[0])
    passed = []
    for second in range(25):
        now[0] = float(second)
        for thread in ("127.0.0.1:1/bootstrap", "127.0.0.1:2/bootstrap"):
            record = librdkafka_line(thread)
            if repeat.filter(record):
                passed.append((second, record.getMessage()))
    # Each broker's line at 0 s, 10 s and 20 s; the later ones count the 9 held back.
    assert [s for s, _ in passed] == [0, 0, 10, 10, 20, 20]
    assert "9 more like it in the last 10 s not shown" in passed[2][1]
    assert "more like it" not in passed[0][1]
    assert repeat.filter(librdkafka_line("127.0.0.1:1/bootstrap", fac="ERROR")), \
        "another kind of line from the same thread passes"
    # Distinct lines of one facility (librdkafka's configuration dump) all pass.
    dump = [logging.LogRecord("embedstream.librdkafka", logging.DEBUG, __file__, 1, "%s [%s] %s",
                              ("CONF", "rdkafka#producer-1", f"[thrd:app]: {name} = x"), None)
            for name in ("client.id", "sasl.password", "sasl.username")]
    assert all(repeat.filter(line) for line in dump)


def test_the_store_probe_creates_nothing_and_names_the_process_holding_a_collection(
        tmp_path: Path) -> None:
    store = tmp_path / "store"
    QdrantEdgeAdmin(store).probe("docs")  # a store to be made: fine, and not made yet
    assert not store.exists()
    sink = QdrantEdgeSink(store, "docs")
    sink.open(FP)
    try:
        with pytest.raises(SinkError, match=rf"in use by this process \(pid {os.getpid()}\)"):
            QdrantEdgeAdmin(store).probe("docs")
    finally:
        sink.close()
    QdrantEdgeAdmin(store).probe("docs")  # released: fine
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(SinkError, match=r"sink\.path"):
            QdrantEdgeAdmin(read_only / "store").probe("docs")


@pytest.mark.slow
def test_an_unreachable_broker_stops_the_start_before_the_model_loads_and_creates_nothing(
        tmp_path: Path) -> None:
    config = tmp_path / "embedstream.yaml"
    store = tmp_path / "store"
    config.write_text(json.dumps({
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        # A model that does not exist: loading it would fail with another message.
        "embed": {"model": str(tmp_path / "no-such-model")},
        "sink": {"path": str(store)}, "metrics": {"enabled": False}}))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "embedstream.stream.app.cli", "consume",
                           "--config", str(config)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("embedstream: error: cannot reach Kafka at 127.0.0.1:1")
    assert "no-such-model" not in done.stderr, "the model is never loaded"
    for line in lines[:-1]:  # librdkafka's lines are JSON log lines, one of a kind
        entry = json.loads(line)
        assert entry["logger"] == "embedstream.librdkafka"
    assert len(lines) <= 3
    assert not store.exists(), "nothing is created in the store"


def upsert(doc: str, text: str, chunks: int) -> PreparedEvent:
    event = ChangeEvent(doc, Op.UPSERT, 1, Position("t", 0, 1), text)
    return PreparedEvent(event, [Chunk(i, 0, len(text), text, 1, f"h{i}")
                                 for i in range(chunks)])


def test_documents_without_text_are_counted_and_a_route_that_never_chunks_raises_the_alarm(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    watch = SkipWatch(metrics, "debezium", "articles")

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"route": "articles", **labels})

    assert value("embedstream_route_without_chunks") == 0
    with caplog.at_level(logging.WARNING, logger="embedstream.consumer"):
        for n in range(NO_CHUNKS_AFTER):
            watch.taken(upsert(f"d{n}", "", 0))
        assert value("embedstream_route_without_chunks") == 0
        watch.taken(upsert("last", " \n", 0))
        watch.taken(None)  # a dead letter counts for neither
    assert value("embedstream_empty_documents_total", reason="no_text") == NO_CHUNKS_AFTER + 1
    assert value("embedstream_route_without_chunks") == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, "the first document without text, then the route's alarm"
    assert "'d0'" in warnings[0] and "text_fields" in warnings[0]
    assert "101 documents" in warnings[1]
    watch.taken(upsert("ok", "Some text.", 1))
    assert value("embedstream_route_without_chunks") == 0


def test_a_taken_query_port_stops_the_start_before_anything_is_made(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import socket

    from embedstream.stream.app import cli

    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # consume installs handlers
    store = tmp_path / "store"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "embedstream.yaml"
        config.write_text(json.dumps({
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},
            "embed": {"model": str(tmp_path / "no-such-model")},
            "sink": {"path": str(store)}, "metrics": {"enabled": False},
            "query": {"port": port}}))
        started = time.monotonic()
        assert cli.main(["consume", "--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in error and "query.port" in error
    assert time.monotonic() - started < 5, "before Kafka is tried or the model loads"
    assert not store.exists()
