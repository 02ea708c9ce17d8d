"""Document sparse vectors in both Qdrant sinks (see :mod:`embedstream.sinks._layout`,
"Sparse vectors"): the store protocol's sparse search and export, and the check of an
adopted state collection, over the primitives each store supplies.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from embedstream.sinks._layout import Record, Scored, state_filter, stored_document
from embedstream.sinks._primitives import SinkPrimitives
from embedstream.stream.errors import FingerprintMismatch
from embedstream.stream.filters import Filter
from embedstream.stream.sparse import SparseVector, uses_idf
from embedstream.stream.store import Hit, StoredDocument

__all__ = ["DocumentVectors"]


class DocumentVectors(SinkPrimitives):
    """Mixed into :class:`~embedstream.sinks._collection.CollectionSink`, which sets
    ``_sparse_spec`` when it opens a collection and supplies the primitives."""

    # The open collection's fingerprint sparse spec ("none": no sparse vectors).
    _sparse_spec: str

    @property
    def sparse(self) -> bool:
        return self._sparse_spec != "none"

    @property
    def _sparse_idf(self) -> bool:
        """Whether the store applies IDF to the sparse vectors (see ``_make``)."""
        return uses_idf(self._sparse_spec)

    @abstractmethod
    def _nearest_documents(self, vector: SparseVector, limit: int,
                           only: Filter | None) -> Sequence[Scored]:
        """The ``limit`` state points of the highest sparse score (among those
        ``only``, already on ``fields.<name>``, matches), with their payloads."""

    @abstractmethod
    def _documents_page(self, offset: Any) -> tuple[Sequence[Record], Any]:
        """One page of state points with their payloads and sparse vectors (as
        the client returns them), and the offset of the next (None after the last)."""

    def search_sparse(self, vector: SparseVector, limit: int,
                      filter: Filter | None = None) -> list[Hit]:
        self._check_open()
        if limit <= 0 or not self.sparse or not vector:
            return []
        with self._errors("search"):
            found = self._nearest_documents(vector, limit, state_filter(filter))
        return [Hit(str(p.id), p.score, p.payload or {}) for p in found]

    def documents(self) -> Iterator[StoredDocument]:
        self._check_open()
        offset: Any = None
        while self.sparse:
            with self._errors("scroll"):
                records, offset = self._documents_page(offset)
            yield from filter(None, map(stored_document, records))
            if offset is None:
                return

    def _check_leftover_sparse(self, sparse: bool, idf: bool) -> None:
        """Refuse an empty leftover state part whose sparse vector (``sparse``, with the
        ``Idf`` modifier: ``idf``) is not what this fingerprint needs."""
        if (sparse, idf) != (self.sparse, self.sparse and self._sparse_idf):
            raise FingerprintMismatch(
                f"{self._where}: the empty state collection a creation left was made for "
                f"other sparse vectors (retrieval.sparse) than {self._sparse_spec!r}; drop it "
                "(embedstream collections drop NAME) and start again")
