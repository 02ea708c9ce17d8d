"""Live queries end to end: ``embedstream consume`` as a subprocess on the real broker
(the tiny model, a Qdrant Edge store), and, while it consumes, ``embedstream search``
and ``export`` answered by it: a document just produced is found, filters and
``--queries`` work, updates and deletes show, bad requests get a clear 4xx, searches
keep answering while events stream in, and the address record goes when it stops.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.sinks.edge_holder import holder, served_at
from embedstream.stream.app import cli, search_cmd
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.devdata import debezium_value

from .streamkit import create_topic, produce, unique, wait_for

CATEGORIES = ("books", "toys", "tools")


def event(doc: int, text: str | None, lsn: int) -> tuple[bytes, bytes]:
    """A Debezium create/update of document ``doc`` (a delete when ``text`` is None)."""
    key = json.dumps({"id": doc}).encode()
    row = None if text is None else {"id": doc, "text": text, "category": CATEGORIES[doc % 3]}
    before = {"id": doc} if text is None else None
    value = debezium_value("d" if text is None else "c", before, row, lsn, source_ts_ms=lsn)
    return key, value


def text_of(doc: int, revision: int = 0) -> str:
    return f"catalogue entry {doc} revision {revision}: " + " ".join(
        f"w{(doc * 7919 + revision * 104729 + i) % 5003}" for i in range(12))


class Consumer:
    """``embedstream consume`` in a subprocess, its output in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "embedstream.stream.app.cli", "consume", "--config",
             str(config)], stdout=log.open("ab"), stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


@pytest.fixture
def consuming(broker: LocalBroker, tiny_model_dir: Path, tmp_path: Path
              ) -> Iterator[tuple[Path, str, Consumer]]:
    topic = unique("live")
    create_topic(broker.bootstrap_servers, topic, partitions=2)
    config = tmp_path / "embedstream.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
                  "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        "source": {"text_fields": ["text"], "filter_fields": {"category": "keyword"}},
        "embed": {"model": str(tiny_model_dir), "max_batch_tokens": 1024},
        "sink": {"path": str(tmp_path / "store"), "collection": "live",
                 "flush_interval_ms": 200},
        "metrics": {"enabled": False},
    }))
    consumer = Consumer(config, tmp_path / "consumer.log")
    try:
        yield config, topic, consumer
    finally:
        consumer.stop()


def search(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> list[Any]:
    code = cli.main(["search", *args, "--json", "--config", str(config)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def top(capsys: pytest.CaptureFixture[str], config: Path, text: str) -> str | None:
    hits = search(capsys, config, text, "-k", "1")
    return hits[0]["doc_id"] if hits else None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_and_export_are_answered_by_the_running_consumer(
        consuming: tuple[Path, str, Consumer], broker: LocalBroker, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], cli_logging: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config, topic, consumer = consuming
    bootstrap, store = broker.bootstrap_servers, tmp_path / "store"
    produce(bootstrap, topic, [event(d, text_of(d), 10 + d) for d in range(30)])
    wait_for(lambda: (holder(store, "live") is not None and served_at(
        store, holder(store, "live") or "") is not None) or consumer.process.poll() is not None,
        120, "the consumer to hold the store and answer queries")
    assert consumer.process.poll() is None, consumer.log.read_text()[-3000:]
    pid = holder(store, "live")
    url = served_at(store, pid or "")
    assert pid == str(consumer.process.pid) and url and url.startswith("http://127.0.0.1:")
    # No model in this process: every answer comes from the consumer.
    monkeypatch.setattr(search_cmd, "build_pipeline", lambda *_: pytest.fail("loaded a model"))
    wait_for(lambda: top(capsys, config, text_of(29)) == "29", 120, "the 30 documents")

    # A document just produced is found, through the service.
    produced = time.monotonic()
    produce(bootstrap, topic, [event(30, text_of(30), 100)])
    wait_for(lambda: top(capsys, config, text_of(30)) == "30", 60, "the new document")
    found_s = time.monotonic() - produced

    toys = search(capsys, config, text_of(4), "-k", "50", "--filter", "category=toys")
    assert toys[0]["doc_id"] == "4" and {h["doc_id"] for h in toys} == {
        str(d) for d in range(31) if d % 3 == 1}
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(
        {"id": f"q{d}", "text": text_of(d), **({"filter": {"category": "tools"}} if d == 5
                                               else {})}) + "\n" for d in range(31)))
    answers = search(capsys, config, "--queries", str(queries), "-k", "2")
    assert [a["id"] for a in answers] == [f"q{d}" for d in range(31)]
    assert all(a["hits"][0]["doc_id"] == a["id"][1:] for a in answers)

    # Updates and deletes show as soon as they are applied.
    produce(bootstrap, topic, [event(7, text_of(7, 1), 200), event(8, None, 201)])
    wait_for(lambda: top(capsys, config, text_of(7, 1)) == "7" and all(
        h["doc_id"] != "8" for h in search(capsys, config, text_of(8), "-k", "50")),
        60, "the update and the delete")

    assert cli.main(["export", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    exported = [json.loads(line) for line in out.splitlines()]
    assert sorted(int(p["payload"]["doc_id"]) for p in exported) == [
        d for d in range(31) if d != 8]
    assert f"from the running consumer (pid {pid})" in err

    # The real command, as a user runs it: answered without loading a model.
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "embedstream.stream.app.cli", "search",
                          text_of(12), "-k", "1", "--config", str(config)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    command_s = time.monotonic() - started
    assert run.returncode == 0 and run.stdout.split()[1] == "12", run.stderr
    assert "asking the running consumer" in run.stderr

    # Clear refusals, over HTTP as any client would see them.
    host, port = url.removeprefix("http://").rsplit(":", 1)
    for body, code, says in ((b'{"query": "x", "route": "nope"}', 404, "no route"),
                             (b"{", 400, "not JSON"),
                             (b'{"query": "' + b"x" * 2_000_000 + b'"}', 413, "limit")):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request("POST", "/search", body)
            answer = connection.getresponse()
            assert answer.status == code and says in answer.read().decode()
        finally:
            connection.close()

    print(f"new document found through the service {found_s:.2f} s after producing; "
          f"`embedstream search` subprocess {command_s:.2f} s")
    assert consumer.stop() == 0, consumer.log.read_text()[-3000:]
    assert served_at(store, pid or "") is None and holder(store, "live") is None
    assert "Traceback" not in consumer.log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_searches_keep_answering_while_events_stream_in(
        consuming: tuple[Path, str, Consumer], broker: LocalBroker, tmp_path: Path) -> None:
    """Three clients search while 250 events arrive: the loop (embedding and writing) and
    the query thread share the model and the store. Every search answers, the consumer
    applies every event, and it logs no error."""
    _config, topic, consumer = consuming
    bootstrap, store = broker.bootstrap_servers, tmp_path / "store"
    produce(bootstrap, topic, [event(d, text_of(d), 10 + d) for d in range(10)])
    wait_for(lambda: served_at(store, holder(store, "live") or "") is not None
             or consumer.process.poll() is not None, 120, "the consumer's query endpoint")
    url = served_at(store, holder(store, "live") or "")
    assert url is not None, consumer.log.read_text()[-3000:]
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stop, statuses, sent = threading.Event(), [], [0]
    latest: dict[int, str] = {}  # each streamed document's last text

    def producer() -> None:
        lsn = 1000
        while not stop.is_set():  # ~50 events/s, documents 10..209 created and updated
            docs = [10 + (lsn + i) % 200 for i in range(5)]
            batch = [event(doc, text_of(doc, lsn + i), lsn + i) for i, doc in enumerate(docs)]
            produce(bootstrap, topic, batch)
            latest.update({doc: text_of(doc, lsn + i) for i, doc in enumerate(docs)})
            sent[0] += len(batch)
            lsn += 5
            stop.wait(0.1)

    def found(doc: int, text: str) -> bool:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request("POST", "/search", json.dumps({"query": text, "k": 1}))
            hits = json.loads(connection.getresponse().read())["hits"]
            return bool(hits) and hits[0]["doc_id"] == str(doc) and hits[0]["text"] == text
        finally:
            connection.close()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                connection.request("POST", "/search", json.dumps(
                    {"query": text_of((n + i) % 10), "k": 3,
                     "filter": {"category": CATEGORIES[(n + i) % 10 % 3]}}))
                answer = connection.getresponse()
                hits = json.loads(answer.read())["hits"] if answer.status == 200 else []
                statuses.append((answer.status, hits[0]["doc_id"] if hits else None,
                                 str((n + i) % 10)))
            finally:
                connection.close()

    wait_for(lambda: all(found(doc, text_of(doc)) for doc in range(10)), 120,
             "the first 10 documents")
    threads = [threading.Thread(target=producer)] + [
        threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: sent[0] >= 250, 60, "250 events streamed")  # ~5 s of searching
    stop.set()
    for thread in threads:
        thread.join(60)
    assert len(statuses) > 30 and all(status == 200 for status, _, _ in statuses), statuses
    assert all(top == wanted for _, top, wanted in statuses), statuses
    wait_for(lambda: all(found(doc, text) for doc, text in list(latest.items())[-20:]), 60,
             "the last events streamed to be applied")
    assert consumer.process.poll() is None
    assert consumer.stop() == 0
    log = consumer.log.read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]
