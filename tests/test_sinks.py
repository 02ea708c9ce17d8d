"""Both Qdrant sinks against the guarantees of the store protocol
(embedstream.stream.store).

The server sink runs on qdrant-client's in-memory store (same semantics as a
server, no server needed); the Edge sink on a real shard in tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import qdrant_edge as qe
from pydantic import SecretStr
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from embedstream.sinks import QdrantEdgeSink, QdrantServerSink, build_sink
from embedstream.stream.config import SinkSettings
from embedstream.stream.errors import ConfigError, FingerprintMismatch, SinkError, SinkUnavailable
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Sink, chunk_point_id

DIM = 8
FP = Fingerprint(model="test/model", revision="abc123", dimension=DIM, normalized=True,
                 chunker="tokens:256")
_rng = np.random.default_rng(7)

MakeSink = Callable[[], Sink]


def unit(n: int = 1) -> np.ndarray[Any, np.dtype[np.float32]]:
    v = _rng.standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def write(doc: str, n: int, version: int = 1, offset: int = 0, tag: str = "v",
          vectors: np.ndarray[Any, np.dtype[np.float32]] | None = None) -> DocumentWrite:
    vecs = unit(n) if vectors is None else vectors
    chunks = [ChunkPoint(i, vecs[i], {"doc_id": doc, "chunk_index": i, "text": f"{tag}{i}",
                                      "version": version}) for i in range(n)]
    return DocumentWrite(doc, DocState(version, offset, False), chunks)


def delete(doc: str, version: int, offset: int = 0) -> DocumentWrite:
    return DocumentWrite(doc, DocState(version, offset, True))


def points_of(sink: Sink, doc: str) -> dict[str, dict[str, Any]]:
    return {p.id: dict(p.payload) for p in sink.points() if p.payload["doc_id"] == doc}


@pytest.fixture(params=["edge", "server"])
def make_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeSink]:
    made: list[Sink] = []
    client = QdrantClient(":memory:")  # shared, so a second sink sees the same store

    def make() -> Sink:
        sink: Sink = (QdrantEdgeSink(tmp_path / "data", "docs") if request.param == "edge"
                      else QdrantServerSink(":memory:", "docs", client=client))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()
    client.close()


def opened(make: MakeSink, fingerprint: Fingerprint = FP) -> Sink:
    sink = make()
    sink.open(fingerprint)
    return sink


def test_reopen_with_same_fingerprint_and_refuse_another(make_sink: MakeSink) -> None:
    opened(make_sink).close()
    opened(make_sink).close()
    with pytest.raises(FingerprintMismatch, match=r"revision: 'abc123'.*'def456'"):
        opened(make_sink, dataclasses.replace(FP, revision="def456"))
    with pytest.raises(FingerprintMismatch, match=r"dimension: 8 .* 16"):
        opened(make_sink, dataclasses.replace(FP, dimension=16))


def test_shorter_version_replaces_the_chunk_set(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([write("a", 5, version=1, tag="old"), write("b", 3)])
    sink.apply([write("a", 2, version=2, tag="new")])
    got = points_of(sink, "a")
    assert set(got) == {chunk_point_id("a", 0), chunk_point_id("a", 1)}
    assert sorted(p["text"] for p in got.values()) == ["new0", "new1"]
    assert all(p["version"] == 2 for p in got.values())
    assert len(points_of(sink, "b")) == 3  # other documents untouched


def test_delete_removes_every_chunk_and_records_the_deletion(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([write("a", 4, version=3), write("b", 1)])
    sink.apply([delete("a", version=4, offset=9)])
    assert points_of(sink, "a") == {}
    assert sink.document_states(["a", "b"]) == {"a": DocState(4, 9, True),
                                                "b": DocState(1, 0, False)}


def test_document_states_returns_applied_and_omits_unknown(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    assert sink.document_states([]) == {}
    sink.apply([write("a", 1, version=5, offset=11), write("b", 2, version=1, offset=12)])
    assert sink.document_states(["a", "b", "nope"]) == {"a": DocState(5, 11, False),
                                                        "b": DocState(1, 12, False)}


def test_a_state_keeps_the_log_it_was_read_from(make_sink: MakeSink) -> None:
    """The version guard needs the log (topic, partition, topic id) and timestamp back."""
    sink = opened(make_sink)
    tombstoned = DocState(5, 3, True, versioned=True, topic="docs", partition=1,
                          topic_id="AaJNqG1xeYGKODx3FWUBVw", timestamp_ms=1_796_000_000_123,
                          tombstone=True)
    offset_ordered = DocState(40, 40, False, versioned=False, topic="docs", partition=0)
    sink.apply([DocumentWrite("a", tombstoned),
                dataclasses.replace(write("b", 1), state=offset_ordered)])
    assert sink.document_states(["a", "b"]) == {"a": tombstoned, "b": offset_ordered}


def test_later_write_in_one_call_supersedes_an_earlier_one(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([write("a", 5, version=1, tag="old"), write("a", 2, version=2, tag="new")])
    assert sorted(p["text"] for p in points_of(sink, "a").values()) == ["new0", "new1"]
    assert sink.document_states(["a"]) == {"a": DocState(2, 0, False)}


def test_malformed_writes_are_refused_before_writing(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    gap = write("a", 3)
    gap = dataclasses.replace(gap, chunks=[gap.chunks[0], gap.chunks[2]])
    with pytest.raises(ValueError, match="chunk indexes"):
        sink.apply([write("ok", 1), gap])
    bad_delete = dataclasses.replace(write("a", 1), state=DocState(2, 0, True))
    with pytest.raises(ValueError, match="deletion"):
        sink.apply([bad_delete])
    assert list(sink.points()) == [] and sink.document_states(["ok"]) == {}


class _FailingWrites:
    """Stands in for a shard or client whose chunk writes fail."""

    def __init__(self, real: Any, method: str, error: Exception) -> None:
        self._real, self._method, self._error = real, method, error

    def __getattr__(self, name: str) -> Any:
        if name == self._method:
            def fail(*args: Any, **kwargs: Any) -> Any:
                raise self._error
            return fail
        return getattr(self._real, name)


def test_a_failed_chunk_write_leaves_the_old_state(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([write("a", 2, version=1)])
    real: Any
    if isinstance(sink, QdrantEdgeSink):
        real, attr = sink._chunks, "_chunks"
        setattr(sink, attr, _FailingWrites(real, "update", RuntimeError("No space left")))
        expected: type[SinkError] = SinkError
    else:
        assert isinstance(sink, QdrantServerSink)
        real, attr = sink._client, "_client"
        outage = UnexpectedResponse(503, "Unavailable", b"", httpx.Headers())
        setattr(sink, attr, _FailingWrites(real, "batch_update_points", outage))
        expected = SinkUnavailable
    with pytest.raises(expected, match="write failed"):
        sink.apply([write("a", 5, version=2)])
    # The state was not advanced, so the consumer replays the write.
    assert sink.document_states(["a"]) == {"a": DocState(1, 0, False)}
    setattr(sink, attr, real)
    sink.apply([write("a", 5, version=2)])
    assert len(points_of(sink, "a")) == 5


def test_search_returns_the_nearest_chunk_first(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    vectors = unit(6)
    sink.apply([write("a", 3, vectors=vectors[:3]), write("b", 3, vectors=vectors[3:])])
    hits = sink.search(vectors[4].tolist(), limit=3)
    assert len(hits) == 3
    assert hits[0].id == chunk_point_id("b", 1)
    assert hits[0].payload["text"] == "v1" and hits[0].payload["doc_id"] == "b"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert sink.search(vectors[0].tolist(), limit=0) == []


def test_points_yields_every_point_across_pages(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    writes = [write(f"d{i}", 5) for i in range(70)]  # 350 points: two scroll pages
    sink.apply(writes)
    got = {p.id: p for p in sink.points()}
    want = {chunk_point_id(w.doc_id, c.chunk_index): c for w in writes for c in w.chunks}
    assert len(got) == 350 and set(got) == set(want)
    for pid, chunk in list(want.items())[:20]:
        assert got[pid].vector == pytest.approx(np.asarray(chunk.vector).tolist(), abs=1e-6)
        assert got[pid].payload == chunk.payload


def test_stored_vectors_are_keyed_by_the_content_hash_of_their_text(
    make_sink: MakeSink,
) -> None:
    sink = opened(make_sink)
    writes = []
    for doc in ("a", "b", "c"):
        w = write(doc, 3, tag=doc)
        writes.append(DocumentWrite(w.doc_id, w.state, [
            ChunkPoint(c.chunk_index, c.vector, {**c.payload, "content_hash": f"h-{doc}{i}"})
            for i, c in enumerate(w.chunks)]))
    sink.apply(writes)
    found = sink.stored_vectors(["a", "c", "unknown"])
    assert set(found) == {f"h-{d}{i}" for d in "ac" for i in range(3)}  # only those documents
    for w in writes[::2]:
        for chunk in w.chunks:
            stored = found[str(chunk.payload["content_hash"])]
            assert stored == pytest.approx(np.asarray(chunk.vector).tolist(), abs=1e-6)
    assert sink.stored_vectors([]) == {}


def test_payload_indexes_are_created(make_sink: MakeSink, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    sink = make_sink()
    if isinstance(sink, QdrantEdgeSink):
        sink.open(FP)
        sink.close()
        assert sink.collection.startswith("docs_")  # the physical collection behind the alias
        shard = qe.EdgeShard.load(str(tmp_path / "data" / sink.collection))
        schema = {k: v.data_type for k, v in shard.info().payload_schema.items()}
        shard.close()
        assert schema["doc_id"] == qe.PayloadSchemaType.Keyword
        assert schema["version"] == qe.PayloadSchemaType.Integer
        assert schema["chunk_index"] == qe.PayloadSchemaType.Integer
    else:
        # The in-memory store accepts but does not record indexes: check the requests.
        assert isinstance(sink, QdrantServerSink)
        client = QdrantClient(":memory:")
        calls: list[tuple[str, str, Any]] = []
        real = client.create_payload_index

        def spy(collection: str, field: str, schema: Any, **kw: Any) -> Any:
            calls.append((collection, field, schema))
            return real(collection, field, schema, **kw)

        monkeypatch.setattr(client, "create_payload_index", spy)
        server = QdrantServerSink(":memory:", "docs", client=client)
        server.open(FP)
        physical = server.collection  # the collection behind the alias "docs"
        assert ("docs", "doc_id", models.PayloadSchemaType.KEYWORD) not in calls
        assert (physical, "doc_id", models.PayloadSchemaType.KEYWORD) in calls
        assert (physical, "version", models.PayloadSchemaType.INTEGER) in calls
        assert (f"{physical}_state", "doc_id", models.PayloadSchemaType.KEYWORD) in calls


def test_a_foreign_collection_is_refused(make_sink: MakeSink, tmp_path: Path) -> None:
    # Named like the alias "docs": opened directly, as a store made before aliases.
    sink = make_sink()
    if isinstance(sink, QdrantEdgeSink):
        shard = qe.EdgeShard.create(str(tmp_path / "data" / "docs"), qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine)))
        shard.update(qe.UpdateOperation.upsert_points([qe.Point(1, [1.0] * DIM, {})]))
        shard.close()
    else:
        assert isinstance(sink, QdrantServerSink)
        client = sink._client
        assert client is not None
        client.create_collection("docs", vectors_config=models.VectorParams(
            size=DIM, distance=models.Distance.COSINE))
        client.upsert("docs", [models.PointStruct(id=1, vector=[1.0] * DIM)])
    with pytest.raises(FingerprintMismatch, match="holds no embedstream fingerprint"):
        sink.open(FP)


def test_an_empty_leftover_of_an_interrupted_creation_is_adopted(make_sink: MakeSink,
                                                                  tmp_path: Path) -> None:
    sink = make_sink()  # the leftover is named like the alias: opened directly (pre-alias)
    if isinstance(sink, QdrantEdgeSink):
        qe.EdgeShard.create(str(tmp_path / "data" / "docs"), qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine))).close()
    else:
        assert isinstance(sink, QdrantServerSink) and sink._client is not None
        sink._client.create_collection("docs", vectors_config=models.VectorParams(
            size=DIM, distance=models.Distance.COSINE))
    sink.open(FP)
    sink.apply([write("a", 2)])
    assert len(points_of(sink, "a")) == 2


# -- Edge only ---------------------------------------------------------------


def test_edge_data_survives_close_and_reopen(tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path, "docs")
    sink.open(FP)
    sink.apply([write("a", 3, version=7)])
    sink.close()
    sink.close()  # idempotent
    again = QdrantEdgeSink(tmp_path, "docs")
    again.open(FP)
    try:
        assert len(points_of(again, "a")) == 3
        assert again.document_states(["a"]) == {"a": DocState(7, 0, False)}
    finally:
        again.close()


def test_edge_second_opener_in_this_process_is_refused(tmp_path: Path) -> None:
    first = QdrantEdgeSink(tmp_path, "docs")
    first.open(FP)
    try:
        with pytest.raises(SinkError, match=rf"in use by this process \(pid {os.getpid()}\)"):
            QdrantEdgeSink(tmp_path, "docs").open(FP)
        other = QdrantEdgeSink(tmp_path, "other")  # another collection: its own lock
        other.open(FP)
        other.close()
    finally:
        first.close()
    again = QdrantEdgeSink(tmp_path, "docs")
    again.open(FP)  # released by close
    again.close()


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from embedstream.sinks import QdrantEdgeSink
    from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite
    from embedstream.stream.fingerprint import Fingerprint
    fp = Fingerprint(**{fp})
    sink = QdrantEdgeSink(sys.argv[1], "docs")  # no flush: the WAL alone
    sink.open(fp)
    vectors = np.eye({dim}, dtype=np.float32)
    sink.apply([DocumentWrite("k", DocState(3, 42, False),
                              [ChunkPoint(i, vectors[i], {{"doc_id": "k", "chunk_index": i}})
                               for i in range(4)])])
    print("applied", flush=True)
    sys.stdin.readline()  # hold the store open until killed
""")


def test_edge_write_survives_sigkill_and_the_lock_names_the_holder(tmp_path: Path) -> None:
    code = _WRITER.format(fp=dataclasses.asdict(FP), dim=DIM)
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "applied"
        with pytest.raises(SinkError, match=rf"in use by another process \(pid {child.pid}\)"):
            QdrantEdgeSink(tmp_path, "docs").open(FP)
        child.send_signal(signal.SIGKILL)  # no close, no flush
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    sink = QdrantEdgeSink(tmp_path, "docs")
    sink.open(FP)  # the kernel dropped the dead writer's lock
    try:
        assert set(points_of(sink, "k")) == {chunk_point_id("k", i) for i in range(4)}
        assert sink.document_states(["k"]) == {"k": DocState(3, 42, False)}
    finally:
        sink.close()


def test_edge_refuses_path_like_collection_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"sink\.collection"):
        QdrantEdgeSink(tmp_path, "..")


# -- server only ---------------------------------------------------------------


def test_server_passes_creation_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    client = QdrantClient(":memory:")
    seen: list[dict[str, Any]] = []
    real = client.create_collection

    def spy(name: str, **kw: Any) -> bool:
        seen.append({"name": name, **kw})
        return real(name, **kw)

    monkeypatch.setattr(client, "create_collection", spy)
    QdrantServerSink(":memory:", "docs", shard_number=3, replication_factor=2,
                     client=client).open(FP)
    # The physical collection behind the alias "docs", not its state companion.
    chunks = next(s for s in seen if s["name"].startswith("docs_")
                  and not s["name"].endswith("_state"))
    assert chunks["shard_number"] == 3 and chunks["replication_factor"] == 2
    assert chunks["write_consistency_factor"] is None  # server default
    assert chunks["vectors_config"].size == DIM


def test_server_batches_writes_and_splits_only_large_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import embedstream.sinks.qdrant_server as server

    client = QdrantClient(":memory:")
    sink = QdrantServerSink(":memory:", "docs", client=client)
    sink.open(FP)
    sink.apply([write("a", 5), write("b", 4)])
    requests: list[list[Any]] = []
    real = client.batch_update_points

    def spy(collection: str, operations: list[Any], **kw: Any) -> Any:
        requests.append(operations)
        return real(collection, operations, **kw)

    monkeypatch.setattr(client, "batch_update_points", spy)
    sink.apply([write("a", 2, version=2), write("b", 1, version=2), delete("c", 1)])
    assert len(requests) == 1  # one upsert and the leftover deletes, one request
    kinds = [type(op).__name__ for op in requests[0]]
    assert kinds == ["UpsertOperation"] + ["DeleteOperation"] * 3
    requests.clear()
    monkeypatch.setattr(server, "_MAX_FLOATS_PER_REQUEST", 4 * DIM)  # four chunks a request
    sink.apply([write("a", 6, version=3), write("b", 3, version=3)])
    assert [len(ops) for ops in requests] == [1, 1, 3]  # 4 + 4 + (1 chunk and 2 deletes)
    assert len(points_of(sink, "a")) == 6 and len(points_of(sink, "b")) == 3
    sink.apply([write("a", 1, version=4)])
    assert list(points_of(sink, "a")) == [chunk_point_id("a", 0)]
    client.close()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_server_unreachable_is_unavailable_and_hides_the_key() -> None:
    sink = QdrantServerSink("http://127.0.0.1:9", "docs", api_key=SecretStr("s3cr3t-key"),
                            timeout_s=2)
    with pytest.raises(SinkUnavailable) as caught:
        sink.open(FP)
    assert caught.value.retry_after > 0
    assert "s3cr3t-key" not in str(caught.value) and "127.0.0.1:9" in str(caught.value)
    sink.close()


@pytest.mark.parametrize(
    ("error", "unavailable", "retry_after"),
    [
        (UnexpectedResponse(503, "Service Unavailable", b"s3cr3t-key", httpx.Headers()), True, 2.0),
        (UnexpectedResponse(429, "Too Many", b"", httpx.Headers({"Retry-After": "7"})), True, 7.0),
        (UnexpectedResponse(400, "Bad Request", b"s3cr3t-key: bad", httpx.Headers()), False, None),
        (ResponseHandlingException(httpx.ReadTimeout("timed out")), True, 5.0),
        (ValueError("Wrong input: s3cr3t-key"), False, None),
    ],
)
def test_server_error_translation(error: Exception, unavailable: bool,
                                  retry_after: float | None) -> None:
    sink = QdrantServerSink("https://q.example:6333", "docs", api_key=SecretStr("s3cr3t-key"))
    translated = sink._translate("write", error)
    assert isinstance(translated, SinkUnavailable) == unavailable
    assert isinstance(translated, SinkError)
    if isinstance(translated, SinkUnavailable):
        assert translated.retry_after == retry_after
    assert "s3cr3t-key" not in str(translated) and "write failed" in str(translated)


# -- factory -------------------------------------------------------------------


def test_build_sink_chooses_by_kind(tmp_path: Path) -> None:
    edge = build_sink(SinkSettings(kind="qdrant-edge", path=tmp_path, collection="c"))
    assert isinstance(edge, QdrantEdgeSink)
    server = build_sink(SinkSettings(kind="qdrant", url=":memory:"))
    assert isinstance(server, QdrantServerSink)
    with pytest.raises(ConfigError, match=r"sink\.url"):
        build_sink(SinkSettings(kind="qdrant"))
    with pytest.raises(ConfigError, match=r"sink\.url"):
        build_sink(SinkSettings(kind="qdrant", url="localhost:6333"))
