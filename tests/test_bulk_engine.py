"""The bulk engine: packing, source order, errors, and vectors against stock encode."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embedstream.bulk.engine import BulkEngine, EmbeddedUnit
from embedstream.stream.backend_choice import QualityGuard
from embedstream.stream.embedding import pack_batches
from embedstream.stream.local_encoder import LocalEncoder

PASSAGES = Path(__file__).resolve().parents[1].parent / "shared/data/msmarco-sample/passages.tsv"


@given(st.lists(st.integers(min_value=0, max_value=600), max_size=300),
       st.integers(min_value=1, max_value=5000))
def test_packing_covers_every_text_once_within_the_budget(lengths: list[int], budget: int) -> None:
    batches = pack_batches(lengths, budget)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * max(1, max(lengths[i] for i in batch))
        assert padded <= budget or len(batch) == 1
    # Longest first, so neighbours in a batch have similar lengths.
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def _cost(batches: list[list[int]], lengths: list[int], multiple: int, call: int) -> int:
    """Passes x ``call`` + padded tokens: what pack_batches' cut minimises."""
    def rounded(n: int) -> int:
        return max(1, n) + -max(1, n) % multiple
    return sum(call + len(b) * rounded(max(lengths[i] for i in b)) for b in batches)


@given(st.lists(st.integers(min_value=0, max_value=600), max_size=120),
       st.integers(min_value=1, max_value=5000), st.sampled_from([1, 16]),
       st.integers(min_value=1, max_value=300))
def test_cutting_by_cost_covers_every_text_within_the_budget_at_no_more_cost(
        lengths: list[int], budget: int, multiple: int, call: int) -> None:
    cut = pack_batches(lengths, budget, multiple=multiple, call_tokens=call)
    filled = pack_batches(lengths, budget, multiple=multiple)
    assert sorted(i for b in cut for i in b) == list(range(len(lengths)))
    for batch in cut:
        longest = max(1, max(lengths[i] for i in batch))
        assert len(batch) * (longest + -longest % multiple) <= budget or len(batch) == 1
    flat = [lengths[i] for b in cut for i in b]
    assert flat == sorted(flat, reverse=True)
    assert _cost(cut, lengths, multiple, call) <= _cost(filled, lengths, multiple, call)


def test_a_micro_batch_of_one_long_and_some_short_texts_is_not_all_padded_to_the_long_one(
) -> None:
    lengths = [20, 200, 24, 18]
    assert pack_batches(lengths, 8192) == [[1, 2, 0, 3]]  # filled: 4 x 200 tokens
    assert pack_batches(lengths, 8192, call_tokens=96) == [[1], [2, 0, 3]]
    # Texts of nearly equal length still share a pass.
    assert pack_batches([100, 96, 90], 8192, call_tokens=96) == [[0, 1, 2]]


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir: Path) -> LocalEncoder:
    return LocalEncoder(str(tiny_model_dir), device="cpu", precision="fp32", batch_tokens=512)


def test_units_are_written_in_source_order_with_one_row_per_text(
        tiny_encoder: LocalEncoder) -> None:
    texts = [f"record {i} " + "word " * (i % 37) for i in range(500)]
    engine: BulkEngine[int, int] = BulkEngine([tiny_encoder], unit_records=7, tokenizer_workers=3,
                                              bucket_texts=64, queue_depth=2)
    seen: list[int] = []
    rows: dict[int, Any] = {}

    def prepare(i: int) -> tuple[int, list[str]]:
        return i, [texts[i]] * (i % 3)  # 0, 1 or 2 texts per record

    def write(unit: EmbeddedUnit[int, int]) -> None:
        seen.extend(unit.records)
        for record, vectors in zip(unit.records, unit.vectors, strict=True):
            rows[record] = vectors

    stats = engine.run(range(500), prepare, write)
    assert seen == list(range(500))
    assert all(rows[i].shape == (i % 3, tiny_encoder.dimension) for i in range(500))
    assert stats.records == 500 and stats.texts == sum(i % 3 for i in range(500))
    assert 0.0 <= stats.padding_fraction < 0.5 and stats.padded_tokens >= stats.tokens
    # The same text gives the same vector wherever it was batched.
    np.testing.assert_allclose(rows[2][0], rows[2][1], atol=1e-5)
    alone = tiny_encoder.embed([texts[5]])[0]
    np.testing.assert_allclose(rows[5][0], alone, atol=1e-4)


def test_a_failing_stage_stops_the_run_and_reaches_the_caller(tiny_encoder: LocalEncoder) -> None:
    engine: BulkEngine[int, None] = BulkEngine([tiny_encoder], unit_records=4, queue_depth=1)
    written: list[int] = []

    def prepare(i: int) -> tuple[None, list[str]]:
        if i == 50:
            raise RuntimeError("bad record 50")
        return None, [f"text {i}"]

    with pytest.raises(RuntimeError, match="bad record 50"):
        engine.run(range(10_000), prepare, lambda unit: written.extend(unit.records))
    assert len(written) < 10_000
    assert written == list(range(len(written)))  # what was written is a prefix

    def failing_write(unit: EmbeddedUnit[int, None]) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        engine.run(range(100), lambda i: (None, ["x"]), failing_write)


@pytest.mark.slow
def test_bf16_vectors_keep_cosine_with_stock_encode(minilm_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    with PASSAGES.open(newline="", encoding="utf-8") as handle:
        texts = [row[1] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    texts = texts[:300]
    encoder = LocalEncoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu",
                          precision="bf16")
    engine: BulkEngine[int, None] = BulkEngine([encoder], unit_records=64)
    out = np.empty((len(texts), encoder.dimension), np.float32)

    def write(unit: EmbeddedUnit[int, None]) -> None:
        assert unit.flat is not None
        out[unit.records] = unit.flat

    engine.run(range(len(texts)), lambda i: (None, [texts[i]]), write)
    stock = SentenceTransformer(minilm_path, device="cpu").encode(
        texts, batch_size=32, normalize_embeddings=True)
    cosines = (out * stock).sum(axis=1)
    assert cosines.min() >= 0.99
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)


def test_a_rejected_reduced_precision_leaves_the_fp32_weights_untouched(
        tiny_model_dir: Path) -> None:
    encoder = LocalEncoder(str(tiny_model_dir), device="cpu", precision="auto",
                           guard=QualityGuard(1.0, 1.0))  # bf16 cannot pass this
    transformer = encoder._model[0].auto_model
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    ids = encoder.tokenize([f"calibration text number {i}" for i in range(64)])
    assert encoder.calibrate(ids) == "fp32" == encoder.precision
    after = transformer.state_dict()
    assert all(after[k].dtype == before[k].dtype and bool((after[k] == before[k]).all())
               for k in before)
