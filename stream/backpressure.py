"""Backpressure: what the consumer does while the store (or a remote embedder) is unavailable.

It pauses every assigned partition (so nothing more is fetched), keeps polling
(so the group keeps it: ``max.poll.interval.ms`` is never breached), reports
not ready, and retries after an exponential backoff that honours the store's
``retry_after``. It never sleeps in the loop: the poll timeout is the wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from confluent_kafka import Consumer, KafkaException, TopicPartition

from embedstream.stream.errors import EmbedderUnavailable, SinkUnavailable, Unavailable
from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics

__all__ = ["Backpressure"]

log = logging.getLogger("embedstream.consumer")

_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


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
        what = ("store" if isinstance(error, SinkUnavailable)
                else "embedding API" if isinstance(error, EmbedderUnavailable) else "service")
        log.warning("%s unavailable, retrying in %.1fs: %s", what, self.backoff_s, error)
        self._health.set_ready(f"{what} unavailable: {error}")
        # Every retry: partitions assigned since the last one must wait too.
        self._paused = self._consumer.assignment()
        self._consumer.pause(self._paused)
        self._metrics.paused_partitions.set(len(self._paused))

    def resume(self) -> None:
        """The store answered: fetch again."""
        if self.retry_at is not None:
            log.info("store available again; resuming")
            self._health.set_ready(None)
        self.retry_at, self.backoff_s = None, 0.0
        if self._paused:
            # Everything assigned now: partitions revoked and given back during
            # the backoff keep the pause librdkafka holds for them.
            self._consumer.resume(list({(tp.topic, tp.partition): tp for tp in
                                        [*self._paused, *self._consumer.assignment()]}.values()))
            self._paused = []
            self._metrics.paused_partitions.set(0)

    def clear_pause(self, partitions: list[TopicPartition]) -> None:
        try:
            self._consumer.resume(partitions)
        except KafkaException as error:
            log.debug("resume of newly assigned partitions: %s", error)
        if self.waiting:
            self._paused += partitions

    def forget(self, partitions: Collection[tuple[str, int]]) -> None:
        """Partitions no longer ours are not resumed."""
        self._paused = [tp for tp in self._paused if (tp.topic, tp.partition) not in partitions]
