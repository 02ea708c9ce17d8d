"""Document search (embedstream.stream.retrieval): what ``search --mode`` returns.

Runs on a real Qdrant Edge shard with hand-made dense vectors, so which document
ranks where is known; the fusion formulas are checked against their definitions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstream.sinks import QdrantEdgeSink
from embedstream.stream.config import RetrievalSettings
from embedstream.stream.errors import QueryError
from embedstream.stream.filters import Filter, Match
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.retrieval import (
    Query,
    fuse_dbsf,
    fuse_rrf,
    resolve_mode,
    search_documents,
)
from embedstream.stream.sparse import Bm25Encoder
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Sink

DIM = 3
ENCODER = Bm25Encoder(RetrievalSettings(sparse="bm25"))
FP = Fingerprint(model="m", revision="r", dimension=DIM, normalized=True, chunker="c",
                 sparse=ENCODER.spec)
RETRIEVAL = RetrievalSettings(sparse="bm25")


def unit(*xs: float) -> np.ndarray[Any, np.dtype[np.float32]]:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def doc(doc_id: str, text: str, vectors: list[np.ndarray[Any, Any]],
        fields: dict[str, Any] | None = None) -> DocumentWrite:
    chunks = [ChunkPoint(i, v, {"doc_id": doc_id, "chunk_index": i, "text": f"{doc_id}:{i}",
                                **(fields or {})}) for i, v in enumerate(vectors)]
    return DocumentWrite(doc_id, DocState(1, 1, False), chunks,
                         sparse=ENCODER.encode_document(text), fields=fields or {})


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    store = QdrantEdgeSink(tmp_path, "docs", filter_fields={"lang": "keyword"})
    store.open(FP)
    # The query points along x. "crowd" has many chunks near it, "solo" one nearer still;
    # "words" is far in dense space but holds the query's rare terms.
    store.apply([
        doc("crowd", "common filler text", [unit(1, 0.30, 0), unit(1, 0.31, 0),
                                            unit(1, 0.32, 0), unit(1, 0.33, 0)],
            {"lang": "en"}),
        doc("solo", "common filler words", [unit(1, 0.1, 0)], {"lang": "de"}),
        doc("words", "zebra quagga stripes common", [unit(0.2, 1, 0), unit(0, 0, 1)],
            {"lang": "en"}),
        doc("far", "unrelated", [unit(0, 0, 1)], {"lang": "en"}),
    ])
    yield store
    store.close()


def query(text: str, flt: Filter | None = None) -> Query:
    return Query(unit(1, 0, 0).tolist(), ENCODER.encode_query(text), flt)


def ids(hits: list[Any]) -> list[str]:
    return [str(h.payload["doc_id"]) for h in hits]


def test_dense_ranks_documents_by_their_best_chunk_once_each(sink: Sink) -> None:
    hits = search_documents(sink, query("anything"), 3, "dense", RETRIEVAL)
    assert ids(hits) == ["solo", "crowd", "words"]
    assert hits[1].payload["chunk_index"] == 0  # crowd's best chunk, not its others
    assert hits[0].score == pytest.approx(float(unit(1, 0.1, 0) @ unit(1, 0, 0)), abs=1e-5)


def test_sparse_ranks_documents_by_their_vector_with_the_best_chunk(sink: Sink) -> None:
    hits = search_documents(sink, query("zebra stripes"), 5, "sparse", RETRIEVAL)
    assert ids(hits) == ["words"]
    assert hits[0].payload["chunk_index"] == 0  # its chunk nearest the query vector
    assert hits[0].payload["text"] == "words:0"


def test_hybrid_fuses_the_two_document_rankings_by_rrf(sink: Sink) -> None:
    settings = RetrievalSettings(sparse="bm25", rrf_k=60)
    hits = search_documents(sink, query("zebra quagga"), 4, "hybrid", settings)
    dense = ids(search_documents(sink, query(""), 4, "dense", settings))
    sparse = ids(search_documents(sink, query("zebra quagga"), 4, "sparse", settings))
    expected = {d: sum(1 / (60 + r.index(d) + 1) for r in (dense, sparse) if d in r)
                for d in set(dense) | set(sparse)}
    assert ids(hits) == sorted(expected, key=lambda d: (-expected[d], d))
    assert [h.score for h in hits] == pytest.approx([expected[d] for d in ids(hits)])
    assert dense[:3] == ["solo", "crowd", "words"] and sparse == ["words"]
    assert ids(hits)[0] == "words"  # third by dense, the only sparse hit: first fused


def test_the_filter_applies_to_both_branches(sink: Sink) -> None:
    only_en = Filter(must=(Match("lang", "en"),))
    for mode in ("dense", "sparse", "hybrid"):
        hits = search_documents(sink, query("common filler", only_en), 4, mode, RETRIEVAL)
        assert "solo" not in ids(hits), mode
        assert all(h.payload.get("lang") == "en" for h in hits), mode


def test_fusion_formulas() -> None:
    a = [("x", 0.9), ("y", 0.5), ("z", 0.1)]
    b = [("y", 12.0), ("w", 3.0)]
    rrf = dict(fuse_rrf([a, b], 60))
    assert rrf["y"] == pytest.approx(1 / 62 + 1 / 61)
    assert rrf["w"] == pytest.approx(1 / 62)
    assert next(iter(rrf)) == "y"
    dbsf = dict(fuse_dbsf([a, b]))
    mean, sd = 0.5, float(np.std([0.9, 0.5, 0.1]))
    assert dbsf["x"] == pytest.approx((0.9 - (mean - 3 * sd)) / (6 * sd))
    assert dbsf["y"] == pytest.approx(0.5 + (12.0 - (7.5 - 3 * 4.5)) / (6 * 4.5))
    # Equal scores: ties go to the smaller doc_id, whatever the input order.
    assert [d for d, _ in fuse_rrf([[("b", 1.0)], [("a", 1.0)]], 60)] == ["a", "b"]


def test_the_mode_defaults_to_hybrid_with_sparse_vectors_and_is_checked(
        sink: Sink, tmp_path: Path) -> None:
    assert resolve_mode(None, sink) == "hybrid"
    with pytest.raises(QueryError, match="expected one of"):
        resolve_mode("bm42", sink)
    dense_only = QdrantEdgeSink(tmp_path / "dense", "docs")
    dense_only.open(Fingerprint(model="m", revision="r", dimension=DIM, normalized=True,
                                chunker="c"))
    try:
        assert resolve_mode(None, dense_only) == "dense"
        with pytest.raises(QueryError, match=r"retrieval\.sparse"):
            resolve_mode("hybrid", dense_only)
    finally:
        dense_only.close()


def test_hybrid_returns_k_documents_even_past_the_fusion_depth(sink: Sink) -> None:
    shallow = RetrievalSettings(sparse="bm25", depth=1)
    hits = search_documents(sink, query("common"), 4, "hybrid", shallow)
    assert sorted(ids(hits)) == ["crowd", "far", "solo", "words"]
