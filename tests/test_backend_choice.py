"""``embed.backend``/``embed.precision: auto``: the choice is measured once per
machine and model and kept (a second start does not measure; another model or
another quality guard measures again; a damaged, unwritable or disabled cache
never stops a start), a candidate below the quality guard is never chosen however
fast it is (a deliberately damaged quantization stands in for one), a candidate
that has lost is stopped within seconds, and the stream measures on its first
texts, once.

The tiny random model (tests/conftest.py) on the CPU: the choice's plumbing, not
its figures (``bench/bulk.py`` measures the real model); the commands through
``cli.main``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import embedstream.stream.local_encoder as local_encoder
from embedstream.stream._calibration import (
    CACHE_DIR_ENV,
    CACHE_ENV,
    TooSlow,
    cache_dir,
    cache_path,
    time_limit,
)
from embedstream.stream._onnx_export import int8 as quantized
from embedstream.stream.app.cli import main
from embedstream.stream.backend_choice import QualityGuard, run_packed
from embedstream.stream.backends import Candidate, OnnxRunner, OpenVinoRunner, TorchRunner
from embedstream.stream.config import EmbedSettings, QualityGuardSettings
from embedstream.stream.errors import ConfigError
from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.metrics import Metrics

from .conftest import build_tiny_model

TEXTS = [f"calibration text number {i}: " + "words of a passage " * (i % 7 + 1)
         for i in range(32)]
MEASURED = "calibrating the embed backend"
CACHED = "decided on this machine for this model"
BELOW = "below the quality guard"


@pytest.fixture
def cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A decisions file of this test's own (the session's may hold earlier decisions)."""
    path = tmp_path / "cache" / "backend.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


@pytest.fixture
def decide(caplog: pytest.LogCaptureFixture) -> Callable[..., tuple[LocalEncoder, str]]:
    """A fresh encoder on ``model`` (auto/auto unless told), calibrated on TEXTS:
    (encoder, its log from construction on)."""

    def run(model: Path, **options: Any) -> tuple[LocalEncoder, str]:
        caplog.clear()
        options = {"backend": "auto", "precision": "auto", **options}
        with caplog.at_level(logging.INFO, logger="embedstream.embed"):
            encoder = LocalEncoder(str(model), device="cpu", **options)
            encoder.calibrate(encoder.tokenize(TEXTS))
        return encoder, caplog.text

    return run


def entries(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(path.read_text())["entries"]
    return found


def chosen(encoder: LocalEncoder) -> tuple[str, str, str]:
    return encoder.backend, encoder.precision, encoder.variant


# -- the cache -----------------------------------------------------------------------


def test_a_second_start_takes_the_decision_and_another_model_or_guard_measures(
        tmp_path: Path, tiny_model_dir: Path, minilm_path: str, cache_file: Path,
        decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    first, log = decide(tiny_model_dir)
    assert MEASURED in log and CACHED not in log
    assert first.calibration["calibration_s"] < 30 and "cached" not in first.calibration
    [entry] = entries(cache_file).values()
    assert (entry["backend"], entry["precision"], entry["variant"]) == chosen(first)
    key = entry["key"]
    assert key["device"] == "cpu" and key["model"] == first.revision and key["cpu"]
    assert key["asked"] == "auto/auto" and key["torch"] and key["onnxruntime"]

    second, log = decide(tiny_model_dir)
    assert CACHED in log and MEASURED not in log
    assert second.decided and second.calibration["cached"] == 1.0
    assert chosen(second) == chosen(first)
    assert second.calibration["speedup"] == pytest.approx(first.calibration["speedup"])
    ids = first.tokenize(TEXTS[:8])
    assert np.allclose(second.encode(ids), first.encode(ids), atol=1e-5)
    assert len(entries(cache_file)) == 1

    # The rest asks for onnx (fewer candidates, quicker): kept, then changed one at a time.
    decide(tiny_model_dir, backend="onnx")
    _, log = decide(tiny_model_dir, backend="onnx")
    assert CACHED in log and len(entries(cache_file)) == 2
    other = build_tiny_model(tmp_path / "other-model", minilm_path, seed=1)
    _, log = decide(other, backend="onnx")
    assert MEASURED in log, "another model's weights: measured again"
    assert len(entries(cache_file)) == 3
    # The guard comes from embed.quality_guard, as the service builds its encoder.
    settings = EmbedSettings(model=str(tiny_model_dir), device="cpu", backend="onnx",
                             quality_guard=QualityGuardSettings(mean_cosine=0.995, p01_cosine=0.97))
    with_guard = LocalEncoder.from_settings(settings)
    assert not with_guard.decided, "another embed.quality_guard: measured again"
    with_guard.calibrate(with_guard.tokenize(TEXTS))
    guards = {e["key"]["guard"] for e in entries(cache_file).values()}
    assert "mean>=0.995,p01>=0.97" in guards and len(entries(cache_file)) == 4


@pytest.mark.parametrize("damage", ["{not json", '{"version": 2, "entries": []}', "\xff\xfe",
                                    '{"version": 1, "entries": {}}',
                                    '{"version": 2, "entries": {"x": 3}}'])
def test_a_damaged_cache_is_ignored_with_a_warning_and_rewritten(
        tiny_model_dir: Path, cache_file: Path, damage: str,
        decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(damage.encode("latin-1"))
    _, log = decide(tiny_model_dir, backend="onnx")
    assert MEASURED in log
    if "entries\": {\"x" not in damage:  # an entry of the wrong shape is merely passed over
        assert "WARNING" in log and str(cache_file) in log
    assert entries(cache_file)  # a valid file again, with this decision in it
    _, log = decide(tiny_model_dir, backend="onnx")
    assert CACHED in log and MEASURED not in log


def test_an_unwritable_cache_is_a_warning_and_off_keeps_nothing(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "backend.json"))
    encoder, log = decide(tiny_model_dir, backend="onnx")
    assert encoder.decided and encoder.embed(TEXTS[:3]).shape == (3, encoder.dimension)
    assert "cannot keep the precision decision" in log
    _, log = decide(tiny_model_dir, backend="onnx")
    assert MEASURED in log, "nothing was kept: the next start measures again"

    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_path() is None
    _, log = decide(tiny_model_dir, backend="onnx")
    assert MEASURED in log and "the cache is off" in log
    _, log = decide(tiny_model_dir, backend="onnx")
    assert MEASURED in log and CACHED not in log


def test_the_cache_lives_in_the_cache_directory(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "embedstream" / "backend.json"
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_path() == tmp_path / "env" / "backend.json"
    assert cache_path(tmp_path / "configured") == tmp_path / "configured" / "backend.json"

    # embed.cache_dir holds the decision and the exported graphs.
    encoder, _ = decide(tiny_model_dir, backend="onnx", cache=tmp_path / "configured")
    assert entries(tmp_path / "configured" / "backend.json")
    assert list((tmp_path / "configured" / "models").glob(f"{encoder.revision[:24]}/*/model.onnx"))
    assert not (tmp_path / "env").exists() and not (tmp_path / "xdg").exists()


def test_plan_and_rebuild_calibrate_once_per_machine_and_model(
        tmp_path: Path, tiny_model_dir: Path, cache_file: Path,
        capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": text}) + "\n"
                              for i, text in enumerate(TEXTS * 3)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "embed": {"model": str(tiny_model_dir), "backend": "onnx"},
        "source": {"text_fields": ["text"]},
        "sink": {"path": str(tmp_path / "store"), "collection": "docs"},
        "metrics": {"enabled": False}}))

    def logged(*args: str) -> list[str]:
        assert main([*args, "--config", str(config)]) == 0
        return [json.loads(line)["msg"] for line in capsys.readouterr().err.splitlines()
                if line.startswith("{")]

    plan = ["plan", "--docs", "1000", "--sample", str(corpus), "--json"]
    assert any(MEASURED in line for line in logged(*plan))
    for again in (plan, ["rebuild", "--source", str(corpus), "--no-handover"]):
        lines = logged(*again)
        assert any(CACHED in line for line in lines), again
        assert not any(MEASURED in line for line in lines), again


# -- a candidate that has lost is stopped early ---------------------------------------


class CrawlingInBf16(TorchRunner):
    """Emulated bf16 (a CPU without it) stands in as a transformer copy that crawls in
    bf16: 200 ms before each of its ~45 modules, about 9 s a forward pass."""

    def __init__(self, model: Any, precision: str = "fp32", with_types: bool = False) -> None:
        super().__init__(model, precision, with_types)
        if precision == "bf16":
            for module in self.transformer.modules():
                module.register_forward_pre_hook(lambda *_: time.sleep(0.2))


def test_a_candidate_that_has_lost_is_stopped_early_and_fp32_stays_intact(
        tiny_model_dir: Path, cache_file: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
        decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    import torch

    monkeypatch.setattr(local_encoder, "TorchRunner", CrawlingInBf16)
    encoder, log = decide(tiny_model_dir, backend="torch")
    assert chosen(encoder) == ("torch", "fp32", "")
    assert "torch/bf16 not kept: warm-up over" in log
    # Stopped within its allowance (three times fp32's warm-up and half a second),
    # within a module's time of it, not after a whole pass (nor ~15 passes at ~9 s each).
    [reference] = [r for r in caplog.records
                   if r.getMessage().startswith("calibration: torch/fp32")]
    [stopped] = [r for r in caplog.records if "torch/bf16 not kept" in r.getMessage()]
    allowance = float(stopped.getMessage().split("warm-up over ")[1].split(" s")[0])
    assert stopped.created - reference.created < allowance + 1.5
    # The cache is standard JSON (no Infinity for the candidate that has no cost).
    [entry] = json.loads(cache_file.read_text(), parse_constant=pytest.fail)["entries"].values()
    assert "torch_bf16_ms" not in entry["figures"] and entry["figures"]["torch_fp32_ms"] > 0
    # The fp32 weights are untouched: the same vectors as an encoder that never tried bf16.
    plain = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    ids = plain.tokenize(TEXTS[:8])
    assert np.allclose(encoder.encode(ids), plain.encode(ids), atol=1e-6)
    assert isinstance(encoder.runner, TorchRunner)
    assert {p.dtype for p in encoder.runner.transformer.parameters()} == {torch.float32}


def test_time_limit_stops_a_forward_from_inside(tiny_model_dir: Path) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    assert isinstance(encoder.runner, TorchRunner)
    ids = encoder.tokenize(TEXTS[:4])
    with pytest.raises(TooSlow), time_limit(encoder.runner.transformer, 0.0):
        encoder.encode(ids)
    assert encoder.encode(ids).shape == (4, encoder.dimension)  # the hooks are gone


# -- the quality guard ----------------------------------------------------------------


def binarized(source: Path, target: Path) -> Path:
    """``source`` with every matrix product's weights quantized to one bit, the sign
    times the tensor's largest magnitude: a deliberately damaged quantization (mean
    cosine 0.947 to fp32; the tiny random model shrugs off milder damage: 2-bit
    weights, or one bit scaled by the mean magnitude, keep 0.9995)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    weights = {i for node in model.graph.node if node.op_type == "MatMul" for i in node.input}
    for tensor in model.graph.initializer:
        w = numpy_helper.to_array(tensor)
        if tensor.name in weights and w.ndim == 2:
            damaged = np.where(w >= 0, 1.0, -1.0) * np.abs(w).max()
            tensor.CopyFrom(numpy_helper.from_array(damaged.astype(np.float32), tensor.name))
    onnx.save(model, str(target))
    return target


def dawdling(runner: type[Any]) -> type[Any]:
    """``runner`` 30 ms slower a call, except the damaged int8 graph's."""

    class Dawdling(runner):  # type: ignore[misc]
        def run(self, input_ids: npt.NDArray[np.int64],
                attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            if self.candidate.variant != "all":
                time.sleep(0.03)
            result: npt.NDArray[np.float32] = super().run(input_ids, attention_mask)
            return result

    return Dawdling


@pytest.fixture
def damaged_int8_fastest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """onnx/int8/all is a binarized graph (written apart from the real int8 graphs, which
    other tests share), and every other candidate, the reference included, dawdles."""
    target = tmp_path / "model.int8-damaged.onnx"

    def int8(source: Path, variant: str) -> Path:
        if variant != "all":
            return quantized(source, variant)
        return target if target.is_file() else binarized(source, target)

    monkeypatch.setattr(local_encoder, "int8", int8)
    for runner in (TorchRunner, OnnxRunner, OpenVinoRunner):
        monkeypatch.setattr(local_encoder, runner.__name__, dawdling(runner))
    return target


@pytest.mark.parametrize("asked", [("auto", "auto"), ("onnx", "int8")])
def test_a_damaged_quantization_is_never_chosen_however_fast(
        tiny_model_dir: Path, cache_file: Path, damaged_int8_fastest: Path,
        asked: tuple[str, str], decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    backend, precision = asked
    encoder, log = decide(tiny_model_dir, backend=backend, precision=precision)
    figures = encoder.calibration
    costs = {k.removesuffix("_ms"): v for k, v in figures.items()
             if k.endswith("_ms") and k not in ("bulk_ms", "stream_ms")}
    assert min(costs, key=costs.__getitem__) == "onnx_int8_all", costs  # the fastest...
    assert figures["onnx_int8_all_mean_cos"] < 0.99  # ...below the guard...
    [line] = [s for s in log.splitlines() if "calibration: onnx/int8/all" in s]
    assert BELOW in line
    assert chosen(encoder) != ("onnx", "int8", "all")  # ...and not chosen
    assert figures["mean_cos"] >= 0.99 and figures["p01_cos"] >= 0.98
    if asked == ("onnx", "int8"):
        assert chosen(encoder) == ("onnx", "int8", "ffn-fp32")
    [entry] = entries(cache_file).values()
    assert (entry["backend"], entry["precision"], entry["variant"]) == chosen(encoder)
    # The damage is real, not an artefact of the measuring: the graph's own vectors.
    damaged = OnnxRunner(damaged_int8_fastest, Candidate("onnx", "int8", "all"))
    vectors = run_packed(damaged, encoder.tokenize(TEXTS), 4096, encoder.tokenizer.pad_token_id,
                         False, encoder.dimension)
    reference = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch",
                             precision="fp32").embed(TEXTS)
    assert (vectors * reference).sum(axis=1).mean() < 0.99


def test_the_guard_holds_the_mean_and_the_first_percentile_both() -> None:
    guard = QualityGuard()  # mean >= 0.99, p01 >= 0.98
    assert guard.passes(np.full(200, 0.995, np.float32))
    assert not guard.passes(np.full(200, 0.985, np.float32)), "the mean"
    tail = np.concatenate([np.full(197, 0.999), np.full(3, 0.9)]).astype(np.float32)
    assert tail.mean() >= 0.99 and not guard.passes(tail), "a few texts far off: the p01"
    assert QualityGuard(0.5, 0.5).passes(tail)


def test_a_guard_only_the_reference_passes_keeps_torch_fp32(
        tiny_model_dir: Path, cache_file: Path,
        decide: Callable[..., tuple[LocalEncoder, str]]) -> None:
    encoder, log = decide(tiny_model_dir, guard=QualityGuard(mean_cosine=1.01, p01_cosine=1.01))
    assert chosen(encoder) == ("torch", "fp32", "")
    assert encoder.calibration["speedup"] == 1.0
    measured = [s for s in log.splitlines() if "calibration: " in s and "ms/text" in s
                and "torch/fp32" not in s]
    assert measured and all(BELOW in s for s in measured)


def test_int8_only_and_a_guard_nothing_passes_is_a_config_error(
        tiny_model_dir: Path, cache_file: Path) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="onnx", precision="int8",
                           guard=QualityGuard(mean_cosine=1.01, p01_cosine=1.01))
    with pytest.raises(ConfigError, match="no candidate of onnx/int8/all, onnx/int8/ffn-fp32 "
                                          "passed the quality guard"):
        encoder.calibrate(encoder.tokenize(TEXTS))
    assert not cache_file.exists(), "nothing was decided: nothing kept"


# -- the stream: torch fp32 until calibration_texts texts came, then measured once ----


def test_the_stream_measures_once_on_its_first_texts(
        tiny_model_dir: Path, cache_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    told: list[LocalEncoder] = []

    def on_choice(encoder: LocalEncoder) -> None:
        told.append(encoder)
        metrics.embed_backend_chosen(encoder)

    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="auto", precision="auto",
                           calibration_texts=16, on_choice=on_choice)
    other_thread = encoder.twin()
    reference = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch",
                             precision="fp32").embed(TEXTS)
    vectors: list[npt.NDArray[np.float32]] = []
    with caplog.at_level(logging.INFO, logger="embedstream.embed"):
        for start in range(0, 15, 3):  # 15 texts: not enough yet
            vectors.append(encoder.embed(TEXTS[start:start + 3]))
            assert chosen(encoder) == ("torch", "fp32", "") and not encoder.decided
        assert not told and MEASURED not in caplog.text
        for start in range(15, len(TEXTS), 3):
            vectors.append(encoder.embed(TEXTS[start:start + 3]))
    assert told == [encoder] and encoder.decided
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith(MEASURED)]
    assert "on 18 texts" in line
    labels = {"backend": encoder.backend, "device": "cpu",
              "precision": "-".join(p for p in (encoder.precision, encoder.variant) if p)}
    assert metrics.registry.get_sample_value("embedstream_embed_backend_info", labels) == 1.0
    speedup = metrics.registry.get_sample_value("embedstream_embed_backend_speedup_ratio")
    assert speedup == pytest.approx(encoder.calibration["speedup"])
    cosines = (np.concatenate(vectors) * reference).sum(axis=1)
    assert cosines.min() > 0.999  # in input order, before and after the choice
    # A twin made before the choice follows it.
    assert other_thread.embed(TEXTS[:2]).shape == (2, encoder.dimension)
    assert chosen(other_thread) == chosen(encoder)

    # The next start takes the decision at once, and says so before any text comes.
    again: list[LocalEncoder] = []
    second = LocalEncoder(str(tiny_model_dir), device="cpu", backend="auto", precision="auto",
                          calibration_texts=16, on_choice=again.append)
    assert again == [second] and chosen(second) == chosen(encoder)
