"""Kafka offset bookkeeping: committing and measuring lag (the consumer loop), and
where a partition ends and what a group has committed (the rebuild's handover).

Where a partition ends is taken from what the broker serves, never from a
ListOffsets answer alone (:func:`served_ends`): some brokers (the bundled Tansu)
answer ListOffsets with the base offset of the partition's last record batch plus
one, so a partition written in multi-record batches looks shorter than it is, while
their fetch responses report the true end. Real Kafka reports the same end both ways.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Mapping, Sequence

from confluent_kafka import OFFSET_END, Consumer, KafkaError, KafkaException, TopicPartition

from embedstream.stream.errors import KafkaUnavailable
from embedstream.stream.metrics import Metrics

__all__ = ["commit_offsets", "committed_offsets", "report_lag", "served_ends"]

log = logging.getLogger("embedstream.consumer")

Partition = tuple[str, int]
_PROBE_POLL_S = 0.2


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


def served_ends(consumer: Consumer, partitions: Sequence[Partition],
                timeout_s: float = 30.0) -> dict[Partition, int]:
    """Where each partition ends, as the broker serves it: an offset that a fetch made
    after this call began reached (every record below it exists), at or past the
    end the broker listed when the call began.

    ``consumer`` is a fresh one (never assigned: a partition's end-of-partition
    event is reported once per offset, and an earlier fetch's watermark would do as
    an end) with ``enable.partition.eof``; it is left unassigned. Each partition is
    read from the end the broker lists (a first guess: exact on Kafka, a lower bound
    on Tansu) until a fetch finds nothing more (partition EOF, whose offset is the
    end), or, on a partition still being written, until the records reach the end
    that the first fetch reported: the reading stops even if writes never pause.

    Raises :class:`KafkaUnavailable` when a partition reports no end within
    ``timeout_s``. Not guaranteed: the same instant for every partition (each end is
    a consistent cut of its own partition, which is all a handover needs); under
    ``isolation.level: read_committed`` (the default) the end is the last stable
    offset: records of a transaction still open are beyond it.
    """
    if not partitions:
        return {}
    pending = set(partitions)
    ends: dict[Partition, int] = {}
    reached: dict[Partition, int] = {}
    targets: dict[Partition, int] = {}
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(t, p, OFFSET_END) for t, p in sorted(pending)])
        while pending:
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"cannot find where {_names(pending)} end: the broker served no end "
                    f"within {timeout_s:g} s")
            for message in consumer.consume(500, timeout=_PROBE_POLL_S):
                topic, partition, offset = message.topic(), message.partition(), message.offset()
                if topic is None or partition is None or offset is None:
                    continue
                tp = (topic, partition)
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    if error.fatal():
                        raise KafkaUnavailable(f"reading where {topic}[{partition}] ends: "
                                               f"{error}")
                    log.warning("kafka error while finding where %s[%d] ends: %s", topic,
                                partition, error)
                    continue
                # A record's offset + 1, or the fetch position at which the broker had
                # nothing more to serve: everything below it was served.
                reached[tp] = max(reached.get(tp, 0), offset if error is not None
                                  else offset + 1)
                if error is not None and tp in pending:
                    ends[tp] = reached[tp]
                    pending.discard(tp)
            for tp in sorted(pending):
                if tp not in targets:
                    # Set only by a fetch response (never by ListOffsets): the true end
                    # as of that fetch, on Tansu too.
                    high = consumer.get_watermark_offsets(TopicPartition(*tp), cached=True)[1]
                    if high >= 0:
                        targets[tp] = high
                if tp in targets and reached.get(tp, -1) >= targets[tp]:
                    ends[tp] = reached[tp]
                    pending.discard(tp)
    except KafkaException as error:
        raise KafkaUnavailable(f"cannot read where {_names(pending)} end: {error}") from None
    finally:
        with contextlib.suppress(KafkaException):  # the caller closes it anyway
            consumer.unassign()
    return ends


def committed_offsets(consumer: Consumer, partitions: Sequence[Partition],
                      timeout_s: float = 15.0) -> dict[Partition, int]:
    """The offsets ``consumer``'s group (its ``group.id``) has committed, for the
    partitions that have one. Asking joins nothing: the group's members and
    assignments are left as they are. Raises :class:`KafkaUnavailable`."""
    if not partitions:
        return {}
    try:
        found = consumer.committed([TopicPartition(t, p) for t, p in sorted(partitions)],
                                   timeout=timeout_s)
    except KafkaException as error:
        raise KafkaUnavailable(f"cannot read the group's committed offsets: {error}") from None
    committed: dict[Partition, int] = {}
    for tp in found:
        if tp.error is not None:
            raise KafkaUnavailable(f"cannot read the committed offset of "
                                   f"{tp.topic}[{tp.partition}]: {tp.error}")
        if tp.offset >= 0:
            committed[(tp.topic, tp.partition)] = tp.offset
    return committed


def _names(partitions: Collection[Partition]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(partitions))
