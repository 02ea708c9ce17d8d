"""Kafka offset bookkeeping for the consumer loop: committing, and measuring lag."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping

from confluent_kafka import Consumer, KafkaException, TopicPartition

from embedstream.stream.metrics import Metrics

__all__ = ["commit_offsets", "report_lag"]

log = logging.getLogger("embedstream.consumer")


def commit_offsets(consumer: Consumer, next_offsets: Mapping[tuple[str, int], int],
                   metrics: Metrics) -> bool:
    """Commit synchronously; False (logged) if the broker refused. The writes are
    applied by then, so a failed commit only means a harmless replay."""
    offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
    if not offsets:  # librdkafka answers an empty list with _NO_OFFSET
        return True
    try:
        consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as error:
        log.warning("offset commit failed (events will be replayed): %s", error)
        return False
    metrics.commits.inc()
    metrics.last_commit.set(time.time())
    return True


def report_lag(consumer: Consumer, assigned: Collection[tuple[str, int]],
               metrics: Metrics) -> None:
    """Set the lag gauge of each assigned partition from cached watermarks (no round trip)."""
    if not assigned:
        return
    partitions = [TopicPartition(t, p) for t, p in sorted(assigned)]
    for tp in consumer.position(partitions):
        try:
            low, high = consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            continue
        if high < 0:
            continue
        position = tp.offset if tp.offset >= 0 else low
        metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
            max(0, high - max(position, 0)))
