"""Queries as the ``search`` command and the running consumer's query endpoint take them.

One shape for both: a query is an id, a text and a filter (the request's common filter
and its own, all of which must hold); a hit is a document with its best chunk,
``{"doc_id", "chunk_index", "score", "text"}`` (:mod:`embedstream.stream.retrieval`);
an exported point is ``{"id", "vector", "payload"}`` and an exported document sparse
vector ``{"doc_id", "sparse", "fields"}``. Queries are embedded :data:`EMBED_BATCH` at
a time (one forward pass each, bounded memory), then searched one by one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.stream.config import RetrievalSettings
from embedstream.stream.embedding import Embedder
from embedstream.stream.errors import QueryError
from embedstream.stream.filters import FieldType, Filter, parse_filter_json
from embedstream.stream.retrieval import Mode, Query, resolve_mode, search_documents
from embedstream.stream.sparse import SparseEncoder
from embedstream.stream.store import Hit, Sink, StoredDocument, StoredPoint

__all__ = ["EMBED_BATCH", "QueryJob", "document_json", "embed_jobs", "export_lines",
           "hit_json", "job_of", "point_json", "search_job", "search_jobs"]

EMBED_BATCH = 64  # queries embedded at once: one forward pass, bounded memory


@dataclass(frozen=True, slots=True)
class QueryJob:
    """One query: ``filter`` is what is searched with (common and own conditions);
    ``spec`` is its own filter as given (JSON), for passing the query on."""

    id: Any
    text: str
    filter: Filter
    spec: Any = None


def job_of(item: Any, common: Filter, fields: Mapping[str, FieldType]) -> QueryJob:
    """The query of a batch item ``{"id": ..., "text": "...", "filter"?: ...}``;
    :class:`QueryError` (saying what is wrong, not where) when it is not one."""
    if not isinstance(item, dict) or "id" not in item or not isinstance(item.get("text"), str):
        raise QueryError('expected {"id": ..., "text": "...", "filter"?: ...}')
    spec = item.get("filter")
    own = Filter()
    if spec is not None:
        try:
            own = parse_filter_json(spec, fields)
        except QueryError as error:
            raise QueryError(f"(id {item['id']!r}): {error}") from None
    return QueryJob(item["id"], item["text"],
                    Filter(common.must + own.must, common.must_not + own.must_not), spec)


def embed_jobs(embedder: Embedder, jobs: Sequence[QueryJob]) -> npt.NDArray[np.float32]:
    """The query vectors, in order, :data:`EMBED_BATCH` texts per embedding call."""
    if not jobs:
        return np.empty((0, embedder.dimension), dtype=np.float32)
    parts = [embedder.embed_queries([job.text for job in jobs[start:start + EMBED_BATCH]])
             for start in range(0, len(jobs), EMBED_BATCH)]
    return np.concatenate(parts)


def search_jobs(embedder: Embedder, sink: Sink, jobs: Sequence[QueryJob], k: int,
                mode: str | None = None, sparse: SparseEncoder | None = None,
                retrieval: RetrievalSettings | None = None,
                ) -> Iterator[tuple[QueryJob, list[Hit]]]:
    """Each job with its ``k`` best documents (a hit: the document's best chunk), in
    order; embedded a batch at a time. ``mode``: ``dense``, ``sparse`` or ``hybrid``
    (None: hybrid when the collection holds sparse vectors, else dense; see
    :mod:`embedstream.stream.retrieval`); ``sparse`` makes the queries' sparse vectors."""
    chosen = resolve_mode(mode, sink)  # before any embedding: a bad mode fails fast
    for start in range(0, len(jobs), EMBED_BATCH):
        batch = jobs[start:start + EMBED_BATCH]
        for job, vector in zip(batch, embed_jobs(embedder, batch), strict=True):
            yield job, search_job(sink, job, vector, k, chosen, sparse, retrieval)


def search_job(sink: Sink, job: QueryJob, vector: npt.NDArray[np.float32], k: int, mode: Mode,
               sparse: SparseEncoder | None, retrieval: RetrievalSettings | None = None
               ) -> list[Hit]:
    """One job's ``k`` best documents by ``mode`` (resolved), ``vector`` its embedding."""
    if mode != "dense" and sparse is None:
        raise QueryError(f"search mode {mode!r}: no sparse encoder is configured "
                         "(retrieval.sparse)")
    query = Query(vector.tolist(), None if mode == "dense" or sparse is None
                  else sparse.encode_query(job.text), job.filter or None)
    return search_documents(sink, query, k, mode, retrieval or RetrievalSettings())


def hit_json(hit: Hit) -> dict[str, Any]:
    payload = hit.payload
    return {"doc_id": payload.get("doc_id"), "chunk_index": payload.get("chunk_index"),
            "score": hit.score, "text": payload.get("text")}


def point_json(point: StoredPoint) -> dict[str, Any]:
    return {"id": point.id, "vector": point.vector, "payload": dict(point.payload)}


def document_json(document: StoredDocument) -> dict[str, Any]:
    """An exported document sparse vector: ``{"doc_id", "sparse": {"indices",
    "values"}, "fields"}`` (after every chunk point, in a collection that has them)."""
    return {"doc_id": document.doc_id,
            "sparse": {"indices": list(document.sparse.indices),
                       "values": list(document.sparse.values)},
            "fields": dict(document.fields)}


def export_lines(sink: Sink) -> Iterator[dict[str, Any]]:
    """Everything ``export`` writes of ``sink``: each chunk point, then each document's
    sparse vector (none without them)."""
    for point in sink.points():
        yield point_json(point)
    for document in sink.documents():
        yield document_json(document)
