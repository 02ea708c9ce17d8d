"""A document's leftover chunks go by id, bounded by the ``chunk_bound`` its state
keeps (sinks/_layout.py; the Qdrant Edge sink), and a write cut short anywhere
leaves nothing behind (both sinks: the server one trims by filter).

Edge on a real shard in tmp_path, the server path on qdrant-client's in-memory store.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

import embedstream.sinks.qdrant_edge as edge_module
from embedstream.sinks import QdrantEdgeSink, QdrantServerSink
from embedstream.sinks._layout import CHUNK_BOUND, state_payload
from embedstream.stream.errors import SinkError
from embedstream.stream.store import DocState, DocumentWrite, doc_state_point_id
from tests.test_sinks import FP, delete, points_of, write


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[QdrantEdgeSink]:
    made = QdrantEdgeSink(tmp_path / "data", "docs")
    made.open(FP)
    yield made
    made.close()


@pytest.fixture(params=["edge", "server"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    made: Any = (QdrantEdgeSink(tmp_path / "data", "docs") if request.param == "edge"
                 else QdrantServerSink(":memory:", "docs", client=QdrantClient(":memory:")))
    made.open(FP)
    yield made
    made.close()


def stored_bound(sink: Any, doc: str) -> Any:
    (payload,) = sink._state_payloads([doc_state_point_id(doc)])
    return payload.get(CHUNK_BOUND)


def cut_short(sink: Any, writes: list[DocumentWrite]) -> None:
    """Apply ``writes`` as a process killed after the chunks and before the states
    would leave them: the states are never written."""
    real = sink._put_states

    def killed(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed before the states")

    sink._put_states = killed
    try:
        with pytest.raises(SinkError, match="killed before the states"):
            sink.apply(writes)
    finally:
        sink._put_states = real


def chunk_indexes(sink: Any, doc: str) -> set[int]:
    return {int(p["chunk_index"]) for p in points_of(sink, doc).values()}


def test_the_state_records_the_chunk_count(edge: QdrantEdgeSink) -> None:
    sink = edge
    sink.apply([write("a", 4), write("b", 2)])
    assert (stored_bound(sink, "a"), stored_bound(sink, "b")) == (4, 2)
    sink.apply([write("a", 1, version=2), delete("b", 2)])
    assert (stored_bound(sink, "a"), stored_bound(sink, "b")) == (1, 0)
    assert chunk_indexes(sink, "a") == {0} and chunk_indexes(sink, "b") == set()


def test_a_growing_write_cut_short_leaves_nothing_behind_a_shorter_replay(sink: Any) -> None:
    sink.apply([write("a", 2, version=1)])
    cut_short(sink, [write("a", 6, version=2)])
    # Six chunks are in the store and the state is still version 1 (on Edge, its
    # bound was raised before them): the replay that supersedes with one chunk
    # removes all five.
    assert chunk_indexes(sink, "a") == set(range(6))
    assert sink.document_states(["a"])["a"].version == 1
    bounded = isinstance(sink, QdrantEdgeSink)
    assert stored_bound(sink, "a") == (6 if bounded else None)
    sink.apply([write("a", 6, version=2), write("a", 1, version=3, tag="new")])
    assert chunk_indexes(sink, "a") == {0}
    assert [p["text"] for p in points_of(sink, "a").values()] == ["new0"]
    assert stored_bound(sink, "a") == (1 if bounded else None)


def test_a_state_without_a_bound_is_trimmed_by_filter(edge: QdrantEdgeSink) -> None:
    """A store written before ``chunk_bound`` existed: its states have none."""
    sink: Any = edge
    sink.apply([write("a", 5, version=1)])
    sink._put_states([(doc_state_point_id("a"), state_payload("a", DocState(1, 0, False)), None)])
    assert stored_bound(sink, "a") is None
    sink.apply([write("a", 2, version=2)])
    assert chunk_indexes(sink, "a") == {0, 1}
    assert stored_bound(sink, "a") == 2


def test_edge_deletes_leftovers_of_known_documents_without_a_filter(
        edge: QdrantEdgeSink, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = edge
    filtered: list[list[str]] = []
    real = edge_module.chunk_filter

    def spy(doc_ids: list[str], from_index: int = 0) -> Any:
        filtered.append(doc_ids)
        return real(doc_ids, from_index)

    monkeypatch.setattr(edge_module, "chunk_filter", spy)
    sink.apply([write("a", 3), write("b", 3)])
    assert filtered == [["a", "b"]]  # new documents: no bound yet
    filtered.clear()
    sink.apply([write("a", 1, version=2), write("b", 5, version=2), delete("a", 3)])
    assert filtered == []
    assert chunk_indexes(sink, "a") == set() and chunk_indexes(sink, "b") == set(range(5))


def test_random_writes_cut_short_and_replayed_match_the_oracle(sink: Any) -> None:
    """Writes of random lengths (0: a deletion), some cut short and then replayed as
    the consumer does (alone, or superseded in one batch by the next write of the
    same document): each document always holds exactly its last write's chunks."""
    rng = random.Random(11)
    expected: dict[str, int] = {}
    versions: dict[str, int] = {}

    def make(doc: str) -> tuple[DocumentWrite, int]:
        versions[doc] = versions.get(doc, 0) + 1
        n = rng.choice([0, 1, 1, 2, 3, 5, 8])
        made = delete(doc, versions[doc]) if n == 0 else write(doc, n, version=versions[doc])
        return made, n

    for _ in range(80):
        doc = rng.choice("abcd")
        first, n = make(doc)
        if rng.random() < 0.4:
            cut_short(sink, [first])
            if rng.random() < 0.5:  # the replay carries a later write of the document
                later, n = make(doc)
                sink.apply([first, later])
            else:
                sink.apply([first])
        else:
            sink.apply([first])
        expected[doc] = n
        for name, count in expected.items():
            assert chunk_indexes(sink, name) == set(range(count)), name
            if isinstance(sink, QdrantEdgeSink):
                assert stored_bound(sink, name) == count
