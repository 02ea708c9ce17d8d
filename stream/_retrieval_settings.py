"""The ``retrieval`` section: document-level sparse vectors and how search fuses rankings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from embedstream.stream._section import Section

__all__ = ["Bm25Settings", "RetrievalSettings"]


class Bm25Settings(Section):
    """BM25's document weighting (Qdrant's ``Bm25``). ``avg_len`` is fixed, not measured
    on the corpus: a stream has no corpus-wide statistic it could keep right as documents
    change (the IDF side is the store's ``Idf`` modifier). The defaults are Qdrant's:
    on SciFact's train split a grid around them moved nDCG@10 by under 0.01 (README,
    "Hybrid search")."""

    k: float = Field(default=1.2, ge=0)
    b: float = Field(default=0.75, ge=0, le=1)
    avg_len: float = Field(default=256.0, gt=0)
    language: str = "english"  # stemmer and stop words; Qdrant's language names


class RetrievalSettings(Section):
    """``sparse``: ``none`` (dense chunks only), ``bm25`` (one BM25 vector per document,
    from its whole text) or ``splade`` (a sentence-transformers ``SparseEncoder``,
    ``splade_model``). Turning it on or off, or changing ``bm25``, needs a rebuild: the
    collection's fingerprint names it.

    ``fusion`` (``rrf`` with ``rrf_k``, or ``dbsf``) joins the dense ranking (documents by
    their best chunk) and the sparse one (documents by their vector), each cut at
    ``depth`` documents."""

    sparse: Literal["none", "bm25", "splade"] = "none"
    bm25: Bm25Settings = Bm25Settings()
    splade_model: str | None = None
    fusion: Literal["rrf", "dbsf"] = "rrf"
    rrf_k: int = Field(default=60, ge=1)
    depth: int = Field(default=100, ge=1, le=10_000)
