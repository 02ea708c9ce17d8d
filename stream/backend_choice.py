"""Choosing the backend and precision by measuring them, guarded by quality.

``embed.backend: auto`` and ``embed.precision: auto`` (each, or both) leave the
choice to a measurement on this machine, on real texts (a sample of the corpus
the rebuild reads, or the first texts the stream embeds):

1. The candidates are every backend installed (torch; ONNX Runtime and OpenVINO
   when their extras are) at every precision it runs that ``embed.*`` allows: on a
   CPU torch fp32/bf16, ONNX fp32 and int8 (two recipes), OpenVINO fp32/bf16; on a
   GPU torch fp32 and bf16 (fp16 where the GPU has no bf16).
2. torch fp32 runs first: its vectors are the reference.
3. Each candidate is warmed up on one batch (kernel selection, off the clock; a
   candidate whose warm-up takes three times fp32's has lost and stops there, as
   emulated bf16 on a CPU without it does), then timed in two shapes: the sample
   packed into full batches as the rebuild packs (best of two passes), and its
   first texts in the stream's shape, batches of 1, 2 and 4 texts. Its score is
   the sum of the two costs per text, so the choice is fast for a backlog and for
   a quiet stream alike.
4. The **quality guard**: against the reference, the mean cosine must reach
   ``embed.quality_guard.mean_cosine`` (0.99) and the 1st-percentile cosine
   ``p01_cosine`` (0.98). A candidate below either is never chosen, however fast.
5. The fastest passing candidate wins (torch fp32 always passes: it is the
   reference). The figures of every candidate are logged and kept with the
   decision (:mod:`embedstream.stream._calibration`), so the next start on this
   machine, model and libraries takes it without measuring.

Guaranteed: the winner passed the guard on the calibration sample. Not
guaranteed: the guard beyond the sample (``bench/bulk.py`` measures it over a
whole corpus).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embedstream.stream._calibration import TooSlow, time_limit
from embedstream.stream.backends import (
    BACKENDS,
    PRECISIONS,
    Candidate,
    Runner,
    TorchRunner,
    available,
    require,
)
from embedstream.stream.embedding import pack_batches, pad_batch
from embedstream.stream.errors import ConfigError

__all__ = ["Measured", "QualityGuard", "candidates", "measure", "padded", "run_packed"]

log = logging.getLogger("embedstream.embed")

# A candidate whose warm-up batch takes this many times fp32's (plus half a second) has lost.
_WARM_UP_ALLOWANCE = 3.0
# The stream's shape: batch sizes cycled over the sample's first texts.
_STREAM_BATCHES = (1, 2, 4)
_STREAM_TEXTS = 28


@dataclass(frozen=True, slots=True)
class QualityGuard:
    """How close to torch fp32 a candidate's vectors must stay."""

    mean_cosine: float = 0.99
    p01_cosine: float = 0.98

    def passes(self, cosines: npt.NDArray[np.float32]) -> bool:
        return (float(cosines.mean()) >= self.mean_cosine
                and float(np.percentile(cosines, 1)) >= self.p01_cosine)

    def describe(self) -> str:
        return f"mean>={self.mean_cosine!r},p01>={self.p01_cosine!r}"


@dataclass(slots=True)
class Measured:
    """One candidate's figures on the calibration sample."""

    candidate: Candidate
    runner: Runner | None
    figures: dict[str, float] = field(default_factory=dict)
    passed: bool = False
    why: str = ""

    @property
    def score(self) -> float:
        """Seconds per text, full batches plus the stream's small ones."""
        return self.figures.get("bulk_ms", float("inf")) + self.figures.get(
            "stream_ms", float("inf"))


def candidates(*, backend: str, precision: str, on_gpu: bool,
               gpu_bf16: bool = True) -> list[Candidate]:
    """What to measure for ``embed.backend``/``embed.precision`` on this device.
    A backend asked for by name must be installed (ConfigError naming its extra);
    under ``auto`` one that is not is left out, with a log line saying how to add it."""
    if on_gpu:
        if backend not in ("auto", "torch"):
            raise ConfigError(f"embed.backend: {backend} runs on the CPU here; on a GPU "
                              "use torch (or auto)")
        reduced = "bf16" if gpu_bf16 else "fp16"
        wanted = ("fp32", reduced) if precision == "auto" else (precision,)
        if precision == "int8":
            raise ConfigError("embed.precision: int8 runs on the CPU (onnx); on a GPU use "
                              "fp32, bf16 or fp16")
        return [Candidate("torch", p) for p in wanted]
    chosen: list[Candidate] = []
    for name in (BACKENDS if backend == "auto" else (backend,)):
        if backend == "auto" and not available(name):
            log.info("backend %s not installed: not measured (pip install "
                     "'embedstream[%s]' to try it)", name, name)
            continue
        require(name)
        # fp16 on a CPU is left to those who ask: few CPUs run it natively.
        auto = tuple(p for p in PRECISIONS[name] if p != "fp16")
        for p in (auto if precision == "auto" else (precision,)):
            if p not in PRECISIONS[name]:
                continue
            if p == "int8":
                chosen += [Candidate(name, p, "all"), Candidate(name, p, "ffn-fp32")]
            else:
                chosen.append(Candidate(name, p))
    if not chosen:
        raise ConfigError(f"embed.precision: {precision} is run by none of the backends "
                          f"allowed (embed.backend: {backend})")
    return chosen


def padded(batch: Sequence[Sequence[int]], pad_id: int, left: bool,
           multiple: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """:func:`pad_batch`, the width rounded up to a multiple of ``multiple``."""
    input_ids, mask = pad_batch(batch, pad_id, left)
    extra = -input_ids.shape[1] % multiple
    if extra:
        input_ids = np.pad(input_ids, ((0, 0), (extra, 0) if left else (0, extra)),
                           constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (extra, 0) if left else (0, extra)))
    return input_ids, mask


def run_packed(runner: Runner, sample: Sequence[list[int]], budget: int, pad_id: int,
               left: bool, dimension: int) -> npt.NDArray[np.float32]:
    """Vectors of ``sample`` in its order, packed by length into ``budget`` tokens."""
    out = np.empty((len(sample), dimension), np.float32)
    for batch in pack_batches([len(ids) for ids in sample], budget):
        out[batch] = runner.run(*padded([sample[i] for i in batch], pad_id, left,
                                        runner.length_multiple))
    return out


def measure(build: Callable[[Candidate], Runner], choices: Sequence[Candidate],
            sample: Sequence[list[int]], *, budget: int, pad_id: int, left: bool,
            dimension: int, guard: QualityGuard, reference: TorchRunner,
            progress: Callable[[], None] | None = None) -> list[Measured]:
    """Every candidate measured (see the module docstring); the reference first.
    ``progress`` is called after each candidate (a stream's liveness heartbeat: the
    measurement runs inside its loop and may take a minute on a loaded machine)."""
    def pack(runner: Runner) -> npt.NDArray[np.float32]:
        return run_packed(runner, sample, budget, pad_id, left, dimension)

    # The longest texts, one full batch of them: what selects (and compiles) kernels.
    warm_batch = [sample[i] for i in pack_batches([len(ids) for ids in sample], budget)[0]]
    results: list[Measured] = []
    ref = Measured(Candidate("torch", "fp32"), reference)
    started = time.perf_counter()
    reference.run(*padded(warm_batch, pad_id, left, 1))
    fp32_warm = time.perf_counter() - started
    ref.figures, expected = _timed(reference, pack, sample, pad_id, left)
    ref.figures.update(mean_cos=1.0, p01_cos=1.0, min_cos=1.0)
    ref.passed = True
    results.append(ref)
    log.info("calibration: %s %.2f ms/text in full batches, %.2f in the stream's",
             ref.candidate.label, ref.figures["bulk_ms"], ref.figures["stream_ms"])
    for candidate in choices:
        if candidate == ref.candidate:
            continue
        result = Measured(candidate, None)
        results.append(result)
        try:
            started = time.perf_counter()
            runner = build(candidate)
            result.figures["prepare_s"] = time.perf_counter() - started
            cap = _WARM_UP_ALLOWANCE * fp32_warm + 0.5
            # torch is stopped from inside once over the cap; other backends are
            # judged when their warm-up returns.
            limit = (time_limit(runner.transformer, cap) if isinstance(runner, TorchRunner)
                     else contextlib.nullcontext())
            started = time.perf_counter()
            with limit:
                runner.run(*padded(warm_batch, pad_id, left, runner.length_multiple))
            if time.perf_counter() - started > cap:
                raise TooSlow
            timed, vectors = _timed(runner, pack, sample, pad_id, left)
        except TooSlow:
            result.why = f"warm-up over {cap:.1f} s: slower than fp32"
        except Exception as error:
            # Any failure leaves this candidate out, not the choice: ONNX Runtime raises
            # its own types (InvalidProtobuf, Fail, ...), which are not RuntimeErrors.
            result.why = f"cannot run here: {type(error).__name__}: {error}"
        else:
            result.runner = runner
            result.figures.update(timed)
            cosines = (vectors * expected).sum(axis=1)
            result.figures.update(mean_cos=float(cosines.mean()),
                                  p01_cos=float(np.percentile(cosines, 1)),
                                  min_cos=float(cosines.min()))
            result.passed = guard.passes(cosines)
            if not result.passed:
                result.why = "below the quality guard"
        _log(result)
        if progress is not None:
            progress()
    return results


def _timed(runner: Runner, pack: Callable[[Runner], npt.NDArray[np.float32]],
           sample: Sequence[list[int]], pad_id: int, left: bool
           ) -> tuple[dict[str, float], npt.NDArray[np.float32]]:
    """ms per text in full batches (best of two passes) and in the stream's shape, and
    the vectors of the full-batch pass (what the guard compares)."""
    bulk_s = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        vectors = pack(runner)
        bulk_s = min(bulk_s, time.perf_counter() - started)
    texts = list(sample[:_STREAM_TEXTS])
    started, done, turn = time.perf_counter(), 0, 0
    while done < len(texts):
        size = _STREAM_BATCHES[turn % len(_STREAM_BATCHES)]
        batch = sorted(texts[done:done + size], key=len, reverse=True)
        runner.run(*padded(batch, pad_id, left, runner.length_multiple))
        done, turn = done + len(batch), turn + 1
    stream_s = time.perf_counter() - started
    return ({"bulk_ms": 1000 * bulk_s / len(sample), "stream_ms": 1000 * stream_s / len(texts)},
            vectors)


def _log(result: Measured) -> None:
    f = result.figures
    if result.runner is None:
        log.info("calibration: %s not kept: %s", result.candidate.label, result.why)
        return
    log.info("calibration: %s %.2f ms/text in full batches, %.2f in the stream's; cosine "
             "mean %.5f, p01 %.5f, min %.5f%s", result.candidate.label, f["bulk_ms"],
             f["stream_ms"], f["mean_cos"], f["p01_cos"], f["min_cos"],
             "" if result.passed else f": {result.why}")


def model_dir_for(cache: Path, digest: str) -> Path:
    """Where ``digest``'s exported graphs live: torch's exporter made them, ONNX Runtime's
    quantizer their int8 copies, so both versions name the directory."""
    from importlib import metadata

    try:
        quantizer = f"-ort-{metadata.version('onnxruntime')}"
    except metadata.PackageNotFoundError:
        quantizer = ""
    return cache / "models" / digest[:24] / f"torch-{metadata.version('torch')}{quantizer}"
