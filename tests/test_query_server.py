"""The running consumer's query endpoint, in process: a real Qdrant Edge store, the tiny
model, the HTTP server; the consumer loop stood in for by whatever writes the store.

What a user checks: answers equal a search run in process, filters and batches work,
bad requests get a clear 4xx, the port is loopback by default, an export streams every
point, `search` and `export` ask the service (no model loaded) while it holds the
store, and a search follows the collection the stream writes now.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embedstream.sinks.edge_holder import holder, served_at
from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.app import cli, search_cmd
from embedstream.stream.app.query_jobs import QueryJob, hit_json, search_jobs
from embedstream.stream.app.query_server import QueryServer, start_query_server
from embedstream.stream.app.service import Pipeline, build_pipeline
from embedstream.stream.config import QuerySettings, Settings, load_settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.filters import Filter, parse_filter
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Sink

CATEGORIES = ("books", "toys", "tools")
TEXTS = [f"{word} number {i} of the catalogue" for i, word in enumerate(
    ["lighthouse", "printing press", "sea stories", "kite", "hammer", "lantern", "compass",
     "ladder", "anchor", "violin", "teapot", "bicycle"])]


class Stream:
    """Stands in for the consumer: ``sinks`` are the stores it writes now."""

    def __init__(self, sinks: dict[str, Sink]) -> None:
        self.sinks = sinks


def write_docs(pipeline: Pipeline, sink: Sink, texts: list[str], prefix: str = "d") -> None:
    vectors = pipeline.embedder.embed(texts)
    sink.apply([DocumentWrite(f"{prefix}{i}", DocState(1, i, False), [ChunkPoint(0, vector, {
        "doc_id": f"{prefix}{i}", "chunk_index": 0, "text": text,
        "category": CATEGORIES[i % 3]})]) for i, (text, vector) in enumerate(zip(
            texts, vectors, strict=True))])


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("live")
    file = tmp / "embedstream.yaml"
    file.write_text(yaml.safe_dump({
        "source": {"filter_fields": {"category": "keyword"}},
        "embed": {"model": str(tiny_model_dir), "device": "cpu"},
        "sink": {"path": str(tmp / "store"), "collection": "shop"},
        "metrics": {"enabled": False},
        "query": {"max_body_bytes": 4096},
    }))
    return file


@pytest.fixture(scope="module")
def live(config: Path) -> Iterator[tuple[QueryServer, Pipeline, Stream]]:
    settings = load_settings(config)
    pipeline = build_pipeline(settings)
    write_docs(pipeline, pipeline.sink, TEXTS)
    stream = Stream(dict(pipeline.sinks))
    server = start_query_server(settings, pipeline, stream)  # type: ignore[arg-type]
    yield server, pipeline, stream
    server.close()
    pipeline.close()


def call(server: QueryServer, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    assert server.url is not None
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, data, headers or {})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def local(pipeline: Pipeline, text: str, k: int, expressions: list[str]) -> list[dict[str, Any]]:
    fields = pipeline.settings.source.filter_fields
    job = QueryJob(None, text, parse_filter(expressions, fields) if expressions else Filter())
    [(_, hits)] = search_jobs(pipeline.embedder, pipeline.sink, [job], k)
    return [hit_json(hit) for hit in hits]


def test_a_search_answers_as_the_same_search_in_process(
        live: tuple[QueryServer, Pipeline, Stream]) -> None:
    server, pipeline, _ = live
    status, _, body = call(server, "POST", "/search", {"query": TEXTS[4], "k": 3})
    assert status == 200, body
    answer = json.loads(body)
    assert answer["route"] == "default" and answer["collection"].startswith("shop_")
    assert next(h["doc_id"] for h in answer["hits"]) == "d4"  # its own text: cosine 1
    assert answer["hits"] == local(pipeline, TEXTS[4], 3, [])
    assert set(answer["hits"][0]) == {"doc_id", "chunk_index", "score", "text"}


def test_filters_and_batches_work_as_on_the_command_line(
        live: tuple[QueryServer, Pipeline, Stream]) -> None:
    server, pipeline, _ = live
    status, _, body = call(server, "POST", "/search", {
        "query": TEXTS[0], "k": 12, "filter": ["category=toys"], "route": "shop"})
    assert status == 200, body
    hits = json.loads(body)["hits"]
    assert hits and {h["doc_id"] for h in hits} == {f"d{i}" for i in range(1, 12, 3)}
    assert hits == local(pipeline, TEXTS[0], 12, ["category=toys"])
    status, _, body = call(server, "POST", "/search", {
        "queries": [{"id": "q1", "text": TEXTS[2], "filter": {"category": "tools"}},
                    {"id": 7, "text": TEXTS[5]},
                    {"id": "q3", "text": TEXTS[9], "filter": ["category!=books"]}],
        "k": 2, "filter": {"category": {"ne": "toys"}}})
    assert status == 200, body
    results = json.loads(body)["results"]
    assert [r["id"] for r in results] == ["q1", 7, "q3"]
    assert results[0]["hits"][0]["doc_id"] == "d2"  # tools, and its own text
    assert results[1]["hits"][0]["doc_id"] == "d5"
    assert {h["doc_id"] for h in results[2]["hits"]} <= {f"d{i}" for i in range(2, 12, 3)}
    assert all(len(r["hits"]) == 2 for r in results)


@pytest.mark.parametrize(("method", "path", "body", "code", "says"), [
    ("POST", "/search", b"{not json", 400, "the body is not JSON"),
    ("POST", "/search", b"[1, 2]", 400, "expected a JSON object"),
    ("POST", "/search", {"query": "x", "limit": 3}, 400, "unknown field(s) 'limit'"),
    ("POST", "/search", {"query": "x", "k": 0}, 400, "k must be an integer from 1 to 1000"),
    ("POST", "/search", {"query": "x", "route": "nope"}, 404,
     "no route or route collection is named 'nope' (routes: default -> shop)"),
    ("POST", "/search", {"query": "x", "filter": ["colour=red"]}, 400,
     "filter: filter on 'colour': not a filter field"),
    ("POST", "/search", {"query": "x", "queries": []}, 400, 'give "query"'),
    ("POST", "/search", {"queries": [{"text": "no id"}]}, 400, 'queries[0]: expected {"id"'),
    ("POST", "/search", {"query": "x" * 5000}, 413, "over this port's limit of 4096 bytes"),
    ("GET", "/search", None, 405, "GET is not allowed; POST a JSON body"),
    ("GET", "/export?route=elsewhere", None, 404, "no route or route collection"),
    ("GET", "/metrics", None, 404, "this port serves POST /search and GET /export"),
])
def test_a_bad_request_gets_a_clear_4xx(live: tuple[QueryServer, Pipeline, Stream],
                                         method: str, path: str, body: Any, code: int,
                                         says: str) -> None:
    status, headers, answer = call(live[0], method, path, body)
    assert status == code and says in answer.decode(), (status, answer)
    if code == 405:
        assert headers["Allow"] == "POST"


def test_an_oversized_body_is_refused_before_it_is_read(
        live: tuple[QueryServer, Pipeline, Stream]) -> None:
    assert live[0].url is not None
    port = int(live[0].url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /search HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n{")
        assert conn.recv(4096).startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"POST /search HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 411 ")
    # A client that sends the whole body before it reads still gets the answer (the
    # server reads and drops the rest rather than reset the connection under it).
    status, _, body = call(live[0], "POST", "/search", b'{"query": "' + b"x" * 8_000_000 + b'"}')
    assert status == 413 and b"over this port's limit" in body


def test_the_endpoint_is_on_loopback_by_default(
        live: tuple[QueryServer, Pipeline, Stream]) -> None:
    assert QuerySettings().host == "127.0.0.1" and Settings().query.enabled
    assert live[0].url is not None and live[0].url.startswith("http://127.0.0.1:")


def test_an_export_streams_every_point(live: tuple[QueryServer, Pipeline, Stream]) -> None:
    server, pipeline, _ = live
    status, headers, body = call(server, "GET", "/export")
    assert status == 200 and headers["Transfer-Encoding"] == "chunked"
    points = [json.loads(line) for line in body.splitlines()]
    assert sorted(p["payload"]["doc_id"] for p in points) == sorted(f"d{i}" for i in range(12))
    assert {p["id"] for p in points} == {p.id for p in pipeline.sink.points()}
    assert len(points[0]["vector"]) == pipeline.embedder.dimension


def test_search_and_export_ask_the_service_holding_the_store_without_a_model(
        live: tuple[QueryServer, Pipeline, Stream], config: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], cli_logging: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, pipeline, _ = live
    store = pipeline.settings.sink.path
    assert holder(store, "shop") is not None and served_at(store, holder(store, "shop") or "")
    monkeypatch.setattr(search_cmd, "build_pipeline", lambda *_: pytest.fail("loaded a model"))
    assert cli.main(["search", TEXTS[7], "-k", "2", "--json", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    hits = [json.loads(line) for line in out.splitlines()]
    assert hits == local(pipeline, TEXTS[7], 2, []) and hits[0]["doc_id"] == "d7"
    assert "asking the running consumer" in err
    assert cli.main(["search", TEXTS[7], "--filter", "category=books", "--config",
                     str(config)]) == 0
    assert capsys.readouterr().out.split()[1] == "d6"  # the text form, filtered
    queries = tmp_path / "q.jsonl"
    lines = [{"id": i, "text": TEXTS[i % 12]} for i in range(70)]  # two requests' worth
    queries.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli.main(["search", "--queries", str(queries), "--json", "-k", "1",
                     "--filter", "category!=tools", "--config", str(config)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["id"] for a in answers] == list(range(70))
    assert all(a["hits"][0]["doc_id"] == f"d{a['id'] % 12}" for a in answers
               if a["id"] % 3 != 2)  # its own text, unless filtered out
    assert all(a["hits"][0]["doc_id"] != f"d{a['id'] % 12}" for a in answers
               if a["id"] % 3 == 2)
    assert cli.main(["export", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12 and "exported 12 points from the running consumer" in err
    # A refusal from the service is the command's exit 2, with the service's reason.
    assert cli.main(["search", "x", "-k", "5000", "--config", str(config)]) == 2
    assert "k must be an integer from 1 to 1000" in capsys.readouterr().err


def test_a_search_reads_the_collection_the_stream_writes_now(
        live: tuple[QueryServer, Pipeline, Stream], tmp_path: Path) -> None:
    server, pipeline, stream = live
    store = pipeline.settings.sink.path
    newer = QdrantEdgeSink(store, "shop", physical="shop_rebuilt",
                           filter_fields={"category": "keyword"})
    newer.open(pipeline.fingerprint)
    old = stream.sinks["default"]
    try:
        write_docs(pipeline, newer, ["only in the rebuilt collection"], prefix="new")

        def follow() -> None:  # as the loop does: close the old one, then switch
            time.sleep(0.3)
            stream.sinks = {"default": newer}

        old_searches = [json.loads(call(server, "POST", "/search", {"query": "x"})[2])]
        old.close()  # the loop closed it; a search now waits for the new one
        mover = threading.Thread(target=follow)
        mover.start()
        status, _, body = call(server, "POST", "/search",
                               {"query": "only in the rebuilt collection", "k": 1})
        mover.join()
        assert status == 200, body
        answer = json.loads(body)
        assert answer["collection"] == "shop_rebuilt"
        assert answer["hits"][0]["doc_id"] == "new0"
        assert old_searches[0]["collection"] != "shop_rebuilt"
    finally:
        stream.sinks = {"default": old}
        newer.close()
        reopened = QdrantEdgeSink(store, "shop", filter_fields={"category": "keyword"})
        reopened.open(pipeline.fingerprint)
        pipeline.sinks["default"] = reopened
        stream.sinks = {"default": reopened}


def test_searches_while_the_store_is_written_from_another_thread(
        live: tuple[QueryServer, Pipeline, Stream]) -> None:
    """The loop's writes (and embedding, on the same model) beside the query thread's."""
    server, pipeline, stream = live
    sink = stream.sinks["default"]
    stop, failures, written = threading.Event(), [], [0]

    def loop() -> None:
        rng = np.random.default_rng(1)
        while not stop.is_set():
            texts = [f"fresh text {rng.integers(1 << 30)}" for _ in range(8)]
            try:
                write_docs(pipeline, sink, texts, prefix=f"w{written[0]}-")
            except Exception as error:
                failures.append(repr(error))
                return
            written[0] += 1

    writer = threading.Thread(target=loop)
    writer.start()
    try:
        answers = [call(server, "POST", "/search", {"query": TEXTS[i % 12], "k": 3})
                   for i in range(60)]
    finally:
        stop.set()
        writer.join()
    assert not failures and written[0] > 3
    assert all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200]
    assert all(json.loads(body)["hits"][0]["doc_id"] == f"d{i % 12}"
               for i, (_, _, body) in enumerate(answers))


def test_a_taken_port_names_query_port(live: tuple[QueryServer, Pipeline, Stream],
                                       config: Path) -> None:
    server, pipeline, stream = live
    assert server.url is not None
    taken = int(server.url.rsplit(":", 1)[1])
    settings = load_settings(config, query={"port": taken})
    with pytest.raises(ConfigError, match=r"query\.port"):
        start_query_server(settings, pipeline, stream)  # type: ignore[arg-type]
    off = start_query_server(load_settings(config, query={"enabled": False}), pipeline,
                             stream)  # type: ignore[arg-type]
    assert off.url is None
    off.close()


def test_a_holder_that_answers_no_queries_is_named_before_any_model_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """E.g. a rebuild, or a consumer with query.enabled false: a clear error, at once."""
    store = tmp_path / "store"
    store.mkdir()
    config = tmp_path / "embedstream.yaml"
    config.write_text(yaml.safe_dump({"sink": {"path": str(store), "collection": "docs"}}))
    holding = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from embedstream.sinks._edge_files import ProcessLock, lock_path; "
         "lock = ProcessLock.take(lock_path(Path(sys.argv[1]), 'docs'), 'docs'); "
         "print('held', flush=True); time.sleep(60)", str(store)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holding.stdout is not None and holding.stdout.readline() == "held\n"
        monkeypatch.setattr(search_cmd, "build_pipeline", lambda *_: pytest.fail("loaded a model"))
        for command in (["search", "x"], ["export"]):
            assert cli.main([*command, "--config", str(config)]) == 2
            err = capsys.readouterr().err
            assert f"in use by another process (pid {holding.pid}), which answers no queries" \
                in err, err
    finally:
        holding.kill()
        holding.wait()


def test_a_query_the_provider_refuses_is_a_422_naming_why(
        live: tuple[QueryServer, Pipeline, Stream], config: Path) -> None:
    from embedstream.stream.errors import EmbedFailures

    _, pipeline, stream = live

    class Refusing:
        """An embedder whose provider refuses every text (e.g. over its context length)."""

        dimension = pipeline.embedder.dimension

        document_prompt = ""

        def embed(self, texts: list[str]) -> Any:
            refused = {i: ("embed_rejected", "input too long") for i in range(len(texts))}
            raise EmbedFailures(np.zeros((len(texts), self.dimension), np.float32), refused)

        embed_queries = embed  # a query is refused just the same

        def close(self) -> None:
            pass

    settings = load_settings(config)
    server = QueryServer(settings, Refusing(), lambda: stream.sinks)  # type: ignore[arg-type]
    try:
        code, _, body = call(server, "POST", "/search", {"query": "anything", "k": 3})
    finally:
        server.close()
    assert code == 422
    assert b"embed_rejected: input too long" in body
