"""Document-level sparse vectors: one per document, from its whole text.

Dense vectors are made per chunk: a small chunk keeps an edit's re-embedding small.
The sparse side scores a document as a whole (BM25 on 48-token chunks loses most of
what it adds to a fusion), so each live document has exactly one sparse vector,
computed here from its full text (title and body, as the chunker sees them) and
stored with the document's state by the sink (:mod:`embedstream.stream.store`).

``bm25``: Qdrant's own BM25 (``qdrant_edge.Bm25``: word tokenizer, stemmer and stop
words of ``retrieval.bm25.language``, term-frequency saturation ``k`` and length
normalisation ``b`` against a fixed ``avg_len``), computed in process for both stores,
so the Edge and server paths hold the same weights. The inverse document frequency is
not in the vector: the store's ``Idf`` modifier applies it at search time from the
documents it holds now, so no weight goes stale as documents change (on segments the
store has not optimized: an optimized segment counts the documents replaced or
deleted in it until it is vacuumed; embedstream never optimizes an Edge state shard,
a Qdrant server does by itself; README, "Hybrid search").

``splade``: a sentence-transformers ``SparseEncoder`` (``retrieval.splade_model``);
a document's vector is the element-wise maximum of its chunks' (SPLADE pools by max
over tokens, so this is the same pooling over the whole document), made from the
chunk texts the dense side embeds.

Pure: no I/O once built; the encoder is built in one place and passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from embedstream.stream._retrieval_settings import RetrievalSettings
from embedstream.stream.errors import ConfigError

__all__ = ["SPARSE_NAME", "Bm25Encoder", "SparseEncoder", "SparseVector", "as_pairs",
           "build_sparse_encoder", "document_text", "sparse_spec", "uses_idf"]

# Name of the sparse vector in the store (the state collection's named sparse vector).
SPARSE_NAME = "sparse"


@dataclass(frozen=True, slots=True)
class SparseVector:
    """Term ids (ascending, unique) and their weights."""

    indices: tuple[int, ...]
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.values):
            raise ValueError("a sparse vector needs as many values as indices")

    def __bool__(self) -> bool:
        return bool(self.indices)


class SparseEncoder(Protocol):
    """Makes a document's and a query's sparse vectors."""

    @property
    def spec(self) -> str:
        """What decides the weights, for the fingerprint (e.g. ``bm25(k=1.2,...)``)."""
        ...

    def encode_document(self, text: str, chunks: Sequence[str] = ()) -> SparseVector:
        """The vector of a document: its whole ``text`` and its ``chunks`` (the texts its
        dense vectors were made from; a model-based encoder may use those instead)."""
        ...

    def encode_query(self, text: str) -> SparseVector: ...


def sparse_spec(settings: RetrievalSettings) -> str:
    """The fingerprint's ``sparse`` field for these settings ("none" when off)."""
    if settings.sparse == "none":
        return "none"
    if settings.sparse == "bm25":
        bm25 = settings.bm25
        # The language as Qdrant reads it (any case): "English" makes the same weights.
        return (f"bm25(k={bm25.k:g},b={bm25.b:g},avg_len={bm25.avg_len:g},"
                f"language={bm25.language.lower()})")
    return f"splade(model={settings.splade_model})"


def uses_idf(spec: str) -> bool:
    """Whether the store applies IDF to vectors of this spec: BM25's carry only term
    frequency (the store's ``Idf`` modifier adds the rest); a SPLADE model's weights
    are complete as they are."""
    return spec.startswith("bm25")


def document_text(text: str, title: str | None) -> str:
    """A document's whole text as the sparse side reads it: title, then body."""
    return f"{title}\n\n{text}" if title else text


def _sorted(indices: Sequence[int], values: Sequence[float]) -> SparseVector:
    pairs = sorted(zip(indices, values, strict=True))
    return SparseVector(tuple(int(i) for i, _ in pairs), tuple(float(v) for _, v in pairs))


class Bm25Encoder:
    """BM25 with Qdrant's tokenizer and weights (see the module docstring)."""

    def __init__(self, settings: RetrievalSettings) -> None:
        import qdrant_edge as qe

        bm25 = settings.bm25
        language = _language(bm25.language)
        try:
            self._model = qe.Bm25(qe.Bm25Config(k=bm25.k, b=bm25.b, avg_len=bm25.avg_len,
                                                language=language))
        except Exception as error:  # the binding's own types: a ValueError-like refusal
            raise ConfigError(f"retrieval.bm25: {error}") from None
        self._spec = sparse_spec(settings)

    @property
    def spec(self) -> str:
        return self._spec

    def encode_document(self, text: str, chunks: Sequence[str] = ()) -> SparseVector:
        found = self._model.embed_document(text)
        return _sorted(found.indices, found.values)

    def encode_query(self, text: str) -> SparseVector:
        found = self._model.embed_query(text)
        return _sorted(found.indices, found.values)


def _language(name: str) -> str:
    import qdrant_edge as qe

    known = {n.lower() for n in dir(qe.Language) if not n.startswith("_")}
    if name.lower() not in known:
        raise ConfigError(f"retrieval.bm25.language: {name!r} is not one of "
                          f"{', '.join(sorted(known))}")
    return name.lower()


def build_sparse_encoder(settings: RetrievalSettings, device: str = "cpu"
                         ) -> SparseEncoder | None:
    """The encoder ``retrieval.sparse`` asks for; ``None`` for ``none``."""
    if settings.sparse == "none":
        return None
    if settings.sparse == "bm25":
        return Bm25Encoder(settings)
    from embedstream.stream._splade import SpladeEncoder

    return SpladeEncoder(settings, device)


def as_pairs(vector: Any) -> SparseVector:
    """A store's sparse vector (anything with ``indices`` and ``values``) as ours."""
    return _sorted(list(vector.indices), list(vector.values))
