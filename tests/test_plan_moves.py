"""The version guard when a key's events move between logs.

A key moves to another partition when a topic gains partitions or a custom
partitioner routes it elsewhere, to another topic when a route reads several,
and to a new incarnation of its topic when the topic is deleted and recreated
under the same name (offsets start again at 0). Offsets of different logs say
nothing about each other, so the guard orders such events by their explicit
version, or else by the record's Kafka timestamp.

Generated here: the production history of a few documents, each moving only
forward through a list of logs (its events in a later log were produced later,
with later timestamps), with creates, updates, deletes and tombstones, and with
versions either explicit (an LSN-like counter) or the offsets. The consumer
reads the logs in any interleaving that keeps each log's order, in
micro-batches, with restarts from earlier offsets of logs that still exist; the
first incarnation of a recreated topic is gone once the second is read. Held:
the store never goes back in production order, and ends at each document's last
produced event. Once with topic ids known, once with none (a broker without
them, where a recreated topic is told apart by timestamps).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedstream.stream.chunking import Chunk, content_hash
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.plan import PreparedEvent, build_write, fold, group_by_document
from embedstream.stream.store import DocState

from .conftest import hypothesis_examples

# (topic, partition, topic id): partition 1 added later, then topic "t" deleted
# and recreated (both partitions), then a second topic a route also reads.
LOGS = (("t", 0, "id-1"), ("t", 1, "id-1"), ("t", 0, "id-2"), ("u", 0, "id-u"))
FIRST_INCARNATION = {0, 1}  # deleted when log 2 (the recreated topic) starts
RECREATED = 2
DOCS = ("a", "b")
VECTOR = np.zeros(2, np.float32)


@dataclass(frozen=True)
class Produced:
    index: int  # production order
    item: PreparedEvent
    log: int


def make_event(doc: str, op: Op, kind: str, version: int | None, log: int, offset: int,
               ts: int | None, ids_known: bool) -> PreparedEvent:
    topic, partition, topic_id = LOGS[log]
    position = Position(topic, partition, offset, topic_id if ids_known else None, ts)
    text = f"{doc} at {topic}/{partition}/{topic_id}@{offset}" if op is Op.UPSERT else ""
    event = ChangeEvent(doc, op, offset if version is None else version, position, text,
                        kind=kind, versioned=version is not None and kind != "tombstone")
    chunks = [Chunk(0, 0, len(text), text, 4, content_hash(text))] if text else []
    return PreparedEvent(event, chunks)


@st.composite
def histories(draw: st.DrawFn, ids_known: bool, clock: str = "strict") -> list[Produced]:
    """``clock``: ``strict`` (every record a later millisecond), ``ties`` (two records
    a millisecond) or ``none`` (records without timestamps)."""
    explicit = draw(st.booleans())  # versions from the source, else the offsets
    next_offset = [0] * len(LOGS)
    log_of = {doc: 0 for doc in DOCS}
    version = {doc: draw(st.integers(0, 3)) for doc in DOCS}
    produced: list[Produced] = []
    steps = draw(st.lists(st.tuples(st.sampled_from(DOCS),
                                    st.sampled_from(["upsert", "upsert", "delete", "tombstone"]),
                                    st.integers(0, 2)), min_size=1, max_size=16))
    for index, (doc, action, move) in enumerate(steps):
        # Keys only move forward; nobody writes to a deleted incarnation again.
        log_of[doc] = min(len(LOGS) - 1, log_of[doc] + (1 if move == 2 else 0))
        if log_of[doc] in FIRST_INCARNATION and any(log_of[d] >= RECREATED for d in DOCS):
            log_of[doc] = RECREATED
        log = log_of[doc]
        offset = next_offset[log]
        next_offset[log] += 1
        version[doc] += 1
        op = Op.UPSERT if action == "upsert" else Op.DELETE
        kind = {"upsert": "update", "delete": "delete", "tombstone": "tombstone"}[action]
        ts = {"strict": 1_000 + index, "ties": 1_000 + index // 2, "none": None}[clock]
        item = make_event(doc, op, kind, version[doc] if explicit else None, log, offset,
                          ts=ts, ids_known=ids_known)
        produced.append(Produced(index, item, log))
    return produced


@st.composite
def deliveries(draw: st.DrawFn, produced: list[Produced]) -> list[list[Produced]]:
    """Micro-batches as a consumer reads them: logs interleaved, each in order,
    with restarts from earlier offsets; a deleted incarnation is never read again
    once its successor has been."""
    queues = {log: [p for p in produced if p.log == log] for log in range(len(LOGS))}
    read = dict.fromkeys(queues, 0)
    gone: set[int] = set()
    seen: list[Produced] = []

    def readable(log: int) -> bool:
        if log in gone or read[log] >= len(queues[log]):
            return False
        # The old incarnation is read to its end before it is deleted (what it
        # still held unread would be lost, which no guard can help).
        return log != RECREATED or all(read[old] >= len(queues[old])
                                       for old in FIRST_INCARNATION)

    while live := [log for log in queues if readable(log)]:
        log = draw(st.sampled_from(live))
        if log == RECREATED:
            gone |= FIRST_INCARNATION
        if draw(st.integers(0, 4)) == 0 and read[log] > 0:
            read[log] = draw(st.integers(0, read[log] - 1))  # a restart before the commit
        step = draw(st.integers(1, 3))
        seen += queues[log][read[log]:read[log] + step]
        read[log] += step
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    batches: list[list[Produced]] = []
    while seen:
        size = sizes[len(batches) % len(sizes)]
        batches.append(seen[:size])
        seen = seen[size:]
    return batches


def last_produced(produced: list[Produced]) -> dict[str, Produced]:
    return {p.item.event.doc_id: p for p in produced}


def consume(batches: list[list[Produced]],
            in_production_order: bool = True) -> dict[str, tuple[DocState, int]]:
    """Feed the batches through group/fold/build_write as the consumer does,
    checking (``in_production_order``) the store never goes back in production order."""
    store: dict[str, tuple[DocState, int]] = {}
    index_of = {id(p.item): p.index for batch in batches for p in batch}
    for batch in batches:
        for doc_id, events in group_by_document([p.item for p in batch]).items():
            before = store.get(doc_id)
            folded = fold(before[0] if before else None, events)
            if folded.winner is None:
                continue
            write = build_write(folded, {c.content_hash: VECTOR for c in folded.winner.chunks})
            index = index_of[id(folded.winner)]
            assert not in_production_order or before is None or index > before[1], (
                f"{doc_id} went back: event #{before[1]} replaced by #{index}")
            assert write.state.deleted == (folded.winner.event.op is Op.DELETE)
            store[doc_id] = (write.state, index)
    return store


def outcome(deleted: bool, index: int) -> tuple[str, int]:
    """What a reader sees: gone, or the text of the event with this index."""
    return ("deleted", -1) if deleted else ("live", index)


def check(produced: list[Produced], batches: list[list[Produced]]) -> None:
    store = consume(batches)
    expected = {doc: outcome(p.item.event.op is Op.DELETE, p.index)
                for doc, p in last_produced(produced).items()}
    assert {doc: outcome(state.deleted, index) for doc, (state, index) in store.items()} \
        == expected


@pytest.mark.parametrize("ids_known", [True, False], ids=["topic-ids", "no-topic-ids"])
def test_any_interleaving_of_moving_keys_ends_at_the_last_produced_event(ids_known: bool) -> None:
    @settings(max_examples=hypothesis_examples(1_500), deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        produced = data.draw(histories(ids_known))
        check(produced, data.draw(deliveries(produced)))

    run()


@pytest.mark.parametrize("clock", ["ties", "none"])
def test_with_tied_or_missing_timestamps_the_read_order_changes_nothing(clock: str) -> None:
    """Records of one millisecond, or without timestamps, in different logs: the
    guard cannot know which was produced last, but whatever order they are read
    in (and read again), the store ends the same, never flipping back and forth."""
    @settings(max_examples=hypothesis_examples(1_000), deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        produced = data.draw(histories(True, clock))
        first = consume(data.draw(deliveries(produced)), in_production_order=False)
        second = consume(data.draw(deliveries(produced)), in_production_order=False)
        assert {doc: outcome(state.deleted, index) for doc, (state, index) in first.items()} \
            == {doc: outcome(state.deleted, index) for doc, (state, index) in second.items()}

    run()


def stored_after(*events: PreparedEvent) -> DocState | None:
    state: DocState | None = None
    for item in events:
        folded = fold(state, [item])
        state = folded.state or state
    return state


def test_a_tombstone_in_another_partition_deletes_even_at_a_lower_offset() -> None:
    """The probe's case: created at offset 22 of partition 0, tombstoned at offset 1
    of partition 1 (produced in the same millisecond), then both read again."""
    create = make_event("a", Op.UPSERT, "create", None, 0, 22, ts=5_000, ids_known=True)
    tomb = make_event("a", Op.DELETE, "tombstone", None, 1, 1, ts=5_000, ids_known=True)
    folded = fold(stored_after(create), [tomb])
    assert folded.winner is tomb and folded.moved and folded.state and folded.state.deleted
    # Read again, in either order (a member's commit lagged): still deleted.
    assert fold(folded.state, [create]).winner is None
    assert stored_after(tomb, create, tomb, create).deleted  # type: ignore[union-attr]


def test_a_version_less_update_that_moved_partitions_applies() -> None:
    first = make_event("a", Op.UPSERT, "update", None, 0, 40, ts=1_000, ids_known=True)
    moved = make_event("a", Op.UPSERT, "update", None, 1, 3, ts=2_000, ids_known=True)
    folded = fold(stored_after(first), [moved])
    assert folded.winner is moved and folded.moved
    # Re-reading partition 0 afterwards (a lagging member, a restart) is stale.
    assert fold(folded.state, [first]).winner is None


@pytest.mark.parametrize("ids_known", [True, False], ids=["topic-ids", "no-topic-ids"])
def test_events_of_a_recreated_topic_are_not_stale(ids_known: bool) -> None:
    old = make_event("a", Op.UPSERT, "update", None, 0, 500, ts=1_000, ids_known=ids_known)
    new = make_event("a", Op.UPSERT, "update", None, 2, 0, ts=9_000, ids_known=ids_known)
    folded = fold(stored_after(old), [new])
    assert folded.winner is new and folded.moved
    again = fold(folded.state, [new])  # the new topic's record replayed: a no-op
    assert again.winner is None


def test_explicit_versions_decide_across_partitions() -> None:
    newer = make_event("a", Op.UPSERT, "update", 7, 0, 50, ts=1_000, ids_known=True)
    older = make_event("a", Op.UPSERT, "update", 6, 1, 90, ts=3_000, ids_known=True)
    assert fold(stored_after(newer), [older]).winner is None  # lower LSN, later offset/ts
    same = make_event("a", Op.UPSERT, "update", 7, 1, 91, ts=3_000, ids_known=True)
    assert fold(stored_after(newer), [same]).winner is None  # the same change read again


def test_a_state_stored_before_logs_were_recorded_is_one_sequence() -> None:
    legacy = DocState(version=30, offset=30, deleted=False)
    lower = make_event("a", Op.UPSERT, "update", None, 1, 3, ts=9_000, ids_known=True)
    higher = make_event("a", Op.UPSERT, "update", None, 1, 31, ts=9_000, ids_known=True)
    assert fold(legacy, [lower]).winner is None
    assert fold(legacy, [higher]).winner is higher
