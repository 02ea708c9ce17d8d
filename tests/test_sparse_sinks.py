"""Document sparse vectors in both Qdrant sinks: what a user of ``retrieval.sparse``
relies on. BM25 weights come from Qdrant's own ``Bm25``; the IDF is the store's, so
these check it follows writes and deletes, counts documents (not chunks, not the
special points), and that filters and export see the documents.

The server sink runs on qdrant-client's in-memory store; the Edge sink on a real
shard in tmp_path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient

from embedstream.sinks import QdrantEdgeSink, QdrantServerSink
from embedstream.stream.config import RetrievalSettings
from embedstream.stream.errors import FingerprintMismatch
from embedstream.stream.filters import Filter, Match, Range
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.sparse import Bm25Encoder, SparseVector
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Sink

DIM = 4
ENCODER = Bm25Encoder(RetrievalSettings(sparse="bm25"))
FP = Fingerprint(model="test/model", revision="abc", dimension=DIM, normalized=True,
                 chunker="tokens:256", sparse=ENCODER.spec)
DENSE_FP = Fingerprint(model="test/model", revision="abc", dimension=DIM, normalized=True,
                       chunker="tokens:256")
FIELDS: dict[str, Any] = {"lang": "keyword", "year": "integer"}

MakeSink = Callable[[], Sink]


@pytest.fixture(params=["edge", "server"])
def make_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeSink]:
    made: list[Sink] = []
    client = QdrantClient(":memory:")

    def make() -> Sink:
        sink: Sink = (QdrantEdgeSink(tmp_path / "data", "docs", filter_fields=FIELDS)
                      if request.param == "edge"
                      else QdrantServerSink(":memory:", "docs", client=client,
                                            filter_fields=FIELDS))
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()
    client.close()


def doc(doc_id: str, text: str, version: int = 1, *, chunks: int = 2,
        fields: dict[str, Any] | None = None) -> DocumentWrite:
    vectors = np.eye(DIM, dtype=np.float32)
    points = [ChunkPoint(i, vectors[i % DIM], {"doc_id": doc_id, "chunk_index": i,
                                               "text": f"{text} part {i}"})
              for i in range(chunks)]
    return DocumentWrite(doc_id, DocState(version, version, False), points,
                         sparse=ENCODER.encode_document(text), fields=fields or {})


def gone(doc_id: str, version: int) -> DocumentWrite:
    return DocumentWrite(doc_id, DocState(version, version, True))


def found(sink: Sink, query: str, flt: Filter | None = None) -> dict[str, float]:
    return {str(h.payload["doc_id"]): h.score
            for h in sink.search_sparse(ENCODER.encode_query(query), 10, flt)}


def opened(make: MakeSink, fingerprint: Fingerprint = FP) -> Sink:
    sink = make()
    sink.open(fingerprint)
    return sink


def test_the_idf_counts_live_documents_and_follows_deletes(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    # Many chunks each: a per-chunk count would differ from the per-document one.
    sink.apply([doc("a", "red apples and pears", chunks=4), doc("b", "green pears", chunks=3),
                doc("c", "blue sky", chunks=1)])
    three = found(sink, "pears")
    assert set(three) == {"a", "b"}
    # BM25 IDF over N = 3 documents, 2 holding "pears": ln(1 + (3 - 2 + 0.5) / (2 + 0.5)).
    weight = ENCODER.encode_query("pears").values[0]
    tf_b = ENCODER.encode_document("green pears").values
    assert three["b"] == pytest.approx(weight * math.log(1 + 1.5 / 2.5) * max(tf_b), rel=1e-5)
    sink.apply([gone("c", 2)])  # N = 2: the term weights change, with no rebuild
    two = found(sink, "pears")
    assert two["b"] == pytest.approx(weight * math.log(1 + 0.5 / 2.5) * max(tf_b), rel=1e-5)
    sink.apply([gone("a", 2)])
    assert set(found(sink, "pears")) == {"b"}  # no ghost of a deleted document
    assert set(found(sink, "apples")) == set()


def test_an_edit_replaces_the_documents_terms(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([doc("a", "the old wording of a note"), doc("b", "another note entirely")])
    assert "a" in found(sink, "wording")
    sink.apply([doc("a", "the new phrasing of a note", version=2)])
    assert "a" not in found(sink, "wording")
    assert set(found(sink, "phrasing")) == {"a"}
    assert set(found(sink, "note")) == {"a", "b"}


def test_a_filter_applies_to_the_document_fields(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([doc("a", "graph neural networks", fields={"lang": "en", "year": 2020}),
                doc("b", "graph theory basics", fields={"lang": "de", "year": 2015}),
                doc("c", "graph databases", fields={"lang": "en", "year": 2010})])
    assert set(found(sink, "graph", Filter(must=(Match("lang", "en"),)))) == {"a", "c"}
    assert set(found(sink, "graph", Filter(must=(Range("year", gte=2012),),
                                             must_not=(Match("lang", "de"),)))) == {"a"}


def test_export_holds_each_live_documents_vector_and_fields(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([doc("a", "first text", fields={"lang": "en"}), doc("b", "second text")])
    sink.apply([gone("b", 2)])
    [document] = list(sink.documents())
    assert document.doc_id == "a"
    assert document.sparse == ENCODER.encode_document("first text")
    assert dict(document.fields) == {"lang": "en"}


def test_sparse_vectors_survive_reopen_and_the_fingerprint_names_them(
        make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    sink.apply([doc("a", "persistent words")])
    sink.close()
    again = opened(make_sink)
    assert again.sparse
    assert set(found(again, "persistent")) == {"a"}
    again.close()
    with pytest.raises(FingerprintMismatch, match="sparse"):
        opened(make_sink, DENSE_FP)


def test_a_dense_collection_has_no_documents_to_find(make_sink: MakeSink) -> None:
    sink = opened(make_sink, DENSE_FP)
    sink.apply([DocumentWrite("a", DocState(1, 1, False), [ChunkPoint(
        0, np.eye(DIM, dtype=np.float32)[0], {"doc_id": "a", "chunk_index": 0, "text": "x"})])])
    assert not sink.sparse
    assert sink.search_sparse(SparseVector((1,), (1.0,)), 5) == []
    assert list(sink.documents()) == []


def test_a_deletion_with_a_sparse_vector_is_refused(make_sink: MakeSink) -> None:
    sink = opened(make_sink)
    with pytest.raises(ValueError, match="sparse"):
        sink.apply([DocumentWrite("a", DocState(1, 1, True),
                                  sparse=ENCODER.encode_document("words"))])


@pytest.mark.parametrize("sparse_leftover", [False, True])
def test_an_empty_leftover_state_is_adopted_only_with_the_sparse_vector_it_needs(
        make_sink: MakeSink, tmp_path: Path, sparse_leftover: bool) -> None:
    # A creation interrupted before the fingerprint was written leaves both parts empty;
    # one made for other sparse settings would refuse every write, so it is refused.
    sink = make_sink()
    for name in ("docs", "docs_state"):
        size = DIM if name == "docs" else 1
        with_sparse = sparse_leftover and name == "docs_state"
        if isinstance(sink, QdrantEdgeSink):
            import qdrant_edge as qe

            (tmp_path / "data" / name).mkdir(parents=True)
            qe.EdgeShard.load(str(tmp_path / "data" / name), qe.EdgeConfig(
                vectors=qe.EdgeVectorParams(size=size, distance=qe.Distance.Cosine),
                sparse_vectors={"sparse": qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)}
                if with_sparse else None)).close()
        else:
            from qdrant_client import models

            assert isinstance(sink, QdrantServerSink) and sink._client is not None
            sink._client.create_collection(
                name, vectors_config=models.VectorParams(size=size,
                                                         distance=models.Distance.COSINE),
                sparse_vectors_config={"sparse": models.SparseVectorParams(
                    modifier=models.Modifier.IDF)} if with_sparse else None)
    if not sparse_leftover:
        with pytest.raises(FingerprintMismatch, match=r"retrieval\.sparse"):
            sink.open(FP)
        return
    sink.open(FP)
    sink.apply([doc("a", "adopted words")])
    assert set(found(sink, "adopted")) == {"a"}
