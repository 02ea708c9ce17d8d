"""The consumer's rebalance callbacks (librdkafka calls them from inside ``poll``).

Guaranteed: on a revoke, what was applied is made durable and committed while the
partitions are still ours (when the store answers); otherwise, and on a loss, their
unapplied events and uncommitted offsets are dropped, for their next owner to replay.
"""

from __future__ import annotations

import logging

from confluent_kafka import Consumer, TopicPartition

from embedstream.stream.backpressure import Backpressure
from embedstream.stream.batch import MicroBatch
from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics
from embedstream.stream.route_sides import RouteSides
from embedstream.stream.topic_ids import TopicIds

__all__ = ["Rebalancing"]

log = logging.getLogger("embedstream.consumer")


class Rebalancing:
    """Mixed into :class:`~embedstream.stream.consumer.StreamConsumer`, which owns the
    state below and the two calls that write (``_flush``, ``_checkpoint``)."""

    assigned: set[tuple[str, int]]
    _health: Health
    _metrics: Metrics
    _pressure: Backpressure
    _topic_ids: TopicIds | None
    _routes: RouteSides
    _failed: bool
    _batch: MicroBatch
    _uncommitted: dict[tuple[str, int], int]

    def _flush(self) -> bool:
        raise NotImplementedError

    def _checkpoint(self) -> bool:
        raise NotImplementedError

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        self._health.set_partitions(len(self.assigned))
        self._metrics.rebalances.labels(event="assigned").inc(len(partitions))
        # A pause we set before these were revoked outlives the revocation in
        # librdkafka; clear it (a backoff in progress pauses them again).
        self._pressure.clear_pause(partitions)
        if self._topic_ids is not None:  # a topic may have been recreated since
            self._topic_ids.refresh({tp.topic for tp in partitions})
        self._routes.assigned([(tp.topic, tp.partition) for tp in partitions])
        log.info("assigned %s; now own %s",
                 sorted((tp.topic, tp.partition) for tp in partitions), sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what we have applied while we still own the partitions.
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._metrics.rebalances.labels(event="revoked").inc(len(partitions))
        log.info("revoked %s", sorted(revoked))
        if self._failed or not (self._flush() and self._checkpoint()):
            self._drop(revoked)
        else:
            self._routes.forget(revoked)
        self.assigned -= revoked
        self._health.set_partitions(len(self.assigned))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: committing would be wrong; drop and replay.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._metrics.rebalances.labels(event="lost").inc(len(partitions))
        log.warning("lost %s; their uncommitted events will be replayed", sorted(lost))
        self._drop(lost)
        self.assigned -= lost
        self._health.set_partitions(len(self.assigned))

    def _drop(self, partitions: set[tuple[str, int]]) -> None:
        """Forget unapplied events and uncommitted offsets of partitions we no
        longer own; their next owner replays them."""
        self._batch.drop_partitions(partitions)
        for key in partitions:
            self._uncommitted.pop(key, None)
        self._pressure.forget(partitions)
        self._routes.forget(partitions)
