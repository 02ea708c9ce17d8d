"""Review of issue 21 (one encoder, backends chosen per machine) and the Kafka
snapshot's on-disk fold: what goes wrong when a part fails.

- a candidate backend that fails in its own library's way (ONNX Runtime's errors
  are not RuntimeErrors), or only once timed, is left out, not fatal to the choice;
- a decision kept from before that cannot be built here now measures again;
- a calibration that runs out of memory in the stream fails no text;
- the decisions file stays JSON (no NaN) when a candidate's vectors are NaN;
- a snapshot closed while its fold still runs (Ctrl-C during a long fold) leaves
  no scratch file behind;
- the rebuild counts padded tokens as the backend pads them (OpenVINO: to 16), as
  the stream does.

The tiny random model (tests/conftest.py) on the CPU: plumbing, not figures.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import embedstream.stream.local_encoder as local_encoder
from embedstream.bulk import kafka_source
from embedstream.bulk.kafka_source import KafkaSnapshot
from embedstream.stream._calibration import CACHE_ENV, Decision, PrecisionCache, now_utc
from embedstream.stream.backend_choice import QualityGuard, measure
from embedstream.stream.backends import Candidate, OnnxRunner, TorchRunner
from embedstream.stream.chunking import Chunk
from embedstream.stream.config import Settings
from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.metrics import Metrics
from embedstream.stream.vectors import ChunkVectors

TEXTS = [f"review text number {i}: " + "words of a passage " * (i % 5 + 1) for i in range(24)]


@pytest.fixture
def cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A decisions file of this test's own."""
    path = tmp_path / "cache" / "backend.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


def reference_of(encoder: LocalEncoder) -> TorchRunner:
    runner = encoder.runner
    assert isinstance(runner, TorchRunner) and runner.candidate == Candidate("torch", "fp32")
    return runner


# -- a candidate that fails is left out ------------------------------------------------


def test_a_candidate_failing_with_its_librarys_own_error_is_left_out(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """ONNX Runtime raises its own exception types (InvalidProtobuf, Fail, ...: not
    RuntimeError): a graph it cannot load is one candidate less, not a failed choice."""
    pytest.importorskip("onnxruntime")
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx graph")
    sample = encoder.tokenize(TEXTS)
    results = measure(lambda c: OnnxRunner(broken, c),
                      [Candidate("torch", "fp32"), Candidate("onnx", "fp32")], sample,
                      budget=4096, pad_id=encoder._pad_id, left=False,
                      dimension=encoder.dimension, guard=QualityGuard(),
                      reference=reference_of(encoder))
    reference, onnx = results
    assert reference.passed
    assert not onnx.passed and onnx.runner is None
    assert "cannot run here" in onnx.why and "INVALID_PROTOBUF" in onnx.why


class _FailsOnceTimed:
    """A runner whose warm-up works and whose next call fails (a shape it cannot run)."""

    length_multiple = 1

    def __init__(self, inner: TorchRunner) -> None:
        self.candidate = Candidate("onnx", "fp32")
        self._inner = inner
        self._calls = 0

    def run(self, input_ids: npt.NDArray[np.int64],
            attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        self._calls += 1
        if self._calls > 1:
            raise RuntimeError("unsupported shape")
        return self._inner.run(input_ids, attention_mask)

    def twin(self) -> _FailsOnceTimed:
        return self


def test_a_candidate_failing_while_timed_is_left_out(tiny_model_dir: Path) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    reference = reference_of(encoder)
    results = measure(lambda c: _FailsOnceTimed(reference),
                      [Candidate("torch", "fp32"), Candidate("onnx", "fp32")],
                      encoder.tokenize(TEXTS), budget=4096, pad_id=encoder._pad_id, left=False,
                      dimension=encoder.dimension, guard=QualityGuard(), reference=reference)
    reference_result, failing = results
    assert reference_result.passed
    assert not failing.passed and "unsupported shape" in failing.why


# -- a decision kept from before ---------------------------------------------------------


def test_a_kept_decision_that_cannot_be_built_here_now_measures_again(
        tiny_model_dir: Path, cache_file: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """onnx/int8 was decided; then the onnx package (not in the key: onnxruntime is)
    went away, so the int8 graph cannot be made: the start measures again instead of
    failing every time until someone deletes the file."""
    pytest.importorskip("onnxruntime")
    first = LocalEncoder(str(tiny_model_dir), device="cpu", backend="onnx", precision="auto")
    assert not first.decided
    PrecisionCache(cache_file).put(first._key(), Decision(
        "int8", {"speedup": 2.0}, now_utc(), "onnx", "all"))

    def no_onnx(source: Path, variant: str) -> Path:
        raise ImportError("No module named 'onnx'")

    monkeypatch.setattr(local_encoder, "int8", no_onnx)
    with caplog.at_level(logging.WARNING, logger="embedstream.embed"):
        second = LocalEncoder(str(tiny_model_dir), device="cpu", backend="onnx",
                              precision="auto")
    assert not second.decided and "onnx/int8/all" in caplog.text
    second.calibrate(second.tokenize(TEXTS))
    assert (second.backend, second.precision) == ("onnx", "fp32")


# -- the stream's calibration ------------------------------------------------------------


def test_a_calibration_out_of_memory_in_the_stream_fails_no_text(
        tiny_model_dir: Path, cache_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream measures inside an embed call; when measuring runs out of memory,
    the call is halved and retried (as for any out-of-memory): the halves must not
    measure again on texts kept from the failed attempt, else every text fails."""
    measured: list[int] = []

    def out_of_memory(*_: Any, **__: Any) -> Any:
        measured.append(1)
        raise MemoryError

    monkeypatch.setattr(local_encoder, "measure", out_of_memory)
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="auto", precision="auto",
                           calibration_texts=16)
    chunks = [Chunk(0, 0, len(t), t, 8, f"hash-{i}") for i, t in enumerate(TEXTS)]
    vectors, failed = ChunkVectors(encoder, Metrics()).for_chunks(chunks, [], lambda _: {})
    assert not failed
    assert len(vectors) == len(TEXTS)
    assert len(measured) <= 2, f"measured {len(measured)} times for one call"


# -- the decisions file -------------------------------------------------------------------


def test_the_decisions_file_stays_json_when_a_candidate_gives_nan(
        tiny_model_dir: Path, cache_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    class NanInBf16(TorchRunner):
        def run(self, input_ids: npt.NDArray[np.int64],
                attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            out = super().run(input_ids, attention_mask)
            return np.full_like(out, np.nan) if self.candidate.precision == "bf16" else out

    monkeypatch.setattr(local_encoder, "TorchRunner", NanInBf16)
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="auto")
    encoder.calibrate(encoder.tokenize(TEXTS))
    assert encoder.precision == "fp32"

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    json.loads(cache_file.read_text(), parse_constant=refuse)


# -- the Kafka snapshot's scratch file ----------------------------------------------------


def test_a_snapshot_closed_during_its_fold_leaves_no_scratch_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuild's reader thread runs the fold; on Ctrl-C the engine waits 10 s for
    it and the rebuild closes the snapshot; a reader that does not stop (here: a fold
    that never polls) may die with the process, so its generator's own finally never
    runs: close() must remove the file."""
    monkeypatch.setattr(kafka_source, "_CLOSE_WAIT_S", 0.5)
    scratch = tmp_path / "state"
    snapshot = KafkaSnapshot(Settings(), covered={("t", 0): 5}, scratch=scratch)
    snapshot._topic_ids = object()  # type: ignore[assignment]  # open() without a broker
    folding, release = threading.Event(), threading.Event()

    def slow_fold(starts: Mapping[tuple[str, int], int], winners: Any) -> int:
        folding.set()
        release.wait(10)
        return 0

    def nothing(starts: Mapping[tuple[str, int], int]) -> Iterator[Any]:
        yield from ()

    snapshot._fold = slow_fold  # type: ignore[method-assign]
    snapshot._read = nothing  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            list(snapshot.items())
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert folding.wait(10)
        assert list(scratch.glob("snapshot-fold-*")), "the fold has its scratch file"
        snapshot.close()
        assert not list(scratch.glob("snapshot-fold-*")), "closed: no scratch file left"
    finally:
        release.set()
        thread.join(10)
    assert not errors


# -- the rebuild's padding count ----------------------------------------------------------


def test_the_rebuild_counts_padding_as_the_backend_pads(tiny_model_dir: Path) -> None:
    """OpenVINO pads lengths up to a multiple of 16: the rebuild's padded-token count
    (its padding_fraction) must be the same as the stream's for the same texts."""
    pytest.importorskip("openvino")
    from embedstream.bulk.engine import BulkEngine, EmbeddedUnit

    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="openvino",
                           precision="fp32", batch_tokens=512)
    assert encoder.runner.length_multiple == 16
    texts = [f"record {i} " + "word " * (i % 11) for i in range(40)]
    engine: BulkEngine[int, int] = BulkEngine([encoder], unit_records=64, bucket_texts=64)

    def write(unit: EmbeddedUnit[int, int]) -> None:
        pass

    stats = engine.run(range(len(texts)), lambda i: (i, [texts[i]]), write)
    encoder.embed(texts)
    assert stats.tokens == encoder.last_tokens
    assert stats.padded_tokens == encoder.last_padded_tokens
