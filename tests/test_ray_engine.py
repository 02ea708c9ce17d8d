"""The Ray Data engine against the local one, on a small local Ray instance.

Real passages (the MS MARCO sample) and the real model: every record written
exactly once and in source order, the same vectors as the local engine at
fp32, statistics that add up, several texts per record, and failures in
``write`` and ``prepare`` that surface in the caller. All tests share one
engine (one Ray instance, started once): the failure test runs first, so the
others also show that a failed run leaves the engine usable. Each run has a
deadline: a stalled pipeline fails the test (Ray is shut down to free it)
instead of hanging the suite.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from embedstream.bulk.engine import BulkEngine, EmbeddedUnit, EngineStats
from embedstream.bulk.ray_engine import RayEngine  # imports without Ray; running needs it
from embedstream.stream.local_encoder import LocalEncoder

DEADLINE_S = 100.0  # one run takes ~20 s here, most of it starting the actor
# Imports Ray in the engine fixture, not at collection. A test makes up to two runs,
# each failing at its deadline: pytest-timeout must not cut in before (Ray stays up).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * DEADLINE_S + 100)]

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PASSAGES = Path(__file__).resolve().parents[2] / "shared/data/msmarco-sample/passages.tsv"
COUNT = 300


@pytest.fixture(scope="module")
def passages() -> list[str]:
    if not PASSAGES.exists():
        pytest.skip(f"{PASSAGES} is not here")
    csv.field_size_limit(1 << 30)
    with PASSAGES.open(newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        texts = [row[1] for row in rows if len(row) >= 2]
    assert len(texts) >= COUNT
    return texts[:COUNT]


@pytest.fixture(scope="module")
def engine() -> Iterator[RayEngine[int, int]]:
    pytest.importorskip("ray.data")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)  # always a local instance
        # 2 CPUs: one for the actor, one for tokenize tasks. 32-record units in windows
        # of 4 (2 units per actor call): 300 records are 10 units over 3 windows, the
        # last one short.
        ray_engine: RayEngine[int, int] = RayEngine(
            MODEL, device="cpu", precision="fp32", unit_records=32, actors=1,
            cpus_per_actor=1.0, window_units=4)
        yield ray_engine
        ray_engine.close()


@pytest.fixture(scope="module")
def local_vectors(passages: list[str]) -> npt.NDArray[np.float32]:
    encoder = LocalEncoder(MODEL, device="cpu", precision="fp32")
    local: BulkEngine[int, None] = BulkEngine([encoder], unit_records=64)
    out = np.zeros((len(passages), encoder.dimension), np.float32)

    def write(unit: EmbeddedUnit[int, None]) -> None:
        assert unit.flat is not None
        out[unit.records] = unit.flat

    stats = local.run(range(len(passages)), lambda i: (None, (passages[i],)), write)
    assert stats.texts == len(passages)
    return out


def run(engine: RayEngine[int, int], count: int,
        prepare: Callable[[int], tuple[int, Sequence[str]]],
        write: Callable[[EmbeddedUnit[int, int]], None]) -> EngineStats:
    """``engine.run`` over records ``0..count-1``, failing the test past the deadline."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["stats"] = engine.run(range(count), prepare, write)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    if thread.is_alive():
        import ray

        ray.shutdown()  # frees the stalled run; the engine is unusable from here on
        thread.join(60)
        pytest.fail(f"the ray engine made no end within {DEADLINE_S:.0f} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    stats = outcome["stats"]
    assert isinstance(stats, EngineStats)
    return stats


class Recorder:
    """A ``write`` that keeps every unit it was given."""

    def __init__(self) -> None:
        self.units: list[EmbeddedUnit[int, int]] = []

    def __call__(self, unit: EmbeddedUnit[int, int]) -> None:
        self.units.append(unit)

    @property
    def records(self) -> list[int]:
        return [r for unit in self.units for r in unit.records]


def assert_stats(stats: EngineStats, records: int, texts: int) -> None:
    assert stats.records == records
    assert stats.texts == texts
    assert 0 < stats.tokens <= stats.padded_tokens
    assert 0.0 <= stats.padding_fraction < 0.5
    assert stats.batches >= 1
    assert stats.forward_s > 0


def test_failures_in_write_and_prepare_surface_in_the_caller(
        engine: RayEngine[int, int], passages: list[str]) -> None:
    class SinkDown(RuntimeError):
        pass

    written: list[int] = []

    def write(unit: EmbeddedUnit[int, int]) -> None:
        if unit.seq == 1:
            raise SinkDown("sink down")
        written.extend(unit.records)

    with pytest.raises(SinkDown):
        run(engine, len(passages), lambda i: (i, (passages[i],)), write)
    assert written == list(range(32))  # unit 0 only

    def prepare(i: int) -> tuple[int, Sequence[str]]:
        if i == 200:
            raise ValueError("bad record")
        return i, (passages[i],)

    again = Recorder()
    with pytest.raises(ValueError, match="bad record"):
        run(engine, len(passages), prepare, again)
    assert again.records == list(range(len(again.records)))  # a prefix, in order
    assert len(again.records) < 200


def test_one_text_per_record_matches_the_local_engine(
        engine: RayEngine[int, int], passages: list[str],
        local_vectors: npt.NDArray[np.float32]) -> None:
    write = Recorder()
    stats = run(engine, len(passages), lambda i: (i, (passages[i],)), write)

    assert write.records == list(range(len(passages)))  # each exactly once, in order
    assert [u.seq for u in write.units] == list(range(10))
    assert [len(u.records) for u in write.units] == [32] * 9 + [12]
    for unit in write.units:
        assert unit.prepared == unit.records
        assert len(unit.ids) == len(unit.records)  # one text each
        assert all(0 < len(ids) <= 256 for ids in unit.ids)  # truncated to max_seq_length
    vectors = np.concatenate([u.flat for u in write.units if u.flat is not None])
    assert vectors.shape == local_vectors.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert (vectors * local_vectors).sum(axis=1).min() >= 0.999
    assert_stats(stats, len(passages), len(passages))
    assert stats.tokens == sum(len(ids) for u in write.units for ids in u.ids)
    assert engine.precisions == {"fp32"}


def test_several_texts_per_record(engine: RayEngine[int, int], passages: list[str],
                                  local_vectors: npt.NDArray[np.float32]) -> None:
    count = 160  # 5 units: 2 windows, the last one short

    def prepare(i: int) -> tuple[int, Sequence[str]]:
        text = passages[i]
        if i % 7 == 0:
            return i, (text,)  # the whole passage
        if i % 11 == 0:
            return i, ()  # nothing to embed
        middle = len(text) // 2
        return i, (text[:middle], text[middle:])

    write = Recorder()
    stats = run(engine, count, prepare, write)

    assert write.records == list(range(count))
    texts = 0
    for unit in write.units:
        for record, unit_texts, rows in zip(unit.records, unit.texts, unit.vectors,
                                            strict=True):
            assert rows.shape == (len(prepare(record)[1]), 384)
            assert len(unit_texts) == len(rows)
            texts += len(unit_texts)
            if len(unit_texts) == 1:  # the whole passage: the local engine's vector
                assert float(rows[0] @ local_vectors[record]) >= 0.999
    assert texts == 23 + 2 * 125  # 23 whole passages, 12 with nothing, 125 halved
    assert_stats(stats, count, texts)
