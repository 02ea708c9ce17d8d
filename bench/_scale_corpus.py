"""The scale bench's data: real embeddings of the MS MARCO sample, copied with noise.

The sample's passages and queries are embedded once with all-MiniLM-L6-v2 on torch
fp32 (by running this file, in a process of its own: torch stays out of the bench's
RSS) and kept in ``$XDG_CACHE_HOME/embedstream/scale-bench`` (``~/.cache`` without it;
a temporary folder when that is not writable), named by a digest of the data and model.

:class:`Corpus` is a store's contents, the same in every process for a seed: document
``d`` has 1-3 chunk points; point ``g`` is passage ``g % P`` plus Gaussian noise of
``sigma`` per dimension, renormalized. Copies are distinct and the neighbourhoods keep
the sample's structure: at the default sigma, 0.02, a copy is at cosine ~0.93 from its
passage and two copies ~0.87 from each other, while a passage's nearest other passage
in the sample is at a median 0.80 (and 0.99 at the 90th percentile: BM25 candidates
hold near-duplicates), so a query's neighbours mix copies of several passages as in
the sample, and a quantized index has near ties to tell apart. Nothing is held
per point: vectors are drawn again per block of ``BLOCK`` points when needed, so the
bench's own memory does not grow with the store it measures.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, chunk_point_id

from _common import MODEL, MSMARCO, PASSAGES, log, read_passages

__all__ = ["BLOCK", "CATEGORIES", "Corpus", "K", "cache_file", "category", "load_sample",
           "more_queries"]

QUERIES = MSMARCO / "queries.tsv"
K = 10
CATEGORIES = 20  # values of the filter field: a match selects ~5% of the points
BLOCK = 1024  # points per noise block: the unit of deterministic generation


def cache_file() -> Path:
    """Where the sample's embeddings are kept, named by the data and model they come from."""
    digest = hashlib.sha256(MODEL.encode())
    for file in (PASSAGES, QUERIES):
        digest.update(file.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "embedstream" / "scale-bench"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable cache: a temporary folder (embedded again next run)
        folder = Path(tempfile.gettempdir()) / "embedstream-scale-bench"
        folder.mkdir(exist_ok=True)
    return folder / f"msmarco-minilm-torch-fp32-{digest.hexdigest()[:12]}.npz"


def embed_sample(target: Path) -> None:
    """Embed the passages and queries once (in a child process: torch stays out of the
    RSS the bench measures) into ``target``."""
    from embedstream.stream.local_encoder import LocalEncoder

    encoder = LocalEncoder(MODEL, device="cpu", backend="torch", precision="fp32")
    passages = encoder.embed(read_passages(PASSAGES))
    queries = encoder.embed_queries(read_passages(QUERIES))
    partial = target.with_suffix(".tmp.npz")
    np.savez(partial, passages=passages, queries=queries)
    os.replace(partial, target)


def load_sample(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """The passages' and queries' unit vectors, embedded first if ``cache`` is missing."""
    if not cache.exists():
        log(f"embedding the MS MARCO sample once (torch fp32) into {cache}")
        subprocess.run([sys.executable, __file__, str(cache)], check=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with np.load(cache) as data:
        return _unit(data["passages"]), _unit(data["queries"])


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = vectors.astype(np.float32)
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


def more_queries(queries: np.ndarray, count: int, sigma: float, seed: int) -> np.ndarray:
    """The sample's queries, then perturbed copies of them (as the points are) up to
    ``count``: a p99 over 100 queries is their slowest one."""
    if count <= len(queries):
        return queries[:count]
    rng = np.random.default_rng(seed + 7)
    extra = queries[np.arange(count - len(queries)) % len(queries)]
    extra = extra + rng.normal(0.0, sigma, extra.shape).astype(np.float32)
    return np.concatenate([queries, _unit(extra)])


class Corpus:
    """The store's contents, made the same in every process from ``seed``: document
    ``d`` holds points ``starts[d]..starts[d+1]-1`` (1-3 of them); point ``g`` is passage
    ``g % P`` perturbed by noise drawn per block of ``BLOCK`` points."""

    def __init__(self, base: np.ndarray, sigma: float, seed: int, max_points: int) -> None:
        self.base, self.sigma, self.seed = base, sigma, seed
        self.texts = read_passages(PASSAGES)
        self.hashes = [hashlib.sha256(t.encode()).hexdigest() for t in self.texts]
        counts = np.random.default_rng(seed).integers(1, 4, max_points)
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self._blocks: dict[int, np.ndarray] = {}

    def docs_for(self, points: int) -> int:
        """The fewest whole documents that hold at least ``points`` points."""
        return int(np.searchsorted(self.starts, points, "left"))

    def points_in(self, docs: int) -> int:
        return int(self.starts[docs])

    def _block(self, index: int) -> np.ndarray:
        found = self._blocks.get(index)
        if found is None:
            ids = np.arange(index * BLOCK, (index + 1) * BLOCK)
            noise = np.random.default_rng((self.seed, index)).standard_normal(
                (BLOCK, self.base.shape[1]), dtype=np.float32)
            found = _unit(self.base[ids % len(self.base)] + self.sigma * noise)
            if len(self._blocks) >= 8:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[index] = found
        return found

    def vectors(self, start: int, end: int) -> np.ndarray:
        parts = [self._block(b)[max(start - b * BLOCK, 0):end - b * BLOCK]
                 for b in range(start // BLOCK, (end - 1) // BLOCK + 1)]
        return np.concatenate(parts)

    def write(self, doc: int, version: int, offset: int, deleted: bool = False) -> DocumentWrite:
        """Document ``doc`` as the stream would write it (its payload as ``build_write``'s)."""
        doc_id, state = f"d{doc}", DocState(version, offset, deleted, topic="scale",
                                            partition=0)
        if deleted:
            return DocumentWrite(doc_id, state)
        start, end = int(self.starts[doc]), int(self.starts[doc + 1])
        chunks, at = [], 0
        for j, (g, vector) in enumerate(zip(range(start, end), self.vectors(start, end),
                                            strict=True)):
            text = self.texts[g % len(self.texts)]
            chunks.append(ChunkPoint(j, vector, {
                "doc_id": doc_id, "chunk_index": j, "text": text, "start": at,
                "end": at + len(text), "version": version, "content_hash":
                self.hashes[g % len(self.texts)], "category": category(doc)}))
            at += len(text) + 1
        return DocumentWrite(doc_id, state, chunks)

    def point_id(self, g: int) -> str:
        doc = int(np.searchsorted(self.starts, g, "right")) - 1
        return chunk_point_id(f"d{doc}", g - int(self.starts[doc]))

    def exact(self, queries: np.ndarray, points: int) -> tuple[list[set[str]], list[set[str]]]:
        """The true top ``K`` ids of each query among the first ``points`` points, and
        among those of the query's category (query ``i``: category ``i % CATEGORIES``)."""
        wanted = np.arange(len(queries)) % CATEGORIES
        tops = [(np.full((len(queries), K), -np.inf), np.zeros((len(queries), K), np.int64))
                for _ in range(2)]
        for start in range(0, points, BLOCK * 16):
            end = min(points, start + BLOCK * 16)
            scores, ids = queries @ self.vectors(start, end).T, np.arange(start, end)
            docs = np.searchsorted(self.starts, ids, "right") - 1
            masked = np.where(wanted[:, None] == docs[None, :] % CATEGORIES, scores, -np.inf)
            for (best, best_ids), found in zip(tops, (scores, masked), strict=True):
                merged = np.concatenate((best, found), axis=1)
                merged_ids = np.concatenate(
                    (best_ids, np.broadcast_to(ids, found.shape)), axis=1)
                keep = np.argpartition(-merged, K - 1, axis=1)[:, :K]
                best[:] = np.take_along_axis(merged, keep, 1)
                best_ids[:] = np.take_along_axis(merged_ids, keep, 1)
        plain, filtered = ([{self.point_id(int(g)) for g in row} for row in best_ids]
                           for _, best_ids in tops)
        return plain, filtered


def category(doc: int) -> str:
    return f"c{doc % CATEGORIES:02d}"


if __name__ == "__main__":
    embed_sample(Path(sys.argv[1]))
