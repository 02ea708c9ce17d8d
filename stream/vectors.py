"""Vectors for the chunks a batch writes: reused where the store holds the exact
text, embedded otherwise, and split in halves when embedding runs out of memory.

Guarantees: every returned vector is the embedder's vector of exactly what its
chunk embeds, :attr:`~embedstream.stream.chunking.Chunk.embed_text` (its text, after
the title's header when there is one; reused vectors are keyed by that input's
sha256, ``content_hash``, and were made under the collection's fingerprint). A
text that cannot be embedded even alone (out of memory, or refused by a remote
provider: :class:`~embedstream.stream.errors.EmbedFailures`) is reported as failed
with its reason, never given a placeholder vector.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from embedstream.stream.chunking import Chunk
from embedstream.stream.embedding import Embedder
from embedstream.stream.errors import EmbedderUnavailable, EmbedFailures
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import Folded
from embedstream.stream.store import DocState

__all__ = ["ChunkVectors", "Failure", "failure_of", "is_out_of_memory"]

Matrix = npt.NDArray[np.float32]
# Why a text has no vector: (reason code, detail).
Failure = tuple[str, str]
_OUT_OF_MEMORY: Failure = ("embed_out_of_memory", "a chunk of this document could not be "
                                                  "embedded even alone (out of memory)")
# Stored vectors of these documents' chunks, by content hash.
ReadStored = Callable[[Sequence[str]], Mapping[str, Sequence[float]]]


def is_out_of_memory(error: BaseException) -> bool:
    """Host or device memory ran out (torch raises ``torch.OutOfMemoryError``,
    a RuntimeError, for CUDA; some backends only say so in the message)."""
    return (isinstance(error, MemoryError)
            or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower()))


def failure_of(chunks: Sequence[Chunk], failed: Mapping[str, Failure]) -> Failure | None:
    """Why a document with these chunks cannot be written (its first failed chunk), if so."""
    return next((failed[c.content_hash] for c in chunks if c.content_hash in failed), None)


# Vectors kept from calls cut short by an outage, at most (cleared beyond).
_CARRY_LIMIT = 20_000


class ChunkVectors:
    def __init__(self, embedder: Embedder, metrics: Metrics) -> None:
        self._embedder = embedder
        self._metrics = metrics
        # Vectors that arrived in a call the provider then failed (EmbedderUnavailable),
        # by content hash: the retry uses them instead of asking again, so it makes
        # progress even when a slow provider cannot finish one call in its budget.
        self._carried: dict[str, Matrix] = {}

    def for_chunks(
        self, chunks: Sequence[Chunk], reusable_docs: Sequence[str], read_stored: ReadStored
    ) -> tuple[dict[str, Matrix], dict[str, Failure]]:
        """Vectors by content hash for ``chunks``, and why the content hashes that failed did.

        Only documents in ``reusable_docs`` (live in the store) are asked for
        stored vectors; identical texts within the batch are embedded once."""
        if not chunks:
            return {}, {}
        vectors: dict[str, Matrix] = {}
        if reusable_docs:
            wanted = {chunk.content_hash for chunk in chunks}
            vectors = {h: np.asarray(v, np.float32)
                       for h, v in read_stored(reusable_docs).items() if h in wanted}
        embedded: set[str] = set()
        new_texts: dict[str, str] = {}
        for chunk in chunks:
            if chunk.content_hash in self._carried:
                vectors[chunk.content_hash] = self._carried.pop(chunk.content_hash)
                embedded.add(chunk.content_hash)
            if chunk.content_hash not in vectors:
                new_texts.setdefault(chunk.content_hash, chunk.embed_text)
        embedded |= new_texts.keys()
        failed: dict[str, Failure] = {}
        if new_texts:
            with self._metrics.embed_seconds.time():
                try:
                    rows = self._embed_halving(list(new_texts.values()))
                except EmbedderUnavailable as outage:
                    self._carry(list(new_texts), outage)
                    raise
            for content_hash, row in zip(new_texts, rows, strict=True):
                if isinstance(row, tuple):
                    failed[content_hash] = row
                else:
                    vectors[content_hash] = row
        self._count(chunks, embedded - failed.keys(), failed.keys())
        return vectors, failed

    def _carry(self, hashes: list[str], outage: EmbedderUnavailable) -> None:
        if len(self._carried) + len(outage.partial) > _CARRY_LIMIT:
            self._carried.clear()  # batches that were dropped (e.g. partitions revoked)
        for index, row in outage.partial.items():
            self._carried[hashes[index]] = row

    def for_winners(self, winners: Sequence[Folded], stored: Mapping[str, DocState],
                    read_stored: ReadStored) -> tuple[dict[str, Matrix], dict[str, Failure]]:
        """:meth:`for_chunks` for the chunks of folded documents' winning events; only
        documents the store holds live (``stored``) can have vectors worth reusing."""
        chunks = [chunk for item in winners if item.winner for chunk in item.winner.chunks]
        reusable = [item.winner.event.doc_id for item in winners
                    if item.winner and item.winner.chunks
                    and (state := stored.get(item.winner.event.doc_id)) and not state.deleted]
        return self.for_chunks(chunks, reusable, read_stored)

    def _embed_halving(self, texts: list[str]) -> list[Matrix | Failure]:
        """Embed; on running out of memory, retry each half (down to one text,
        which then fails alone). Texts the embedder failed for good keep their
        reason. Any other error propagates."""
        try:
            rows: list[Matrix | Failure] = list(self._embedder.embed(texts))
            self._observe_padding()
            return rows
        except EmbedFailures as partial:
            return [partial.failed.get(i) or row for i, row in enumerate(partial.vectors)]
        except Exception as error:
            if not is_out_of_memory(error):
                raise
        # Retried outside the except block: the exception's frames hold the
        # failed attempt's tensors, which must be freed before trying again.
        if len(texts) == 1:
            return [_OUT_OF_MEMORY]
        self._metrics.embed_splits.inc()
        middle = len(texts) // 2
        try:
            return self._embed_halving(texts[:middle]) + self._embed_halving(texts[middle:])
        except EmbedderUnavailable as outage:
            outage.partial = {}  # indexes into a part, not the whole list: keep none
            raise

    def _observe_padding(self) -> None:
        # Only embedders that measure it (LocalEncoder) say how much of
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
