"""Where a record was read from, as the version guard needs it.

A topic deleted and recreated under the same name starts its offsets at 0
again, so an offset alone cannot tell the new topic's records from replays of
the old one: the version guard (:mod:`embedstream.stream.plan`) also compares
Kafka topic ids. :class:`TopicIds` looks them up once per assignment (one admin
round trip, in the rebalance callback), never per record.

Not guaranteed: a topic deleted and recreated so fast that the group never saw
it gone keeps its old id here until the next rebalance; records it holds at
offsets below the stored ones then count as replays unless their Kafka
timestamps are later (see the plan's rule for an unknown id). A broker without
topic ids (before Kafka 2.8) gives none: the same fallback applies throughout.
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

    def refresh(self, topics: Collection[str]) -> None:
        """Look ``topics`` up again (a failure leaves them unknown, logged)."""
        if not topics:
            return
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


def position_of(message: Message, topic_ids: TopicIds | None) -> Position:
    """The record's position, with its topic id (when known) and Kafka timestamp."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    kind, timestamp = message.timestamp()
    return Position(topic, partition, offset,
                    topic_id=topic_ids.get(topic) if topic_ids is not None else None,
                    timestamp_ms=None if kind == TIMESTAMP_NOT_AVAILABLE or timestamp < 0
                    else timestamp)
