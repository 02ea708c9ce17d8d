"""Micro-batching: a batch closes at the token budget or max_wait after its first message."""

from __future__ import annotations

from embedstream.stream.batch import MicroBatch
from embedstream.stream.chunking import Chunk
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.plan import PreparedEvent


def prepared(offset: int, tokens: int, partition: int = 0) -> PreparedEvent:
    position = Position("t", partition, offset)
    chunk = Chunk(0, 0, 1, "x", tokens, "h")
    return PreparedEvent(ChangeEvent("d", Op.UPSERT, 1, position, text="x"), [chunk])


def test_batch_closes_at_max_wait_after_its_first_message() -> None:
    batch = MicroBatch(max_tokens=1000, max_wait_s=0.05)
    assert batch.time_left(10.0) is None and not batch.due(10.0)
    batch.track(Position("t", 0, 0), now=10.0)
    batch.add(prepared(0, 10))
    batch.track(Position("t", 0, 1), now=10.04)  # a later message does not extend the wait
    assert not batch.due(10.049)
    assert batch.due(10.05)
    assert abs((batch.time_left(10.02) or 0) - 0.03) < 1e-9


def test_batch_closes_at_the_token_budget() -> None:
    batch = MicroBatch(max_tokens=100, max_wait_s=60)
    for offset in range(3):
        batch.track(Position("t", 0, offset), now=0.0)
        batch.add(prepared(offset, 40))
    assert batch.full and batch.due(0.0) and batch.tokens == 120


def test_offsets_cover_skipped_and_dead_lettered_messages() -> None:
    batch = MicroBatch(max_tokens=100, max_wait_s=1)
    batch.track(Position("t", 0, 7), now=0.0)  # decoded into an event
    batch.add(prepared(7, 5))
    batch.track(Position("t", 0, 8), now=0.0)  # dead-lettered: tracked, no event
    batch.track(Position("t", 1, 3), now=0.0)  # skipped heartbeat on another partition
    assert batch.next_offsets == {("t", 0): 9, ("t", 1): 4}
    assert batch.messages == 3 and len(batch.events) == 1


def test_dropping_lost_partitions_forgets_their_events_and_offsets() -> None:
    batch = MicroBatch(max_tokens=100, max_wait_s=1)
    for partition in (0, 1):
        batch.track(Position("t", partition, 0), now=0.0)
        batch.add(prepared(0, 10, partition))
    batch.drop_partitions({("t", 1)})
    assert batch.next_offsets == {("t", 0): 1}
    assert [p.event.position.partition for p in batch.events] == [0] and batch.tokens == 10
    batch.drop_partitions({("t", 0)})
    assert batch.empty and batch.time_left(0.0) is None
