"""Backpressure: what the consumer does while the store (or a remote embedder) is unavailable.

It pauses every assigned partition (so nothing more is fetched), keeps polling
(so the group keeps it: ``max.poll.interval.ms`` is never breached), reports
not ready, and retries after an exponential backoff that honours the store's
``retry_after``. It never sleeps in the loop: the poll timeout is the wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from embedstream.stream.errors import (
    EmbedderUnavailable,
    RegistryUnavailable,
    SinkUnavailable,
    Unavailable,
)
from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics

__all__ = ["Backpressure"]

log = logging.getLogger("embedstream.consumer")

_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
# After a read-side outage, resumed reads with no failure for this long end it even
# when no message came to read (e.g. the partition that failed was revoked meanwhile).
_READ_CONFIRM_S = 10.0


class Backpressure:
    def __init__(self, consumer: Consumer, metrics: Metrics, health: Health,
                 clock: Callable[[], float]) -> None:
        self._consumer = consumer
        self._metrics = metrics
        self._health = health
        self._clock = clock
        self.retry_at: float | None = None
        self.backoff_s = 0.0
        self._paused: list[TopicPartition] = []
        # A read-side outage (the Schema Registry): over only once a read succeeds, so
        # neither readiness nor the backoff is reset by resuming to try again.
        self._reading: float | None = None  # when reading was resumed to try again
        self._reading_outage = False
        self._rewound: dict[tuple[str, int], int] = {}  # where the failed reads start

    @property
    def waiting(self) -> bool:
        """Backing off: apply nothing until :meth:`due`."""
        return self.retry_at is not None

    def due(self, now: float) -> bool:
        return self.retry_at is not None and now >= self.retry_at

    def back_off(self, error: Unavailable) -> None:
        self.backoff_s = min(_MAX_BACKOFF_S,
                             max(error.retry_after, self.backoff_s * 2 or _FIRST_BACKOFF_S))
        self.retry_at = self._clock() + self.backoff_s
        self._reading_outage = isinstance(error, RegistryUnavailable)
        what = ("store" if isinstance(error, SinkUnavailable)
                else "embedding API" if isinstance(error, EmbedderUnavailable)
                else "schema registry" if isinstance(error, RegistryUnavailable) else "service")
        log.warning("%s unavailable, retrying in %.1fs: %s", what, self.backoff_s, error)
        self._health.set_ready(f"{what} unavailable: {error}")
        # Every retry: partitions assigned since the last one must wait too.
        self._paused = self._consumer.assignment()
        self._consumer.pause(self._paused)
        self._metrics.paused_partitions.set(len(self._paused))

    def resume(self) -> None:
        """The store answered (or, after a read-side outage, time to read again): fetch again."""
        if self.retry_at is not None and self._reading_outage:
            self._reading = self._clock()
        elif self.retry_at is not None:
            log.info("available again; resuming")
            self._health.set_ready(None)
            self.backoff_s = 0.0
        self.retry_at = None
        if self._paused:
            # Everything assigned now: partitions revoked and given back during
            # the backoff keep the pause librdkafka holds for them.
            self._consumer.resume(list({(tp.topic, tp.partition): tp for tp in
                                        [*self._paused, *self._consumer.assignment()]}.values()))
            self._paused = []
            self._metrics.paused_partitions.set(0)

    def took(self, topic: str, partition: int, offset: int) -> None:
        """A message was taken in: a read-side outage being retried is over once one
        that had failed (at or past a partition's rewind offset) is read. Another
        partition's message (another route's, or a cached schema's) proves nothing."""
        start = self._rewound.get((topic, partition))
        if self._reading is not None and start is not None and offset >= start:
            self._end_reading_outage()

    def quiet(self, now: float) -> None:
        """A poll ended with no read-side failure: after a while of those (no failed
        message may come back: its partition was revoked), the outage is over too."""
        if self._reading is not None and now - self._reading > _READ_CONFIRM_S:
            self._end_reading_outage()

    def _end_reading_outage(self) -> None:
        log.info("schema registry available again")
        self._reading, self._reading_outage, self.backoff_s = None, False, 0.0
        self._rewound = {}
        self._health.set_ready(None)

    def clear_pause(self, partitions: list[TopicPartition]) -> None:
        try:
            self._consumer.resume(partitions)
        except KafkaException as error:
            log.debug("resume of newly assigned partitions: %s", error)
        if self.waiting:
            self._paused += partitions

    def rewind(self, unread: Sequence[Message], assigned: Collection[tuple[str, int]]) -> None:
        """Seek each assigned partition back to its first message in ``unread`` (messages
        read but not taken in, to be read again once the outage is over)."""
        first: dict[tuple[str, int], int] = {}
        for message in unread:
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if message.error() is None and topic is not None and partition is not None \
                    and offset is not None and (topic, partition) in assigned:
                first.setdefault((topic, partition), offset)
        self._rewound = first
        for (topic, partition), offset in first.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as error:  # not fetching it yet: the committed offset holds
                log.info("cannot seek %s[%d] back to %d: %s", topic, partition, offset, error)

    def forget(self, partitions: Collection[tuple[str, int]]) -> None:
        """Partitions no longer ours are not resumed."""
        self._paused = [tp for tp in self._paused if (tp.topic, tp.partition) not in partitions]
