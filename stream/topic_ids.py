"""Where a record was read from, as the version guard needs it.

A topic deleted and recreated under the same name starts its offsets at 0
again, so an offset alone cannot tell the new topic's records from replays of
the old one: the version guard (:mod:`embedstream.stream.plan`) also compares
Kafka topic ids. :class:`TopicIds` looks them up when partitions are assigned
(one admin round trip, in the rebalance callback), and again when a
partition's records go back to an earlier offset (a seek back after an outage,
or a consumer reset to the start of a recreated topic), never per record.

Not guaranteed: a recreated topic's records read before either happens keep
the old id (the guard then takes records at offsets below the stored ones for
replays). A broker without topic ids (before Kafka 2.8) gives none: the guard
then tells a recreated topic by record timestamps alone (see its rule).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException, Message, TopicCollection
from confluent_kafka.admin import AdminClient

from embedstream.stream.events import Position

__all__ = ["TopicIds", "position_of"]

log = logging.getLogger("embedstream.consumer")

_ZERO_ID = "AAAAAAAAAAAAAAAAAAAAAA"  # the nil UUID: the broker keeps no topic ids


class TopicIds:
    """The current topic id of each topic looked up; None where unknown."""

    def __init__(self, admin: AdminClient, timeout_s: float = 5.0) -> None:
        self._admin = admin
        self._timeout_s = timeout_s
        self._ids: dict[str, str | None] = {}
        self._last_offset: dict[tuple[str, int], int] = {}

    def poll(self) -> None:
        """Serve the admin client's callbacks: its queued log lines go to the logger."""
        self._admin.poll(0)

    def refresh(self, topics: Collection[str]) -> None:
        """Look ``topics`` up again (a failure leaves them unknown, logged)."""
        if not topics:
            return
        # Looked up now: where their partitions were read so far no longer matters.
        self._last_offset = {tp: o for tp, o in self._last_offset.items() if tp[0] not in topics}
        futures = self._admin.describe_topics(TopicCollection(sorted(topics)),
                                              request_timeout=self._timeout_s)
        for topic, future in futures.items():
            try:
                found = str(future.result(timeout=self._timeout_s).topic_id)
            except (KafkaException, TimeoutError) as error:
                log.warning("cannot look up the topic id of %r (%s): a recreated topic is "
                            "told apart by record timestamps alone", topic, error)
                found = None
            self._ids[topic] = None if found in (None, _ZERO_ID) else found

    def get(self, topic: str) -> str | None:
        return self._ids.get(topic)

    def position(self, topic: str, partition: int, offset: int,
                 timestamp_ms: int | None) -> Position:
        """The position of a record just read, with its topic's id; a partition
        read from an earlier offset than before has the id looked up again."""
        last = self._last_offset.get((topic, partition))
        if last is not None and offset <= last:
            self.refresh([topic])
        self._last_offset[(topic, partition)] = offset
        return Position(topic, partition, offset, self.get(topic), timestamp_ms)


def position_of(message: Message, topic_ids: TopicIds | None) -> Position:
    """The record's position, with its topic id (when known) and Kafka timestamp."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    kind, timestamp = message.timestamp()
    timestamp_ms = None if kind == TIMESTAMP_NOT_AVAILABLE or timestamp < 0 else timestamp
    if topic_ids is None:
        return Position(topic, partition, offset, timestamp_ms=timestamp_ms)
    return topic_ids.position(topic, partition, offset, timestamp_ms)
