"""LocalEncoder and resolve_model_path: the real model and a tiny random one."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstream.stream.embedding import resolve_model_path, weights_digest
from embedstream.stream.errors import ConfigError
from embedstream.stream.local_encoder import LocalEncoder
from tests.conftest import build_tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _varied_texts() -> list[str]:
    """About 50 texts of mixed length: real passages and abstracts, edge cases, one long
    enough to be truncated at 256 tokens."""
    texts: list[str] = []
    passages = DATA / "msmarco-sample" / "passages.tsv"
    if passages.exists():
        with passages.open(newline="") as handle:
            rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            texts += [row[1] for _, row in zip(range(30), rows, strict=False)]
    corpus = DATA / "beir" / "scifact" / "corpus.jsonl"
    if corpus.exists():
        with corpus.open() as handle:
            texts += [json.loads(line)["text"] for _, line in zip(range(4), handle, strict=False)]
    texts += [
        "", "a", "   ", "Kafka", "What is change data capture?",
        "中文文本的嵌入测试。", "emoji 😀🎉 and ZWJ 👩‍👩‍👧", "naïve café résumé",
        "https://example.com/a/very/long/url?with=query&and=params",
        " ".join(["streaming"] * 2000),  # far past 256 tokens: truncated like encode()
    ]
    return texts


@pytest.fixture(scope="module")
def stock(minilm_path: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def varied(minilm: LocalEncoder) -> tuple[list[str], np.ndarray]:
    """The varied texts and their vectors, computed once (CPU time is the test budget)."""
    texts = _varied_texts()
    return texts, minilm.embed(texts)


@pytest.mark.slow
def test_properties(minilm: LocalEncoder, minilm_path: str) -> None:
    assert minilm.model_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.dimension == 384
    assert minilm.max_seq_length == 256
    assert minilm.tokenizer.is_fast
    # The revision is the sha256 of the bundled model's weight files, as lowercase hex.
    assert re.fullmatch(r"[0-9a-f]{64}", minilm.revision), minilm.revision
    assert minilm.revision == weights_digest(minilm_path)


@pytest.mark.slow
def test_unit_norm_float32(minilm: LocalEncoder) -> None:
    vectors = minilm.embed(["one", "two words", "", "three words here"])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_empty_input(minilm: LocalEncoder) -> None:
    vectors = minilm.embed([])
    assert vectors.shape == (0, 384) and vectors.dtype == np.float32


@pytest.mark.slow
def test_matches_stock_encode(varied: tuple[list[str], np.ndarray], stock: Any) -> None:
    texts, ours = varied
    assert len(texts) >= 40
    theirs = stock.encode(texts, normalize_embeddings=True)
    cosines = (ours * theirs).sum(axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosines.min() >= 0.999, cosines.argmin()


@pytest.mark.slow
def test_input_order_preserved(
    minilm: LocalEncoder, varied: tuple[list[str], np.ndarray]
) -> None:
    texts, straight = varied
    order = list(range(len(texts)))
    random.Random(7).shuffle(order)
    shuffled = minilm.embed([texts[i] for i in order])
    # Different batch composition changes the last bits only.
    np.testing.assert_allclose(shuffled, straight[order], atol=1e-4)
    distinct = minilm.embed(["apples", "the stock market crashed"])
    assert float(distinct[0] @ distinct[1]) < 0.9


@pytest.mark.slow
def test_revision_stable_across_loads(minilm: LocalEncoder) -> None:
    again = LocalEncoder("all-MiniLM-L6-v2", device="cpu")
    assert again.revision == minilm.revision
    assert again.model_name == "all-MiniLM-L6-v2"


def test_revision_is_fast(minilm_path: str) -> None:
    started = time.perf_counter()
    weights_digest(minilm_path)
    # ~0.1 s for the 90 MB model; generous bound for a busy shared machine.
    assert time.perf_counter() - started < 2.0


@pytest.mark.slow
def test_revision_differs_with_weights(
    minilm: LocalEncoder, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tiny = LocalEncoder(str(tiny_model_dir), device="cpu")
    assert tiny.revision != minilm.revision
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert weights_digest(str(copy)) == tiny.revision  # location does not matter
    (copy / "README.md").write_text("docs do not change the weights")
    assert weights_digest(str(copy)) == tiny.revision
    reseeded = build_tiny_model(tmp_path / "reseeded", str(tiny_model_dir), seed=1)
    assert weights_digest(str(reseeded)) != tiny.revision


def test_tiny_model_packing_matches_stock(tiny_model_dir: Path) -> None:
    """A tiny token budget forces many sub-batches, and rows longer than the budget."""
    from sentence_transformers import SentenceTransformer

    tiny = LocalEncoder(str(tiny_model_dir), device="cpu", batch_tokens=16)
    assert tiny.dimension == 32 and tiny.max_seq_length == 128
    texts = ["", "x", "a b c d e f g", "word " * 300, "中文", "mixed length text " * 5] * 3
    ours = tiny.embed(texts)
    theirs = SentenceTransformer(str(tiny_model_dir), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    np.testing.assert_allclose((ours * theirs).sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_resolve_default_names(minilm_path: str) -> None:
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == minilm_path
    assert resolve_model_path("all-MiniLM-L6-v2") == minilm_path
    assert (Path(minilm_path) / "model.safetensors").is_file()


def test_resolve_local_dir(tiny_model_dir: Path) -> None:
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_resolve_bogus_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"embed\.model") as caught:
        resolve_model_path("no-such-org/no-such-model-xyz")
    assert "local" in str(caught.value)
    assert time.perf_counter() - started < 5.0
    with pytest.raises(ConfigError, match=r"embed\.model"):
        LocalEncoder("no-such-org/no-such-model-xyz", device="cpu")
