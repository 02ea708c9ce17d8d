"""The bulk embedding engine on Ray Data, so a rebuild spreads over a cluster.

:class:`RayEngine` has the contract of :class:`~embedstream.bulk.engine.BulkEngine`:
``run(source, prepare, write) -> EngineStats``, with the same
:class:`~embedstream.bulk.engine.EmbeddedUnit` objects handed to ``write`` in source order,
so ``embedstream rebuild --engine ray`` swaps one for the other. The stages:

1. **driver, feeder thread**: cuts ``source`` into units of ``unit_records``
   records, calls ``prepare`` on each record (so ``prepare`` may hold things
   that cannot be pickled, like the rebuild's chunker) and hands windows of
   ``window_units`` units to the cluster through a queue actor;
2. **one read task** (on the driver's node, no CPU reserved) turns each window
   into blocks of a few units (``seq`` and the unit's flattened texts);
3. **tokenize tasks** (``map_batches``, one CPU each) tokenize with the model's
   own tokenizer, truncated to ``max_seq_length`` by the very code of
   :meth:`LocalEncoder.tokenize <embedstream.stream.local_encoder.LocalEncoder.tokenize>`;
4. **a fixed pool of ``actors`` embed actors** (``map_batches`` with a callable
   class, ``gpus_per_actor`` / ``cpus_per_actor`` each): each builds one
   :class:`~embedstream.stream.local_encoder.LocalEncoder` and settles its backend once
   (a kept decision, else measured on its first batch under the quality guard), then packs
   each batch's
   texts by length into token-budgeted batches (:func:`~embedstream.stream.embedding.pack_batches`)
   and returns vectors with real and padded token counts;
5. **driver, calling thread**: collects results (``iter_batches``), restores
   source order by ``seq``, fills each unit's ``flat`` (its vectors in text
   order) and ``ids``, and calls ``write`` in order.

Guaranteed: every record is written exactly once, in source order, and a
checkpoint after unit *n* means every record before it is written (as with the
local engine); vectors are those of the local engine up to precision (the same
tokens go through the same :class:`LocalEncoder` forward; the backend is
chosen per actor, so actors on different machines may differ in it); everything ``source`` and
``prepare`` do runs on the driver; memory is bounded: at most two windows are
prepared and not yet written, whatever the corpus size. Ray is joined at
``address`` (or ``RAY_ADDRESS``) when given, else a small local instance is
started and :meth:`RayEngine.close` shuts it down.

Not guaranteed: fault tolerance beyond Ray's own task and actor retries (a
failed run raises in the caller, and resuming is the rebuild's checkpoint, as
with the local engine); bit-identical vectors across runs (batch composition
varies). Every node of a cluster needs embedstream and the model installed, and
the driver loads the model once on its CPU to take its tokenizer.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from embedstream.bulk._ray_stages import EmbedActor, TokenizerSpec, feed_datasource, tokenize_batch
from embedstream.bulk.engine import EmbeddedUnit, EngineStats
from embedstream.stream.config import PromptSettings
from embedstream.stream.errors import ConfigError
from embedstream.stream.local_encoder import LocalEncoder

__all__ = ["RayEngine"]

R = TypeVar("R")  # a source record
P = TypeVar("P")  # what preparing a record gives (e.g. its chunks)

_POLL_S = 0.1  # how often a blocked feeder looks at the stop flag
_WINDOWS_IN_FLIGHT = 2  # windows prepared and not yet written
_LOCAL_OBJECT_STORE = 1 << 30  # a local instance's object store: small, Ray spills past it
_TOKENIZE_MEMORY = 256 << 20  # what a tokenize task reserves: a tokenizer and a block
# Ray Data settings for the length of a run: no progress bars (the rebuild reports
# its own), and a block size target so small that every block moves on at once as a
# block of one unit (the default, 128 MiB, holds small blocks back to merge them:
# the stream would stall until the feeder is done, which it waits on the writes for).
_DATA_CONTEXT: dict[str, Any] = {"enable_progress_bars": False, "target_max_block_size": 1}


def _require_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise ConfigError("--engine ray needs Ray Data: pip install 'embedstream[ray]'") \
            from error
    return ray


# -- the driver ---------------------------------------------------------------------


class RayEngine(Generic[R, P]):
    """Runs the stages above over one source (see the module docstring).

    ``gpus_per_actor=None`` gives each actor one GPU where the cluster has GPUs
    and ``device`` is ``auto`` or ``cuda``, else none (and the actors run on CPU).
    ``actors=None`` is one actor per GPU, or on a CPU-only cluster as many as the
    CPUs allow, keeping one free for tokenizing. Each actor call gets
    ``window_units // (2 * actors)`` units (at least one), so a window keeps every
    actor busy twice over: raise ``window_units`` for larger clusters.

    The constructor connects to Ray (or starts a local instance, whose processes
    live only as long as the thread that made the engine); :meth:`close` shuts
    down an instance it started.
    """

    def __init__(self, model: str, *, device: str = "auto", backend: str = "torch",
                 precision: str = "auto", batch_tokens: int = 0,
                 guard: tuple[float, float] = (0.99, 0.98), unit_records: int = 256,
                 actors: int | None = None, gpus_per_actor: float | None = None,
                 cpus_per_actor: float = 1.0, window_units: int = 16,
                 address: str | None = None, prompts: PromptSettings | None = None) -> None:
        _require_ray()
        if actors is not None and actors < 1:
            raise ConfigError(f"ray engine: actors must be at least 1, not {actors}")
        self.model = model
        self.device = device
        self.backend = backend
        self.precision = precision
        self.batch_tokens = batch_tokens
        self.guard = guard
        self.prompts = prompts
        self.unit_records = max(1, unit_records)
        self.window_units = max(1, window_units)
        self.cpus_per_actor = cpus_per_actor
        self.address = address
        self.actors = actors  # None: resolved against the cluster when connecting
        self.gpus_per_actor = gpus_per_actor
        self.precisions: set[str] = set()  # what the actors chose, after a run
        self.stats = EngineStats()
        self._owns_ray = False
        self._tokenizer: TokenizerSpec | None = None
        self._dimension = 0
        self._connect()

    # -- Ray ---------------------------------------------------------------------

    def _connect(self) -> None:
        # Ray starts a local instance's processes with a parent-death signal, which
        # Linux sends when the *thread* that started them ends: connecting here, not
        # in run(), keeps them tied to the thread that made the engine.
        ray = _require_ray()
        if not ray.is_initialized():
            target = self.address or os.environ.get("RAY_ADDRESS")
            if target and target != "local":
                ray.init(address=target, log_to_driver=False)
            else:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                ray.init(address="local", num_cpus=max(2, os.cpu_count() or 1),
                         object_store_memory=_LOCAL_OBJECT_STORE, include_dashboard=False,
                         log_to_driver=False, ignore_reinit_error=True)
                self._owns_ray = True
        resources = ray.cluster_resources()
        if self.gpus_per_actor is None:
            wants_gpu = self.device in ("auto", "cuda") or self.device.startswith("cuda:")
            self.gpus_per_actor = 1.0 if wants_gpu and resources.get("GPU", 0) >= 1 else 0.0
        if self.actors is None:
            if self.gpus_per_actor > 0:
                self.actors = max(1, int(resources.get("GPU", 0) // self.gpus_per_actor))
            else:
                cpus = resources.get("CPU", 1) - 1
                self.actors = max(1, int(cpus // max(self.cpus_per_actor, 1e-6)))

    def close(self) -> None:
        """Shut down the local Ray instance this engine started (not a cluster it joined)."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayEngine[R, P]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tokenizer_spec(self) -> TokenizerSpec:
        if self._tokenizer is None:
            # The model's own tokenizer and max_seq_length, exactly as each actor has them.
            probe = LocalEncoder(self.model, device="cpu", prompts=self.prompts)
            self._tokenizer = TokenizerSpec(probe.tokenizer, probe.max_seq_length,
                                            probe.document_prompt)
            self._dimension = probe.dimension
            del probe
        return self._tokenizer

    # -- running -----------------------------------------------------------------

    def run(self, source: Iterable[R], prepare: Callable[[R], tuple[P, Sequence[str]]],
            write: Callable[[EmbeddedUnit[R, P]], None]) -> EngineStats:
        """Embed every record of ``source``; ``write`` gets each unit in source order.

        ``source`` and ``prepare`` run on one driver thread, ``write`` on the
        calling thread. Returns the final statistics."""
        ray = _require_ray()
        if not ray.is_initialized():
            raise RuntimeError("ray engine: run after close()")
        from ray.data import DataContext
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        tokenizer = self._tokenizer_spec()
        actors = cast(int, self.actors)
        gpus = cast(float, self.gpus_per_actor)
        call_units = max(1, self.window_units // (2 * actors))  # units per actor call
        # A window is whole actor calls: the windows in flight always fill their calls,
        # so no call waits for units from a window the feeder may not send yet.
        window = math.ceil(self.window_units / call_units) * call_units
        device = "cpu" if gpus == 0 and self.device == "auto" else self.device

        self.stats = stats = EngineStats()
        self.precisions = set()
        node = ray.get_runtime_context().get_node_id()
        queue = Queue(actor_options={
            "num_cpus": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)})
        stop = threading.Event()
        credits = threading.Semaphore(_WINDOWS_IN_FLIGHT)
        lock = threading.Lock()
        pending: dict[int, EmbeddedUnit[R, P]] = {}
        fed = {"units": -1}  # set by the feeder once the source is exhausted
        failures: list[BaseException] = []

        def feed() -> None:
            try:
                records = iter(source)
                seq = 0
                while True:
                    while not credits.acquire(timeout=_POLL_S):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    items: list[tuple[int, list[str]]] = []
                    for _ in range(window):
                        batch = list(itertools.islice(records, self.unit_records))
                        if not batch:
                            break
                        unit = EmbeddedUnit[R, P](seq, batch)
                        for record in batch:
                            prepared, texts = prepare(record)
                            unit.prepared.append(prepared)
                            unit.texts.append(texts)
                        with lock:
                            pending[seq] = unit
                        items.append((seq, [t for ts in unit.texts for t in ts]))
                        seq += 1
                    if items:
                        queue.put(items)  # unbounded: the credits bound it
                    if len(items) < window:
                        fed["units"] = seq
                        return
            except BaseException as error:  # surfaced in the caller, never lost
                failures.append(error)
            finally:
                # The end of the stream, also after a failure (unless the queue is gone:
                # the run is being torn down anyway).
                with contextlib.suppress(Exception):
                    queue.put(None)

        context = DataContext.get_current()
        saved = {name: getattr(context, name) for name in _DATA_CONTEXT}
        for name, value in _DATA_CONTEXT.items():
            setattr(context, name, value)
        feeder = threading.Thread(target=feed, name="embedstream-ray-feeder", daemon=True)
        results: Iterator[pa.Table] | None = None
        try:
            # One read task whose blocks go on as they are (no splitting into more).
            ds = ray.data.read_datasource(feed_datasource(queue),
                                          num_cpus=0, override_num_blocks=1)
            # Asking for memory also keeps Ray Data from fusing tokenizing into the
            # actors, where it would hold up the forward (fusion needs equal args).
            ds = ds.map_batches(tokenize_batch, fn_kwargs={"tokenizer": tokenizer},
                                batch_size=None, batch_format="pyarrow", num_cpus=1,
                                memory=_TOKENIZE_MEMORY)
            ds = ds.map_batches(
                EmbedActor, fn_constructor_kwargs={
                    "model": self.model, "device": device, "backend": self.backend,
                    "precision": self.precision, "batch_tokens": self.batch_tokens,
                    "guard": self.guard, "prompts": self.prompts},
                compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus or None,
                num_cpus=self.cpus_per_actor,
                batch_size=call_units, batch_format="pyarrow")
            feeder.start()
            results = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
            waiting: dict[int, EmbeddedUnit[R, P]] = {}
            expected = 0
            for table in results:
                for unit in self._units(table, pending, lock, stats):
                    waiting[unit.seq] = unit
                while expected in waiting:
                    ready = waiting.pop(expected)
                    write(ready)
                    stats.records += len(ready.records)
                    expected += 1
                    if expected % window == 0:
                        credits.release()
            feeder.join()
            if failures:
                raise failures[0]
            if expected != fed["units"] or waiting:
                raise RuntimeError(f"ray engine: {expected} units written, "
                                   f"{fed['units']} fed; results were lost")
        finally:
            stop.set()
            close = getattr(results, "close", None)
            if close is not None:
                close()  # stops the streaming executor if we left early
            if feeder.is_alive():
                feeder.join()
            for name, value in saved.items():
                setattr(context, name, value)
            ray.kill(queue.actor)
        return stats

    def _units(self, table: pa.Table, pending: dict[int, EmbeddedUnit[R, P]],
               lock: threading.Lock, stats: EngineStats) -> Iterator[EmbeddedUnit[R, P]]:
        """The units of one result block, with their vectors and ids; adds to ``stats``."""
        dimension = self._dimension
        columns = {name: table.column(name) for name in
                   ("seq", "ids", "lengths", "vectors", "tokens", "padded_tokens", "batches",
                    "forward_s", "precision")}
        for row in range(table.num_rows):
            seq = int(columns["seq"][row].as_py())
            with lock:
                unit = pending.pop(seq)
            lengths: list[int] = columns["lengths"][row].as_py()
            count = sum(len(texts) for texts in unit.texts)
            if len(lengths) != count:
                raise RuntimeError(f"ray engine: unit {seq} came back with {len(lengths)} "
                                   f"texts, not {count}")
            flat_ids: list[int] = columns["ids"][row].values.to_numpy().tolist()
            bounds = itertools.accumulate(lengths, initial=0)
            unit.ids = [flat_ids[lo:hi] for lo, hi in itertools.pairwise(bounds)]
            values = columns["vectors"][row].values.to_numpy(zero_copy_only=False)
            flat: npt.NDArray[np.float32] = np.array(values, dtype=np.float32)  # own copy
            unit.flat = flat.reshape(count, dimension)
            stats.texts += count
            stats.tokens += int(columns["tokens"][row].as_py())
            stats.padded_tokens += int(columns["padded_tokens"][row].as_py())
            stats.batches += int(columns["batches"][row].as_py())
            stats.forward_s += float(columns["forward_s"][row].as_py())
            self.precisions.add(str(columns["precision"][row].as_py()))
            yield unit
