"""Every backend computes the same function: ONNX Runtime and OpenVINO give torch
fp32's vectors (int8 close to them), unit norm, float32, in input order, whatever
the padding; an OpenVINO encoder's twin serves another thread; a backend asked for
but not installed is a ConfigError naming the extra, and under ``auto`` it is left
out; the exported graph is made once; the settings refuse what cannot run.

The tiny random model (tests/conftest.py) on the CPU, and once the real one.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from embedstream.stream._onnx_export import exported, int8
from embedstream.stream.backend_choice import candidates, padded, run_packed
from embedstream.stream.backends import (
    Candidate,
    OnnxRunner,
    OpenVinoRunner,
    Runner,
    available,
)
from embedstream.stream.config import EmbedSettings, load_settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.local_encoder import LocalEncoder

WORDS = ["river", "stone", "cloud", "engine", "paper", "garden", "signal", "winter", "copper",
         "lantern", "harbor", "orbit", "meadow", "ledger", "falcon", "quartz"]
# Distinct texts of 2 to 40 words: the tiny model's vectors of different texts are
# close (cosine up to ~0.999), so "in input order" is checked row by row against them.
TEXTS = [f"text {i}: " + " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)]
                                  for k in range(2 + (i * 5) % 39)) for i in range(24)]


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    result: npt.NDArray[np.float32] = (a * b).sum(axis=1)
    return result


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> npt.NDArray[np.float32]:
    """torch fp32's vectors of TEXTS."""
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    return encoder.embed(TEXTS)


@pytest.fixture(scope="module")
def graph(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's exported fp32 graph, in a directory of this module."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    return exported(model, tmp_path_factory.mktemp("graph"), with_types=True)


def check_vectors(vectors: npt.NDArray[np.float32], reference: npt.NDArray[np.float32],
                  closeness: float) -> None:
    assert vectors.dtype == np.float32 and vectors.shape == reference.shape
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert cosines(vectors, reference).min() > closeness
    # Each row is nearest to its own text's reference: the input order is kept.
    assert (np.argmax(vectors @ reference.T, axis=1) == np.arange(len(vectors))).all()


# -- the same vectors on every backend -----------------------------------------------


@pytest.mark.parametrize(("backend", "precision", "closeness"), [
    ("onnx", "fp32", 0.9999), ("openvino", "fp32", 0.9999), ("openvino", "bf16", 0.999)])
def test_each_backend_embeds_as_torch_fp32_does(
        tiny_model_dir: Path, reference: npt.NDArray[np.float32], backend: str, precision: str,
        closeness: float) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend=backend,
                           precision=precision)
    assert encoder.decided and (encoder.backend, encoder.precision) == (backend, precision)
    check_vectors(encoder.embed(TEXTS), reference, closeness)
    # One at a time, in another order, in one text: the same vectors.
    check_vectors(encoder.embed(TEXTS[::-1])[::-1], reference, closeness)
    check_vectors(np.concatenate([encoder.embed([t]) for t in TEXTS]), reference, closeness)
    assert encoder.embed([]).shape == (0, encoder.dimension)


def test_int8_through_embed_is_close_to_torch_fp32(
        tiny_model_dir: Path, reference: npt.NDArray[np.float32],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSTREAM_PRECISION_CACHE", "off")
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="onnx", precision="int8")
    encoder.calibrate(encoder.tokenize(TEXTS))
    assert (encoder.backend, encoder.precision) == ("onnx", "int8")
    assert encoder.variant in ("all", "ffn-fp32")
    # Measured on the tiny model: cosine 0.99998 for both recipes.
    check_vectors(encoder.embed(TEXTS), reference, 0.999)


@pytest.mark.parametrize("variant", ["all", "ffn-fp32"])
def test_both_int8_recipes_run_close_to_fp32(
        graph: Path, tiny_model_dir: Path, reference: npt.NDArray[np.float32],
        variant: str) -> None:
    import onnx

    quantized = int8(graph, variant)
    nodes = onnx.load(str(quantized)).graph.node
    ops = {n.op_type for n in nodes}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    fp32_matmuls = [n.name for n in nodes if n.op_type == "MatMul" and "/output/dense/" in n.name
                    and "attention" not in n.name]
    assert bool(fp32_matmuls) == (variant == "ffn-fp32")  # the FFN outputs kept fp32
    runner = OnnxRunner(quantized, Candidate("onnx", "int8", variant))
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    vectors = run_packed(runner, encoder.tokenize(TEXTS), 4096, encoder.tokenizer.pad_token_id,
                         False, encoder.dimension)
    check_vectors(vectors, reference, 0.999)


def test_padding_to_a_length_multiple_gives_the_same_vectors(
        graph: Path, tiny_model_dir: Path) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="torch", precision="fp32")
    runners: list[Runner] = [encoder.runner, OnnxRunner(graph, Candidate("onnx", "fp32")),
                             OpenVinoRunner(graph, Candidate("openvino", "fp32"))]
    batch = [ids for ids in encoder.tokenize(TEXTS) if len(ids) % 16][:6]
    pad = encoder.tokenizer.pad_token_id
    for runner in runners:
        exact = runner.run(*padded(batch, pad, False, 1))
        for multiple in (16, 64):
            ids, mask = padded(batch, pad, False, multiple)
            assert ids.shape[1] % multiple == 0 and ids.shape[1] > max(map(len, batch))
            assert np.allclose(runner.run(ids, mask), exact, atol=1e-5), runner.candidate


def test_an_openvino_encoders_twin_serves_another_thread(
        tiny_model_dir: Path, reference: npt.NDArray[np.float32]) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend="openvino",
                           precision="fp32")
    twin = encoder.twin()
    assert twin.runner is not encoder.runner and twin.backend == "openvino"
    results: dict[str, list[npt.NDArray[np.float32]]] = {"main": [], "twin": []}

    def work(which: LocalEncoder, into: list[npt.NDArray[np.float32]]) -> None:
        for _ in range(15):
            into.append(which.embed(TEXTS))

    other = threading.Thread(target=work, args=(twin, results["twin"]))
    other.start()
    work(encoder, results["main"])
    other.join(timeout=60)
    assert not other.is_alive()
    assert len(results["twin"]) == len(results["main"]) == 15
    for vectors in results["main"] + results["twin"]:
        check_vectors(vectors, reference, 0.9999)


# -- which backends there are -----------------------------------------------------------


@pytest.fixture
def without_openvino(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO as if not installed (what ``available`` asks: can it be found)."""
    find_spec = importlib.util.find_spec

    def hidden(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "openvino" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", hidden)


def test_a_backend_asked_for_but_not_installed_names_its_extra(
        tiny_model_dir: Path, graph: Path, without_openvino: None) -> None:
    assert not available("openvino") and available("onnx") and available("torch")
    extra = r"pip install 'embedstream\[openvino\]'"
    with pytest.raises(ConfigError, match=extra):
        candidates(backend="openvino", precision="auto", on_gpu=False)
    with pytest.raises(ConfigError, match=extra):
        LocalEncoder(str(tiny_model_dir), device="cpu", backend="openvino", precision="fp32")
    with pytest.raises(ConfigError, match=extra):
        OpenVinoRunner(graph, Candidate("openvino", "fp32"))


def test_under_auto_a_backend_not_installed_is_left_out(
        without_openvino: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="embedstream.embed"):
        found = candidates(backend="auto", precision="auto", on_gpu=False)
    assert [c.label for c in found] == ["torch/fp32", "torch/bf16", "onnx/fp32",
                                        "onnx/int8/all", "onnx/int8/ffn-fp32"]
    assert "pip install 'embedstream[openvino]' to try it" in caplog.text


def labels(found: list[Candidate]) -> list[str]:
    return [c.label for c in found]


def test_the_candidates_follow_what_was_asked_and_the_device() -> None:
    assert labels(candidates(backend="auto", precision="auto", on_gpu=False)) == [
        "torch/fp32", "torch/bf16", "onnx/fp32", "onnx/int8/all", "onnx/int8/ffn-fp32",
        "openvino/fp32", "openvino/bf16"]  # fp16 on a CPU only when asked
    assert labels(candidates(backend="auto", precision="fp16", on_gpu=False)) == [
        "torch/fp16", "openvino/fp16"]
    assert labels(candidates(backend="auto", precision="int8", on_gpu=False)) == [
        "onnx/int8/all", "onnx/int8/ffn-fp32"]
    assert labels(candidates(backend="openvino", precision="fp32", on_gpu=False)) == [
        "openvino/fp32"]
    assert labels(candidates(backend="auto", precision="auto", on_gpu=True)) == [
        "torch/fp32", "torch/bf16"]
    assert labels(candidates(backend="torch", precision="auto", on_gpu=True,
                             gpu_bf16=False)) == ["torch/fp32", "torch/fp16"]
    with pytest.raises(ConfigError, match="runs on the CPU"):
        candidates(backend="onnx", precision="auto", on_gpu=True)
    with pytest.raises(ConfigError, match="int8 runs on the CPU"):
        candidates(backend="auto", precision="int8", on_gpu=True)
    with pytest.raises(ConfigError, match="run by none of the backends"):
        candidates(backend="torch", precision="int8", on_gpu=False)


def test_the_exported_graph_is_made_once(
        tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def start(backend: str, precision: str) -> tuple[LocalEncoder, str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="embedstream.embed"):
            encoder = LocalEncoder(str(tiny_model_dir), device="cpu", backend=backend,
                                   precision=precision, cache=tmp_path)
        return encoder, caplog.text

    first, log = start("onnx", "fp32")
    assert "exported the model to ONNX" in log
    [made] = (tmp_path / "models").glob(f"{first.revision[:24]}/*/model.onnx")
    stamp = made.stat().st_mtime_ns
    _, log = start("openvino", "fp32")
    _, again = start("onnx", "fp32")
    assert "exported the model to ONNX" not in log + again
    assert made.stat().st_mtime_ns == stamp
    assert not list(made.parent.glob(".*.tmp")), "no scratch file left behind"


# -- the settings -----------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("backend", "precision", "runs"), [
    ("torch", "int8", "bf16, fp16, fp32"), ("openvino", "int8", "bf16, fp16, fp32"),
    ("onnx", "bf16", "fp32, int8"), ("onnx", "fp16", "fp32, int8")])
def test_the_settings_refuse_a_backend_with_a_precision_it_cannot_run(
        tmp_path: Path, backend: str, precision: str, runs: str) -> None:
    config = write(tmp_path, f"embed: {{backend: {backend}, precision: {precision}}}\n")
    with pytest.raises(ConfigError, match=f"embed.backend {backend} cannot run precision "
                                          f"{precision} \\(it runs {runs}"):
        load_settings(config)


def test_the_settings_take_every_pair_that_runs() -> None:
    pairs = {("auto", p) for p in ("auto", "fp32", "bf16", "fp16", "int8")} | {
        ("torch", "auto"), ("torch", "bf16"), ("onnx", "int8"), ("onnx", "auto"),
        ("openvino", "bf16"), ("openvino", "fp16")}
    for backend, precision in pairs:
        embed = EmbedSettings.model_validate({"backend": backend, "precision": precision})
        assert (embed.backend, embed.precision) == (backend, precision)
    default = EmbedSettings()
    assert (default.backend, default.precision) == ("auto", "auto")
    assert (default.quality_guard.mean_cosine, default.quality_guard.p01_cosine) == (0.99, 0.98)


@pytest.mark.parametrize(("old", "new"), [("precision: bf16", "embed.precision"),
                                          ("min_cosine: 0.99", "embed.quality_guard")])
def test_the_settings_say_where_the_bulk_precision_went(
        tmp_path: Path, old: str, new: str) -> None:
    key = old.split(":")[0]
    with pytest.raises(ConfigError, match=f"bulk.{key} has moved to {new}"):
        load_settings(write(tmp_path, f"bulk: {{{old}}}\n"))


# -- the real model ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_real_model_runs_alike_on_every_backend(
        minilm_path: str, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 (token types, its own pooling) exports and runs as torch
    runs it; int8 stays near fp32 on real prose (the guard decides if near enough)."""
    from embedstream.bulk.sizing import builtin_sample

    texts = builtin_sample(48)[::2]
    torch_fp32 = LocalEncoder(minilm_path, device="cpu", backend="torch", precision="fp32",
                              cache=tmp_path)
    reference = torch_fp32.embed(texts)
    for backend in ("onnx", "openvino"):
        encoder = LocalEncoder(minilm_path, device="cpu", backend=backend, precision="fp32",
                               cache=tmp_path)
        check_vectors(encoder.embed(texts), reference, 0.9999)
    source = next((tmp_path / "models").glob("*/*/model.onnx"))
    ids = torch_fp32.tokenize(texts)
    pad = torch_fp32.tokenizer.pad_token_id

    def run(runner: Runner) -> npt.NDArray[np.float32]:
        return run_packed(runner, ids, 4096, pad, False, torch_fp32.dimension)

    for variant in ("all", "ffn-fp32"):
        quantized = run(OnnxRunner(int8(source, variant), Candidate("onnx", "int8", variant)))
        assert cosines(quantized, reference).mean() > 0.98, variant
