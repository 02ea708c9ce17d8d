"""``bulk.precision: auto`` decides once per machine and model: the decision is
kept in a cache file, the next encoder (rebuild, ``plan``) takes it from there,
another model measures again, a damaged or unwritable cache never stops a run,
and a reduced precision that has lost is stopped within seconds.

The tiny random model (tests/conftest.py) on the CPU; the commands through ``cli.main``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstream.bulk.encoder import BulkEncoder
from embedstream.bulk.precision import CACHE_ENV, TooSlow, cache_path, time_limit
from embedstream.stream.app.cli import main

from .conftest import build_tiny_model

TEXTS = [f"calibration text number {i}: " + "words of a passage " * (i % 7 + 1)
         for i in range(96)]
MEASURED = "calibrating bulk precision"
CACHED = "decided on this machine for this model"


@pytest.fixture
def cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache" / "precision.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    return path


@pytest.fixture
def decide(caplog: pytest.LogCaptureFixture) -> Callable[..., tuple[BulkEncoder, str]]:
    """A fresh auto encoder on ``model`` calibrated on TEXTS: (encoder, its log)."""

    def run(model: Path, **options: Any) -> tuple[BulkEncoder, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="embedstream.bulk"):
            encoder = BulkEncoder(str(model), device="cpu", precision="auto", **options)
            encoder.calibrate(encoder.tokenize(TEXTS))
        return encoder, caplog.text

    return run


def entries(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(path.read_text())["entries"]
    return found


def test_the_next_encoder_takes_the_decision_and_another_model_measures(
        tmp_path: Path, tiny_model_dir: Path, minilm_path: str, cache_file: Path,
        decide: Callable[..., tuple[BulkEncoder, str]]) -> None:
    first, log = decide(tiny_model_dir)
    assert MEASURED in log and CACHED not in log
    assert first.calibration["calibration_s"] < 15
    [entry] = entries(cache_file).values()
    assert entry["precision"] == first.precision
    assert entry["key"]["device"] == "cpu" and entry["key"]["model"] == first.revision
    assert entry["key"]["cpu"] and "torch" in entry["key"]

    second, log = decide(tiny_model_dir)
    assert CACHED in log and MEASURED not in log
    assert second.precision == first.precision and second.calibration["cached"] == 1.0
    assert len(entries(cache_file)) == 1

    other = build_tiny_model(tmp_path / "other-model", minilm_path, seed=1)
    _, log = decide(other)
    assert MEASURED in log, "another model's weights: measured again"
    assert len(entries(cache_file)) == 2
    _, log = decide(tiny_model_dir, min_cosine=0.999)
    assert MEASURED in log, "another bulk.min_cosine: measured again"


@pytest.mark.parametrize("damage", ["{not json", '{"version": 1, "entries": []}', "\xff\xfe",
                                    '{"version": 1, "entries": {"x": 3}}'])
def test_a_damaged_cache_is_ignored_with_a_warning_and_rewritten(
        tiny_model_dir: Path, cache_file: Path, damage: str,
        decide: Callable[..., tuple[BulkEncoder, str]]) -> None:
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(damage.encode("latin-1"))
    _, log = decide(tiny_model_dir)
    assert MEASURED in log
    if "entries\": {" not in damage:  # an entry of the wrong shape is merely passed over
        assert "WARNING" in log and str(cache_file) in log
    assert entries(cache_file)  # a valid file again, with this decision in it
    _, log = decide(tiny_model_dir)
    assert CACHED in log


def test_an_unwritable_cache_is_a_warning_not_a_failed_run(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        decide: Callable[..., tuple[BulkEncoder, str]]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "precision.json"))
    encoder, log = decide(tiny_model_dir)
    assert encoder.precision in ("fp32", "bf16")
    assert "cannot keep the precision decision" in log
    monkeypatch.setenv(CACHE_ENV, "off")
    assert cache_path() is None
    _, log = decide(tiny_model_dir)
    assert MEASURED in log and "the cache is off" in log


def test_the_cache_lives_in_the_user_cache_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_path() == tmp_path / "embedstream" / "precision.json"


def test_a_reduced_precision_that_has_lost_is_stopped_early(
        tiny_model_dir: Path, cache_file: Path,
        decide: Callable[..., tuple[BulkEncoder, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 (a CPU without it) stands in as a transformer that crawls in bf16."""
    import torch

    original = BulkEncoder._set_precision

    def crawling_in_bf16(self: BulkEncoder, precision: str) -> None:
        original(self, precision)
        transformer = self._model[0].auto_model
        for handle in getattr(self, "_crawl", []):
            handle.remove()
        if precision == "bf16":
            self._crawl = [module.register_forward_pre_hook(lambda *_: time.sleep(0.02))
                           for module in transformer.modules()]

    monkeypatch.setattr(BulkEncoder, "_set_precision", crawling_in_bf16)
    encoder, log = decide(tiny_model_dir)
    assert encoder.precision == "fp32" and "bf16 stopped after" in log
    figures = encoder.calibration
    # Stopped within its allowance (twice fp32's pass and half a second), not after a
    # whole pass at 20 ms per module.
    assert figures["bf16_stopped_s"] < 2 * figures["fp32_s"] + 0.5 + 0.5
    # The fp32 weights are back: the same vectors as an encoder that never tried bf16.
    plain = BulkEncoder(str(tiny_model_dir), device="cpu", precision="fp32")
    ids = plain.tokenize(TEXTS[:8])
    assert np.allclose(encoder.encode(ids), plain.encode(ids), atol=1e-6)
    assert next(encoder._model[0].auto_model.parameters()).dtype == torch.float32


def test_time_limit_stops_a_forward_from_inside(tiny_model_dir: Path) -> None:
    encoder = BulkEncoder(str(tiny_model_dir), device="cpu", precision="fp32")
    ids = encoder.tokenize(TEXTS[:4])
    with pytest.raises(TooSlow), time_limit(encoder._model[0].auto_model, 0.0):
        encoder.encode(ids)
    assert encoder.encode(ids).shape == (4, encoder.dimension)  # the hooks are gone


def test_plan_and_rebuild_calibrate_once_per_machine_and_model(
        tmp_path: Path, tiny_model_dir: Path, cache_file: Path,
        capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": text}) + "\n"
                              for i, text in enumerate(TEXTS)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({
        "embed": {"model": str(tiny_model_dir)}, "source": {"text_fields": ["text"]},
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


@pytest.mark.slow
def test_calibrating_the_real_model_takes_seconds_and_shows_progress(
        minilm_path: str, cache_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    from embedstream.bulk.sizing import builtin_sample

    passages = builtin_sample(300)
    texts = [" ".join(passages[i:i + 3]) for i in range(0, 300, 3)]  # ~180 words each
    encoder = BulkEncoder(minilm_path, device="cpu", precision="auto")
    with caplog.at_level(logging.INFO, logger="embedstream.bulk"):
        encoder.calibrate(encoder.tokenize(texts))
    assert encoder.calibration["calibration_s"] < 15
    steps = [r.getMessage() for r in caplog.records]
    assert any(s.startswith("calibrating bulk precision") for s in steps)
    assert any(s.startswith("calibration: fp32") for s in steps)
    assert any(s.startswith(f"bulk precision {encoder.precision}, decided in") for s in steps)
