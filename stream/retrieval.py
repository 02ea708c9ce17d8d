"""Document search: dense, sparse, or both fused, over a :class:`~embedstream.stream.store.Sink`.

A hit is a document with its best chunk: the ``Hit`` of the chunk nearest the query's
dense vector among the document's chunks (its payload holds ``doc_id``,
``chunk_index``, ``text``), scored by the mode:

* ``dense``: documents ranked by their best chunk; the score is that chunk's cosine.
  The chunk search is asked for more chunks until ``k`` distinct documents are found
  (or the collection has no more), so the ranking is exact, not cut by chunks of the
  same document crowding the first page.
* ``sparse``: documents ranked by their sparse vector's score (the dot product with
  the query's, IDF applied by the store); the best chunk is then looked up per hit.
* ``hybrid``: both rankings, each cut at ``retrieval.depth`` documents (``k`` where
  that is more), fused:
  ``rrf``: ``sum over rankings of 1 / (rrf_k + rank)``, ``rank`` counted from 1; ``dbsf``:
  each ranking's scores mapped to ``(s - (mean - 3 sd)) / (6 sd)`` (population ``sd``
  over that ranking; all equal: 0.5), clipped to [0, 1], and summed. A document missing
  from a ranking gets nothing from it. Ties (equal to 6 significant digits, so that
  float rounding does not decide an order) go to the smaller ``doc_id``, in every
  ranking.

The two rankings are over different points (chunk points, document state points), so
the store's own fusion (which joins prefetches by point id) cannot join them: they are
fused here. The README ("Hybrid search") gives the exact store queries, so a user of
any Qdrant client reproduces the ranking. A filter applies to both branches (the
sinks move it onto the documents' fields for the sparse one).

Guaranteed: the same collection contents give the same hits in the same order (the
sparse scores are the store's, and every tie is broken by ``doc_id``), in a store
whose state segments are not optimized (see :mod:`embedstream.stream.sparse`). Not
guaranteed: a consistent view across the branches while documents are being written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from embedstream.stream._retrieval_settings import RetrievalSettings
from embedstream.stream.errors import QueryError
from embedstream.stream.filters import Filter, Match
from embedstream.stream.sparse import SparseVector
from embedstream.stream.store import Hit, Sink

__all__ = ["MODES", "Mode", "Query", "dense_documents", "fuse_dbsf", "fuse_rrf", "resolve_mode",
           "search_documents", "sparse_documents"]

Mode = Literal["dense", "sparse", "hybrid"]
MODES: tuple[Mode, ...] = ("dense", "sparse", "hybrid")
# The first dense request asks for this many chunks per document wanted: documents
# here have a few chunks each, so one request usually suffices.
_CHUNKS_PER_DOCUMENT = 4
_MIN_CHUNKS = 32
_TIE_MARGIN = 16  # sparse hits read past the cut, to order a tie across it


@dataclass(frozen=True, slots=True)
class Query:
    """One query: its dense vector (with the model's query prompt) and, for the sparse
    and hybrid modes, its sparse vector."""

    vector: Sequence[float]
    sparse: SparseVector | None = None
    filter: Filter | None = None


def resolve_mode(requested: str | None, sink: Sink) -> Mode:
    """``requested`` checked against the collection; ``None``: ``hybrid`` when it holds
    sparse vectors, else ``dense``."""
    if requested is None:
        return "hybrid" if sink.sparse else "dense"
    if requested not in MODES:
        raise QueryError(f"search mode {requested!r}: expected one of {', '.join(MODES)}")
    if requested != "dense" and not sink.sparse:
        raise QueryError(f"search mode {requested!r} needs document sparse vectors, which "
                         "this collection does not hold: rebuild it with retrieval.sparse: "
                         "bm25 (or splade)")
    return requested


def search_documents(sink: Sink, query: Query, k: int, mode: Mode,
                     settings: RetrievalSettings) -> list[Hit]:
    """The ``k`` best documents for ``query`` by ``mode`` (see the module docstring)."""
    if k <= 0:
        return []
    if mode == "dense":
        return dense_documents(sink, query, k)
    if query.sparse is None:
        raise ValueError(f"a {mode} search needs the query's sparse vector")
    # Each ranking at least k deep: fewer than k fused documents would otherwise be
    # possible where the two rankings overlap.
    depth = max(settings.depth, k)
    sparse = sparse_documents(sink, query, k if mode == "sparse" else depth)
    if mode == "sparse":
        return _with_best_chunks(sink, query, [(_doc_id(h), h.score) for h in sparse], {})
    dense = dense_documents(sink, query, depth)
    rankings = [[(_doc_id(h), h.score) for h in dense], [(_doc_id(h), h.score) for h in sparse]]
    fused = (fuse_rrf(rankings, settings.rrf_k) if settings.fusion == "rrf"
             else fuse_dbsf(rankings))
    return _with_best_chunks(sink, query, fused[:k], {_doc_id(h): h for h in dense})


def dense_documents(sink: Sink, query: Query, n: int) -> list[Hit]:
    """Up to ``n`` documents by their best chunk, best first: each one's best chunk hit."""
    limit = max(_MIN_CHUNKS, n * _CHUNKS_PER_DOCUMENT)
    while True:
        chunks = sink.search(query.vector, limit, query.filter or None)
        best: dict[str, Hit] = {}
        for hit in chunks:  # best first: a document's first chunk is its best
            best.setdefault(_doc_id(hit), hit)
        if len(best) >= n or len(chunks) < limit:
            return sorted(best.values(), key=_rank_key)[:n]
        limit *= 4


def sparse_documents(sink: Sink, query: Query, n: int) -> list[Hit]:
    """Up to ``n`` documents by their sparse vector, best first, ties by ``doc_id``."""
    assert query.sparse is not None
    # The store orders equal scores by its own point order, which differs between two
    # stores of the same documents: a few more are read so that the cut at ``n`` falls
    # after the tie it may land in (documents of equal length and term counts tie).
    found = sink.search_sparse(query.sparse, n + _TIE_MARGIN, query.filter or None)
    return sorted(found, key=_rank_key)[:n]


def fuse_rrf(rankings: Sequence[Sequence[tuple[str, float]]], k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of rankings of ``(doc_id, score)``, best first."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        for rank, (doc_id, _) in enumerate(ranking, start=1):
            fused[doc_id] = fused.get(doc_id, 0.0) + 1.0 / (k + rank)
    return _ordered(fused)


def fuse_dbsf(rankings: Sequence[Sequence[tuple[str, float]]]) -> list[tuple[str, float]]:
    """Distribution-based score fusion of rankings of ``(doc_id, score)``, best first."""
    fused: dict[str, float] = {}
    for ranking in rankings:
        if not ranking:
            continue
        scores = [score for _, score in ranking]
        mean = sum(scores) / len(scores)
        sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
        for doc_id, score in ranking:
            normal = 0.5 if sd == 0 else (score - (mean - 3 * sd)) / (6 * sd)
            fused[doc_id] = fused.get(doc_id, 0.0) + min(1.0, max(0.0, normal))
    return _ordered(fused)


def _ordered(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda item: (-_significant(item[1]), item[0]))


def _significant(score: float) -> float:
    """``score`` to 6 significant digits: scores that differ only by float rounding
    (the same vectors summed in another order, or embedded in another batch) tie."""
    return float(f"{score:.6g}")


def _rank_key(hit: Hit) -> tuple[float, str]:
    return -_significant(hit.score), _doc_id(hit)


def _with_best_chunks(sink: Sink, query: Query, ranked: Sequence[tuple[str, float]],
                      known: Mapping[str, Hit]) -> list[Hit]:
    """Each ranked document as a hit of its best chunk, with the ranking's score."""
    hits = []
    base = query.filter or Filter()
    for doc_id, score in ranked:
        best = known.get(doc_id)
        if best is None:
            only = Filter(must=(*base.must, Match("doc_id", doc_id)), must_not=base.must_not)
            found = sink.search(query.vector, 1, only)
            best = found[0] if found else None
        # A live document without chunks (no text) is found by its sparse vector only.
        hits.append(Hit(best.id, score, best.payload) if best is not None
                    else Hit(doc_id, score, {"doc_id": doc_id, "chunk_index": None,
                                             "text": None}))
    return hits


def _doc_id(hit: Hit) -> str:
    return str(hit.payload["doc_id"])
