"""The bulk embedding engine: bounded stages so the model never waits on the CPU.

Stages, each joined to the next by a bounded queue (``bulk.queue_depth`` units)
so memory stays flat whatever the corpus size and a slow stage blocks the
ones before it instead of piling up work:

1. a reader thread cuts the source into units of ``bulk.write_documents`` records;
2. ``bulk.tokenizer_workers`` threads prepare each record (e.g. chunk it) and
   tokenize its texts (Hugging Face fast tokenizers release the GIL);
3. one forward thread per encoder (one per GPU) gathers about
   ``bulk.bucket_texts`` texts, sorts them by length, packs them into batches of
   at most ``batch_tokens`` padded tokens (:func:`~embedstream.stream.embedding.pack_batches`)
   and runs the model;
4. the calling thread receives finished units **in source order** and writes
   them (``write``), so a checkpoint after unit *n* means every record before
   it is written: a resumed run skips exactly that many records.

Every thread is started and joined inside :meth:`BulkEngine.run`; an exception
in any stage stops all of them and is re-raised in the caller. Padding
overhead is measured (``EngineStats.padding_fraction``).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from embedstream.bulk.encoder import AnyEncoder, RemoteEncoder
from embedstream.stream.errors import EmbedFailures

__all__ = ["BulkEngine", "EmbeddedUnit", "EngineStats"]

R = TypeVar("R")  # a source record
P = TypeVar("P")  # what preparing a record gives (e.g. its chunks)

_POLL_S = 0.1  # how often a blocked stage looks at the stop flag


@dataclass(slots=True)
class EngineStats:
    """Running totals; read by progress reporting from the calling thread."""

    records: int = 0
    texts: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    batches: int = 0
    forward_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def padding_fraction(self) -> float:
        """Share of the model's input positions that were padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started


@dataclass(slots=True)
class EmbeddedUnit(Generic[R, P]):
    """Consecutive records with what preparing gave and the vectors of their texts
    (``vectors[i]`` has one row per text of record ``i``)."""

    seq: int
    records: list[R]
    prepared: list[P] = field(default_factory=list)
    texts: list[Sequence[str]] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    flat: npt.NDArray[np.float32] | None = None
    # Records (by index) with a text that could not be embedded, and why: (reason,
    # detail). Their rows in ``vectors`` are not vectors.
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)

    @property
    def vectors(self) -> list[npt.NDArray[np.float32]]:
        assert self.flat is not None
        bounds = list(itertools.accumulate((len(t) for t in self.texts), initial=0))
        return [self.flat[lo:hi] for lo, hi in itertools.pairwise(bounds)]


class _Done:
    """End of a queue's stream."""


_DONE = _Done()


class _Stopped(Exception):
    """Raised inside a stage when another stage failed."""


class BulkEngine(Generic[R, P]):
    """Runs the stages above over one source (see the module docstring)."""

    def __init__(self, encoders: Sequence[AnyEncoder], *, unit_records: int = 256,
                 tokenizer_workers: int = 2, bucket_texts: int = 4096,
                 queue_depth: int = 8) -> None:
        if not encoders:
            raise ValueError("need at least one encoder")
        self._encoders = list(encoders)
        self._unit_records = max(1, unit_records)
        self._tokenizer_workers = max(1, tokenizer_workers)
        self._bucket_texts = max(1, bucket_texts)
        self._queue_depth = max(1, queue_depth)
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()

    def run(self, source: Iterable[R], prepare: Callable[[R], tuple[P, Sequence[str]]],
            write: Callable[[EmbeddedUnit[R, P]], None]) -> EngineStats:
        """Embed every record of ``source``; ``write`` gets each unit in source order.

        ``prepare`` runs on tokenizer threads and must be thread-safe; ``write``
        runs on the calling thread. Returns the final statistics."""
        self.stats = EngineStats()
        stop = threading.Event()
        failures: list[BaseException] = []
        read_q: queue.Queue[Any] = queue.Queue(self._queue_depth)
        token_q: queue.Queue[Any] = queue.Queue(self._queue_depth)
        done_q: queue.Queue[Any] = queue.Queue(self._queue_depth * 2)
        lock = threading.Lock()
        live = {"tokenizers": self._tokenizer_workers, "forwards": len(self._encoders)}

        def guarded(name: str, body: Callable[[], None]) -> threading.Thread:
            def target() -> None:
                try:
                    body()
                except _Stopped:
                    pass
                except BaseException as error:  # surfaced in the caller, never lost
                    failures.append(error)
                    stop.set()
            return threading.Thread(target=target, name=f"embedstream-bulk-{name}", daemon=True)

        def put(q: queue.Queue[Any], item: Any) -> None:
            while True:
                if stop.is_set():
                    raise _Stopped
                try:
                    q.put(item, timeout=_POLL_S)
                    return
                except queue.Full:
                    continue

        def get(q: queue.Queue[Any]) -> Any:
            while True:
                if stop.is_set():
                    raise _Stopped
                try:
                    return q.get(timeout=_POLL_S)
                except queue.Empty:
                    continue

        def finish(q: queue.Queue[Any], counter: str, downstream: queue.Queue[Any]) -> None:
            put(q, _DONE)  # let the stage's other workers see the end too
            with lock:
                live[counter] -= 1
                last = live[counter] == 0
            if last:
                put(downstream, _DONE)

        def read() -> None:
            records = iter(source)
            for seq in itertools.count():
                batch = list(itertools.islice(records, self._unit_records))
                if not batch:
                    break
                put(read_q, EmbeddedUnit[R, P](seq, batch))
            put(read_q, _DONE)

        def tokenize() -> None:
            while not isinstance(unit := get(read_q), _Done):
                for record in unit.records:
                    prepared, texts = prepare(record)
                    unit.prepared.append(prepared)
                    unit.texts.append(texts)
                unit.ids = self._encoders[0].tokenize([t for ts in unit.texts for t in ts])
                put(token_q, unit)
            finish(read_q, "tokenizers", token_q)

        def forward(encoder: AnyEncoder) -> None:
            ended = False
            while not ended:
                first = get(token_q)
                if isinstance(first, _Done):
                    break
                units, count = [first], len(first.ids)
                # Gather without waiting: a busy model should not idle for a full bucket.
                while count < self._bucket_texts:
                    try:
                        more = token_q.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(more, _Done):
                        ended = True
                        break
                    units.append(more)
                    count += len(more.ids)
                # A spread of real texts of the first non-empty bucket decides the
                # precision (a no-op once decided).
                ids = [seq for unit in units for seq in unit.ids]
                encoder.calibrate(ids[::max(1, len(ids) // 256)])
                self._forward(encoder, units)
                for unit in units:
                    put(done_q, unit)
            finish(token_q, "forwards", done_q)

        # The first call sets the shared tokenizer's truncation, a mutation that would
        # race ("Already borrowed") if several workers made it at once.
        self._encoders[0].tokenize(["warm-up"])
        threads = [guarded("reader", read)]
        threads += [guarded(f"tokenizer-{i}", tokenize) for i in range(self._tokenizer_workers)]
        threads += [guarded(f"forward-{i}", lambda e=e: forward(e))  # type: ignore[misc]
                    for i, e in enumerate(self._encoders)]
        for thread in threads:
            thread.start()
        try:
            self._write_in_order(done_q, get, write)
        except _Stopped:
            pass
        except BaseException:
            stop.set()
            raise
        finally:
            stop.set()
            for thread in threads:
                # The reader may sit inside the source (e.g. a Kafka poll) and only sees
                # the stop at its next record; it is a daemon, so do not wait for it long.
                thread.join(timeout=10.0 if thread is threads[0] else None)
        if failures:
            raise failures[0]
        return self.stats

    def _write_in_order(self, done_q: queue.Queue[Any], get: Callable[[queue.Queue[Any]], Any],
                        write: Callable[[EmbeddedUnit[R, P]], None]) -> None:
        waiting: dict[int, EmbeddedUnit[R, P]] = {}
        expected = 0
        while not isinstance(unit := get(done_q), _Done):
            waiting[unit.seq] = unit
            while expected in waiting:
                ready = waiting.pop(expected)
                write(ready)
                self.stats.records += len(ready.records)
                expected += 1

    @staticmethod
    def _remote(encoder: RemoteEncoder, units: list[EmbeddedUnit[R, P]]
                ) -> tuple[npt.NDArray[np.float32], dict[int, tuple[str, str]], float]:
        """The units' texts through the API at once (it packs its own requests), with
        the token counts the tokenizer threads found; the texts that failed, by index."""
        texts = [text for unit in units for record_texts in unit.texts for text in record_texts]
        counts = [len(seq) for unit in units for seq in unit.ids]
        started = time.perf_counter()
        try:
            out, failed = encoder.embed(texts, counts), {}
        except EmbedFailures as partial:
            out, failed = partial.vectors, partial.failed
        return out, failed, time.perf_counter() - started

    def _forward(self, encoder: AnyEncoder, units: list[EmbeddedUnit[R, P]]) -> None:
        ids = [seq for unit in units for seq in unit.ids]
        lengths = [len(seq) for seq in ids]
        if isinstance(encoder, RemoteEncoder):
            out, failed, forward_s = self._remote(encoder, units)
            padded, batches = sum(lengths), 0  # requests are counted by the API's metrics
        else:
            failed = {}
            out = np.empty((len(ids), encoder.dimension), dtype=np.float32)
            forward_s = 0.0
            padded = 0
            packed = encoder.pack(lengths)
            batches = len(packed)
            for batch in packed:
                started = time.perf_counter()
                out[batch] = encoder.encode([ids[i] for i in batch])
                forward_s += time.perf_counter() - started
                padded += encoder.padded_tokens([lengths[i] for i in batch])
        start = 0
        for unit in units:
            unit.flat = out[start:start + len(unit.ids)]
            # A record fails with the first of its texts that failed.
            bounds = itertools.accumulate((len(t) for t in unit.texts), initial=start)
            for record, (lo, hi) in enumerate(itertools.pairwise(bounds)):
                failure = next((failed[i] for i in range(lo, hi) if i in failed), None)
                if failure is not None:
                    unit.failed[record] = failure
            start += len(unit.ids)
        stats = self.stats
        with self._stats_lock:  # several forward threads (one per GPU) add to one total
            stats.texts += len(ids)
            stats.tokens += sum(lengths)
            stats.padded_tokens += padded
            stats.batches += batches
            stats.forward_s += forward_s

