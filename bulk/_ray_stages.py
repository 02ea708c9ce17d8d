"""The stages of :class:`~embedstream.bulk.ray_engine.RayEngine` that run on the cluster.

They live at module level, in a module of their own, so Ray workers import them
by name; the driver side is :mod:`embedstream.bulk.ray_engine`.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pyarrow as pa

from embedstream.stream.backend_choice import QualityGuard
from embedstream.stream.config import PromptSettings
from embedstream.stream.local_encoder import LocalEncoder

__all__ = ["CALIBRATION_TEXTS", "EmbedActor", "TokenizerSpec", "feed_datasource",
           "tokenize_batch"]

CALIBRATION_TEXTS = 256



@dataclass(frozen=True, slots=True)
class TokenizerSpec:
    """What :meth:`LocalEncoder.tokenize` reads of documents, small enough to ship to tasks."""

    tokenizer: Any
    max_seq_length: int
    document_prompt: str = ""

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # LocalEncoder's own code, not a copy: truncation cannot drift from the local engine.
        return LocalEncoder.tokenize(cast(LocalEncoder, self), texts)


def _read_feed(queue: Any) -> Iterator[pa.Table]:
    """The read task: windows from the driver's queue, one block per unit."""
    while (window := queue.get()) is not None:
        for seq, texts in window:
            yield pa.table({"seq": pa.array([seq], pa.int64()),
                            "texts": pa.array([texts], pa.list_(pa.string()))})


def tokenize_batch(batch: pa.Table, tokenizer: TokenizerSpec) -> pa.Table:
    """A tokenize task: each unit's texts -> its token ids (flat) and their lengths."""
    ids: list[list[int]] = []
    lengths: list[list[int]] = []
    for texts in batch.column("texts").to_pylist():
        unit_ids = tokenizer.tokenize(texts)
        ids.append(list(itertools.chain.from_iterable(unit_ids)))
        lengths.append([len(seq) for seq in unit_ids])
    return pa.table({
        "seq": batch.column("seq"),
        "ids": pa.array(ids, pa.list_(pa.int32())),
        "lengths": pa.array(lengths, pa.list_(pa.int32())),
    })


class EmbedActor:
    """An embed actor: one :class:`LocalEncoder`, calibrated on its first batch."""

    def __init__(self, model: str, device: str, backend: str, precision: str,
                 batch_tokens: int, guard: tuple[float, float],
                 prompts: PromptSettings | None = None) -> None:
        # The prompts too: a model whose pooling leaves them out needs their length.
        self._encoder = LocalEncoder(model, device=device, backend=backend,
                                     precision=precision, batch_tokens=batch_tokens,
                                     guard=QualityGuard(*guard), prompts=prompts)
        self._calibrated = False

    def __call__(self, batch: pa.Table) -> pa.Table:
        encoder = self._encoder
        ids: list[list[int]] = []
        counts: list[int] = []
        for flat, lengths in zip(batch.column("ids").to_pylist(),
                                 batch.column("lengths").to_pylist(), strict=True):
            bounds = itertools.accumulate(lengths, initial=0)
            ids.extend(flat[lo:hi] for lo, hi in itertools.pairwise(bounds))
            counts.append(len(lengths))
        if not self._calibrated and ids:
            # A spread of real texts from the first batch decides the backend.
            encoder.calibrate(ids[::max(1, len(ids) // CALIBRATION_TEXTS)])
            self._calibrated = True
        lengths_all = [len(seq) for seq in ids]
        out = np.empty((len(ids), encoder.dimension), dtype=np.float32)
        batches = encoder.pack(lengths_all)
        forward_s = 0.0
        padded = 0
        for rows in batches:
            started = time.perf_counter()
            out[rows] = encoder.encode([ids[i] for i in rows])
            forward_s += time.perf_counter() - started
            padded += encoder.padded_tokens([lengths_all[i] for i in rows])
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(np.asarray(counts, dtype=np.int64) * encoder.dimension, out=offsets[1:])
        units = len(counts)
        token_bounds = list(itertools.accumulate(counts, initial=0))
        first = [1] + [0] * (units - 1)  # batch-wide totals go on the first row only
        return pa.table({
            "seq": batch.column("seq"),
            "ids": batch.column("ids"),
            "lengths": batch.column("lengths"),
            "vectors": pa.LargeListArray.from_arrays(pa.array(offsets),
                                                     pa.array(out.reshape(-1))),
            "tokens": pa.array([sum(lengths_all[lo:hi]) for lo, hi
                                in itertools.pairwise(token_bounds)], pa.int64()),
            "padded_tokens": pa.array([padded * f for f in first], pa.int64()),
            "batches": pa.array([len(batches) * f for f in first], pa.int64()),
            "forward_s": pa.array([forward_s * f for f in first], pa.float64()),
            "precision": pa.array([encoder.precision] * units, pa.string()),
        })


def feed_datasource(queue: Any) -> Any:
    """A Ray Data source with one endless read task fed by ``queue`` (see ``_read_feed``)."""
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class _Feed(Datasource):
        def __init__(self, queue: Any) -> None:
            self._queue = queue

        @property
        def supports_distributed_reads(self) -> bool:
            return False  # the read task stays on the driver's node, beside the queue

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                 input_files=None)
            return [ReadTask(functools.partial(_read_feed, self._queue), meta)]

        def get_name(self) -> str:
            return "EmbedstreamFeed"

    return _Feed(queue)


