"""``retrieval.sparse: splade``: document sparse vectors from a sentence-transformers
``SparseEncoder`` (SPLADE and its kin: a masked-language-model head, max-pooled over
tokens into one weight per vocabulary term).

A document's vector is the element-wise maximum of its chunks' vectors. SPLADE pools
by maximum over tokens, so this is the same pooling over the whole document, computed
on windows the model can read (the chunks, at most ``chunk.max_tokens`` tokens each,
which a SPLADE model's 512-token window holds) instead of a truncated whole text. The
store applies no IDF to these (the model's weights are complete:
:func:`embedstream.stream.sparse.uses_idf`).

Whether a per-document vector ranks as well as per-chunk ones has not been measured:
no SPLADE model can be had on the machines here (no hub access), and a tiny random
one proves the plumbing only. BM25 measured the other way (README, "Hybrid search"):
per document beats per chunk there by 0.06 nDCG@10 on SciFact.

Not guaranteed: speed. The model runs in the consumer's loop, one document at a time
(its chunks in one call), on ``embed.device``; on a CPU it costs about as much as the
dense model per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from embedstream.stream._retrieval_settings import RetrievalSettings
from embedstream.stream.embedding import resolve_model_path
from embedstream.stream.errors import ConfigError
from embedstream.stream.sparse import SparseVector, sparse_spec

__all__ = ["SpladeEncoder"]


class SpladeEncoder:
    """Document and query vectors of a sentence-transformers ``SparseEncoder``."""

    def __init__(self, settings: RetrievalSettings, device: str = "auto") -> None:
        import torch
        from sentence_transformers import SparseEncoder

        if not settings.splade_model:
            raise ConfigError("retrieval.sparse is splade: set retrieval.splade_model to a "
                              "sentence-transformers SparseEncoder (a local directory or a "
                              "Hugging Face Hub name)")
        try:
            path = resolve_model_path(settings.splade_model)
        except ConfigError as error:
            raise ConfigError(f"retrieval.splade_model: {error}") from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._torch = torch
        self._model: Any = SparseEncoder(path, device=device)
        self._model.eval()
        self._spec = sparse_spec(settings)

    @property
    def spec(self) -> str:
        return self._spec

    def encode_document(self, text: str, chunks: Sequence[str] = ()) -> SparseVector:
        texts = list(chunks) or ([text] if text.strip() else [])
        if not texts:
            return SparseVector((), ())
        with self._torch.inference_mode():
            rows = self._model.encode_document(texts, convert_to_tensor=True,
                                               convert_to_sparse_tensor=False)
        return _nonzero(rows.max(dim=0).values)

    def encode_query(self, text: str) -> SparseVector:
        with self._torch.inference_mode():
            [row] = self._model.encode_query([text], convert_to_tensor=True,
                                             convert_to_sparse_tensor=False)
        return _nonzero(row)


def _nonzero(row: Any) -> SparseVector:
    indices = row.nonzero().flatten()
    values = row[indices]
    return SparseVector(tuple(int(i) for i in indices.tolist()),
                        tuple(float(v) for v in values.tolist()))
