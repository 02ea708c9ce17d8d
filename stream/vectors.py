"""Vectors for the chunks a batch writes: reused where the store holds the exact
text, embedded otherwise, and split in halves when embedding runs out of memory.

Guarantees: every returned vector is the embedder's vector of exactly its
chunk's text (reused vectors are keyed by the text's sha256 and were made under
the collection's fingerprint). A text that cannot be embedded even alone is
reported as failed, never given a placeholder vector.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .chunking import Chunk
from .embedding import Embedder
from .metrics import Metrics

__all__ = ["ChunkVectors", "is_out_of_memory"]

Matrix = npt.NDArray[np.float32]
# Stored vectors of these documents' chunks, by content hash.
ReadStored = Callable[[Sequence[str]], Mapping[str, Sequence[float]]]


def is_out_of_memory(error: BaseException) -> bool:
    """Host or device memory ran out (torch raises ``torch.OutOfMemoryError``,
    a RuntimeError, for CUDA; some backends only say so in the message)."""
    return (isinstance(error, MemoryError)
            or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower()))


class ChunkVectors:
    def __init__(self, embedder: Embedder, metrics: Metrics) -> None:
        self._embedder = embedder
        self._metrics = metrics

    def for_chunks(
        self, chunks: Sequence[Chunk], reusable_docs: Sequence[str], read_stored: ReadStored
    ) -> tuple[dict[str, Matrix], set[str]]:
        """Vectors by content hash for ``chunks``, and the content hashes that failed.

        Only documents in ``reusable_docs`` (live in the store) are asked for
        stored vectors; identical texts within the batch are embedded once."""
        if not chunks:
            return {}, set()
        vectors: dict[str, Matrix] = {}
        if reusable_docs:
            wanted = {chunk.content_hash for chunk in chunks}
            vectors = {h: np.asarray(v, np.float32)
                       for h, v in read_stored(reusable_docs).items() if h in wanted}
        new_texts: dict[str, str] = {}
        for chunk in chunks:
            if chunk.content_hash not in vectors:
                new_texts.setdefault(chunk.content_hash, chunk.text)
        failed: set[str] = set()
        if new_texts:
            with self._metrics.embed_seconds.time():
                rows = self._embed_halving(list(new_texts.values()))
            for content_hash, row in zip(new_texts, rows, strict=True):
                if row is None:
                    failed.add(content_hash)
                else:
                    vectors[content_hash] = row
        self._count(chunks, set(new_texts) - failed, failed)
        return vectors, failed

    def _embed_halving(self, texts: list[str]) -> list[Matrix | None]:
        """Embed; on running out of memory, retry each half (down to one text,
        which then fails alone). Any other error propagates."""
        try:
            rows = list(self._embedder.embed(texts))
            self._observe_padding()
            return rows
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        # Retried outside the except block: the exception's frames hold the
        # failed attempt's tensors, which must be freed before trying again.
        if len(texts) == 1:
            return [None]
        self._metrics.embed_splits.inc()
        middle = len(texts) // 2
        return self._embed_halving(texts[:middle]) + self._embed_halving(texts[middle:])

    def _observe_padding(self) -> None:
        # Only embedders that measure it (SentenceTransformerEmbedder) say how much of
        # their forward passes was padding; the Embedder protocol does not require it.
        padded = getattr(self._embedder, "last_padded_tokens", 0)
        if padded:
            real = getattr(self._embedder, "last_tokens", 0)
            self._metrics.embed_padding.observe(max(0.0, 1.0 - real / padded))

    def _count(self, chunks: Sequence[Chunk], embedded: Collection[str],
               failed: Collection[str]) -> None:
        metrics = self._metrics
        seen: set[str] = set()
        for chunk in chunks:
            if chunk.content_hash in failed:
                continue
            outcome = ("embedded" if chunk.content_hash in embedded
                       and chunk.content_hash not in seen else "reused")
            seen.add(chunk.content_hash)
            metrics.chunks.labels(outcome=outcome).inc()
            metrics.tokens.labels(outcome=outcome).inc(chunk.n_tokens)
