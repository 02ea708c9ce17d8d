"""The consumer's reading of one polled message: what it becomes (nothing, a skip, a
dead letter, or an event in the batch), and the dead-lettering the writing side
uses too.

Guaranteed: a message is tracked in the batch only once read, so a Schema Registry
outage (``RegistryUnavailable``, raised through) leaves its offset uncovered; a
message of a partition no longer ours, or read before a rebuild's handover offset,
is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Message

from embedstream.stream.batch import MicroBatch
from embedstream.stream.chunking import Chunker
from embedstream.stream.dead_letters import DeadLetters
from embedstream.stream.events import Skipped
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.metrics import Metrics
from embedstream.stream.route_sides import RouteSides
from embedstream.stream.topic_ids import TopicIds, position_of

__all__ = ["Reading"]

log = logging.getLogger("embedstream.consumer")


class Reading:
    """Mixed into :class:`~embedstream.stream.consumer.StreamConsumer`, which owns the
    state below."""

    assigned: set[tuple[str, int]]
    _batch: MicroBatch
    _chunker: Chunker
    _clock: Callable[[], float]
    _dead_letters: DeadLetters
    _metrics: Metrics
    _routes: RouteSides
    _topic_ids: TopicIds | None

    def _take(self, message: Message) -> None:
        kafka_error = message.error()
        if kafka_error is not None:
            if kafka_error.code() == KafkaError._PARTITION_EOF:
                return
            if kafka_error.fatal():
                raise KafkaException(kafka_error)
            log.warning("kafka error: %s", kafka_error)
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        if (topic, partition) not in self.assigned:
            return  # fetched before a revoke that ran since: its new owner reads it
        route = self._routes.of(topic)
        if route and route.follower and route.follower.ignores((topic, partition), offset):
            return  # read before the partition moved to a rebuild's handover offset
        position = position_of(message, self._topic_ids)
        if route is None:
            self._batch.track(position, self._clock())
            self._routes.unrouted.skipped(Skipped("unrouted", position))
            return
        taken = take_in(message.key(), message.value(), position, route.settings.source,
                        self._chunker, reader=route.reader)
        # Tracked only once read: a registry outage above leaves the offset uncovered.
        self._batch.track(position, self._clock())
        skips = route.skips
        assert skips is not None
        if isinstance(taken, Skipped):
            skips.skipped(taken)
            return
        skips.taken(None if isinstance(taken, Rejected) else taken)
        if isinstance(taken, Rejected):
            self._dead_letter(message, taken.reason, taken.detail, taken.kind, route.name)
        else:
            self._batch.add(taken, message)

    def _dead_letter(self, message: Message, reason: str, detail: str, kind: str,
                     route: str) -> None:
        log.warning(
            "dead-lettering %s[%d]@%d: %s: %s",
            message.topic(), message.partition(), message.offset(), reason, detail[:200],
        )
        cut = self._dead_letters.send(message, reason, detail)  # True: cut to fit the topic
        self._metrics.dlq_records.labels(reason=reason, route=route).inc()
        if cut:
            self._metrics.dlq_truncated.inc()
        self._metrics.events.labels(op=kind, outcome="dead_lettered", route=route).inc()
