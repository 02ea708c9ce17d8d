"""A Kafka snapshot's fold keeps its winners on disk: the same winners as folding
in memory event by event, and memory that does not grow with the corpus."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import pytest

from embedstream.bulk._winners import Winners
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.plan import PreparedEvent, fold
from embedstream.stream.store import DocState


def events(count: int, docs: int, seed: int) -> list[PreparedEvent]:
    """Upserts and deletes of ``docs`` documents over two topics, versions out of order
    now and then (stale events), some carrying only their offset as a version."""
    rng = random.Random(seed)
    out = []
    offsets = {("a", 0): 0, ("a", 1): 0, ("b", 0): 0}
    for _ in range(count):
        topic, partition = rng.choice(list(offsets))
        offsets[topic, partition] += 1
        offset = offsets[topic, partition]
        versioned = rng.random() > 0.1
        event = ChangeEvent(
            doc_id=f"doc-{rng.randrange(docs)}",
            op=Op.DELETE if rng.random() < 0.15 else Op.UPSERT,
            version=rng.randrange(1, 50) if versioned else offset,
            position=Position(topic, partition, offset), versioned=versioned,
            source_ts_ms=1_700_000_000_000 + offset)
        out.append(PreparedEvent(event, ()))
    return out


def test_the_table_folds_to_the_same_winners_as_a_dict(tmp_path: Path) -> None:
    stream = events(20_000, 1_500, seed=3)
    expected: dict[str, DocState] = {}
    for prepared in stream:
        state = fold(expected.get(prepared.event.doc_id), [prepared]).state
        if state is not None:
            expected[prepared.event.doc_id] = state
    winners = Winners(tmp_path)
    try:
        for start in range(0, len(stream), 777):  # batches that split documents' events
            winners.fold(stream[start:start + 777])
        assert len(winners) == len(expected)
        assert winners.get_many(expected) == expected
        assert winners.get_many(["no-such-doc"]) == {}
    finally:
        winners.close()
    assert not winners.path.exists(), "the scratch file is removed on close"


def test_folding_many_documents_holds_no_python_object_per_document(tmp_path: Path) -> None:
    """100,000 documents: held as DocState objects in a dict they take some 25 MB of
    Python memory (measured here as the reference); the table's fold stays within a
    few batches' worth, and the same for 10,000 documents as for 100,000."""

    def peak_mib(docs: int) -> float:
        winners = Winners(tmp_path)
        tracemalloc.start()
        try:
            for start in range(0, docs, 2000):
                batch = [PreparedEvent(ChangeEvent(
                    doc_id=f"doc-{i}", op=Op.UPSERT, version=1,
                    position=Position("t", 0, i)), ()) for i in range(start, start + 2000)]
                winners.fold(batch)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            winners.close()
        return peak / 2**20

    small, large = peak_mib(10_000), peak_mib(100_000)
    assert large < 8, f"{large:.1f} MiB of Python memory for 100,000 documents"
    assert large < 1.2 * small + 1, f"grew from {small:.1f} to {large:.1f} MiB"

    tracemalloc.start()
    try:  # the in-memory fold this replaces, for scale
        held = {f"doc-{i}": DocState(1, i, False, topic="t", partition=0)
                for i in range(100_000)}
        _, dict_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"fold peaks {small:.2f} / {large:.2f} MiB; dict {dict_peak / 2**20:.1f} MiB")
    assert len(held) == 100_000 and dict_peak / 2**20 > 3 * large


def test_a_scratch_table_that_cannot_be_made_leaves_no_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import embedstream.bulk._winners as winners_module

    def refuse(name: str) -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(winners_module, "_scratch_db", refuse)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        Winners(tmp_path / "scratch")
    assert list((tmp_path / "scratch").iterdir()) == []
