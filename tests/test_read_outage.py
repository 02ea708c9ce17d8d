"""A read-side outage (the Schema Registry) as the consumer's backpressure sees it:
over only when a message that failed is read, so the backoff grows and /readyz
stays 503 through every retry, whatever other partitions (other routes, schemas
already cached) keep delivering."""

from __future__ import annotations

from typing import Any

from confluent_kafka import TopicPartition

from embedstream.stream.backpressure import Backpressure
from embedstream.stream.errors import RegistryUnavailable
from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics


class Message:
    """What Backpressure reads of a polled message."""

    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._at = (topic, partition, offset)

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._at[0]

    def partition(self) -> int:
        return self._at[1]

    def offset(self) -> int:
        return self._at[2]


class Consumer:
    """The calls Backpressure makes of a consumer, recorded."""

    def __init__(self) -> None:
        self.seeks: list[tuple[str, int, int]] = []
        self.paused = False

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("avro", 0), TopicPartition("json", 0)]

    def pause(self, partitions: Any) -> None:
        self.paused = True

    def resume(self, partitions: Any) -> None:
        self.paused = False

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


def test_the_outage_lasts_until_a_failed_message_is_read_and_the_backoff_grows() -> None:
    now = [0.0]
    consumer, health = Consumer(), Health(60)
    health.started()
    health.set_partitions(2)
    pressure = Backpressure(consumer, Metrics(), health, lambda: now[0])  # type: ignore[arg-type]
    assigned = {("avro", 0), ("json", 0)}
    waits = []
    for _ in range(4):
        pressure.rewind([Message("avro", 0, 7), Message("avro", 0, 8)], assigned)
        pressure.back_off(RegistryUnavailable("registry down"))
        waits.append(pressure.backoff_s)
        assert consumer.seeks[-1] == ("avro", 0, 7) and consumer.paused
        assert not health.ready()[0]
        now[0] = pressure.retry_at or 0.0
        pressure.resume()  # time to read again
        assert not consumer.paused and not health.ready()[0], "not ready while retrying"
        pressure.took("json", 0, 40)  # another route's message proves nothing
        pressure.took("avro", 0, 3)   # nor one before the failed read
        pressure.quiet(now[0] + 1)
        assert not health.ready()[0]
    assert waits == sorted(waits) and waits[-1] > waits[0], "the backoff grows"
    pressure.took("avro", 0, 7)  # the message that failed is read: over
    assert health.ready()[0] and pressure.backoff_s == 0.0


def test_with_nothing_failed_to_read_again_the_outage_ends_after_a_quiet_while() -> None:
    now = [0.0]
    health = Health(60)
    health.started()
    pressure = Backpressure(Consumer(), Metrics(), health, lambda: now[0])  # type: ignore[arg-type]
    pressure.rewind([Message("avro", 0, 7)], {("avro", 0)})
    pressure.back_off(RegistryUnavailable("registry down"))
    now[0] = pressure.retry_at or 0.0
    pressure.resume()
    pressure.quiet(now[0] + 5)
    assert not health.ready()[0]
    pressure.quiet(now[0] + 11)  # e.g. its partition was revoked meanwhile
    assert health.ready()[0]
