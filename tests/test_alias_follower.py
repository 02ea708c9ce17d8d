"""The consumer's side of the handover, with a stand-in consumer, admin and store
(the end-to-end run with the real broker is tests/test_handover.py)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from embedstream.stream.handover import AliasFollower
from embedstream.stream.store import Handover

P0 = ("t", 0)


class Store:
    def __init__(self, collection: str, record: Handover | None = None) -> None:
        self.collection = collection
        self.record = record
        self.acks: list[tuple[str, list[tuple[str, int]]]] = []
        self.closed = False

    def read_handover(self) -> Handover | None:
        return self.record

    def acknowledge_handover(self, group: str, partitions: Collection[tuple[str, int]]) -> None:
        self.acks.append((group, sorted(partitions)))

    def close(self) -> None:
        self.closed = True


class Kafka:
    def __init__(self) -> None:
        self.seeks: list[tuple[str, int, int]] = []
        self.commits: list[list[tuple[str, int, int]]] = []
        self.refuse_seeks = 0

    def seek(self, tp: Any) -> None:
        if self.refuse_seeks:
            self.refuse_seeks -= 1
            raise KafkaException(KafkaError(KafkaError._STATE))
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])


class Aliases:
    def __init__(self, target: str) -> None:
        self.target = target

    def resolve(self, alias: str) -> str:
        return self.target


def follower(kafka: Kafka, aliases: Aliases, stores: Mapping[str, Store]) -> AliasFollower:
    return AliasFollower(kafka, aliases, "docs", "g",  # type: ignore[arg-type]
                         lambda name: stores[name], lambda: 0.0)  # type: ignore[arg-type,return-value]


def test_a_partition_acknowledged_elsewhere_never_goes_into_the_old_collection() -> None:
    # Another consumer already moved p0 and acknowledged it; this one still writes
    # to the old collection when p0 is assigned to it.
    old = Store("docs_a")
    new = Store("docs_b", Handover({P0: 10}, {"g": frozenset({P0})}))
    kafka = Kafka()
    f = follower(kafka, Aliases("docs_b"), {"docs_b": new})
    f.on_assign([P0])
    assert f.ignores(P0, 15) and f.ignores(P0, 16)  # held: nothing applied anywhere
    assert f.needs_drain(old, 0.0)  # type: ignore[arg-type]
    sink, moved = f.follow(old, {P0})  # type: ignore[arg-type]
    assert sink is new and old.closed and moved == {}
    assert kafka.seeks == [("t", 0, 15)]  # read again from the first ignored message
    assert not f.ignores(P0, 15)


def test_an_unacknowledged_partition_moves_to_the_handover_offset() -> None:
    store = Store("docs_b", Handover({P0: 10}))
    kafka = Kafka()
    kafka.refuse_seeks = 1  # not fetching yet right after the assignment
    f = follower(kafka, Aliases("docs_b"), {})
    f.on_assign([P0])
    assert f.ignores(P0, 40)
    assert f.needs_drain(store, 0.0)  # type: ignore[arg-type]
    assert f.follow(store, {P0}) == (store, {})  # type: ignore[arg-type]
    assert kafka.commits == [] and f.ignores(P0, 41)  # still waiting, nothing lost
    assert f.follow(store, {P0}) == (store, {P0: 10})  # type: ignore[arg-type]
    assert kafka.seeks == [("t", 0, 10)] and kafka.commits == [[("t", 0, 10)]]
    assert store.acks == [("g", [P0])]
    assert f.ignores(P0, 9) and not f.ignores(P0, 10)  # below the handover: stale reads


def test_a_store_error_keeps_the_partition_held() -> None:
    from embedstream.stream.errors import SinkError

    class Failing(Store):
        def read_handover(self) -> Handover | None:
            raise SinkError("store down")

    store = Failing("docs_b")
    f = follower(Kafka(), Aliases("docs_b"), {})
    f.on_assign([P0])
    assert f.needs_drain(store, 0.0)  # type: ignore[arg-type]
    assert f.follow(store, {P0}) == (store, {})  # type: ignore[arg-type]
    assert f.ignores(P0, 3)


def test_an_unmoved_alias_asks_for_no_checkpoint() -> None:
    # The consumer drains (applies, flushes, commits) only when there is something to do.
    store = Store("docs_b", Handover({P0: 10}, {"g": frozenset({P0})}))
    f = follower(Kafka(), Aliases("docs_b"), {})
    f.on_assign([P0])
    assert f.needs_drain(store, 0.0)  # type: ignore[arg-type]
    f.follow(store, {P0})  # type: ignore[arg-type]
    assert not f.needs_drain(store, 5.0)  # type: ignore[arg-type]
    assert not f.ignores(P0, 11)
