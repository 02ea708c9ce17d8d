"""Reading the configured topics as a corpus: ``embedstream rebuild --source kafka``.

A compacted CDC topic holds the latest state of each key, so reading it from
the start rebuilds the corpus. :class:`KafkaSnapshot` captures each
partition's high watermark when it opens and reads every partition from its
start (or from resume offsets) up to that mark, decoding each message exactly
as the stream does (:func:`embedstream.stream.decode.decode_message` under the same
``source`` settings and limits).

Guaranteed:

* Every message below the captured marks yields exactly one item, in each
  partition's log order: a :class:`BulkEvent`, a :class:`BulkFailure` (the
  stream's dead-letter reasons) or a :class:`BulkSkip` (schema changes,
  heartbeats), each with its position, so a caller can resume per partition.
* Of a document's events only those that pass the stream's version guard
  (:func:`embedstream.stream.plan.fold`) against the events read before them in this run
  are yielded, so a later write of a document never carries an older version.
* ``covered`` holds, per partition, the offset the snapshot reads up to: every
  event before it is in the snapshot; the stream must apply everything from it.

Schema Registry framed values are read with one
:class:`~embedstream.stream.registry.ValueReader` per snapshot (schemas fetched once
per id). A registry outage is waited out (:func:`take_in_patiently`) for up to
``embed.give_up_after_s``, then raises
:class:`~embedstream.stream.errors.RegistryUnavailable`: the rebuild stops, resumable.

Not guaranteed: that the marks are the true log ends at open (a broker may
report a lower one); whatever the snapshot does not cover, the handover applies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from embedstream.stream.chunking import Chunker
from embedstream.stream.config import Settings
from embedstream.stream.errors import KafkaUnavailable, RegistryUnavailable
from embedstream.stream.events import ChangeEvent, Position, Skipped
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.plan import PreparedEvent, fold
from embedstream.stream.registry import ValueReader, build_reader
from embedstream.stream.store import DocState
from embedstream.stream.topic_ids import TopicIds, position_of

__all__ = [
    "BulkEvent",
    "BulkFailure",
    "BulkSkip",
    "KafkaSnapshot",
    "Partition",
    "partition_ends",
    "snapshot_consumer",
    "take_in_patiently",
    "topic_ends",
    "topic_partitions",
]

log = logging.getLogger("embedstream.bulk")

Partition = tuple[str, int]
_METADATA_TIMEOUT_S = 15.0
_POLL_S = 1.0
_REGISTRY_BACKOFF_MAX_S = 10.0


@dataclass(frozen=True, slots=True)
class BulkEvent:
    """A change event that passed the version guard, with the state it leaves."""

    event: ChangeEvent
    state: DocState


@dataclass(frozen=True, slots=True)
class BulkFailure:
    position: Position
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class BulkSkip:
    position: Position


def snapshot_consumer(settings: Settings) -> Consumer:
    config = kafka_client_config(settings, "consumer")
    # Reads by assignment: a group of its own, never committing, so the live
    # consumer group's offsets are untouched.
    config.update({"group.id": f"{settings.kafka.group_id}.rebuild",
                   "enable.auto.commit": False, "enable.partition.eof": True,
                   "auto.offset.reset": "earliest"})
    return Consumer(config)


def snapshot_topic_ids(settings: Settings) -> TopicIds:
    """The ids of the source topics, recorded with each state as the stream does."""
    topic_ids = TopicIds(AdminClient(kafka_client_config(settings, "admin")))
    topic_ids.refresh(settings.kafka.topics)
    return topic_ids


def topic_partitions(consumer: Consumer, topics: tuple[str, ...]) -> list[Partition]:
    try:
        metadata = consumer.list_topics(timeout=_METADATA_TIMEOUT_S)
    except KafkaException as error:
        raise KafkaUnavailable(f"cannot list topics: {error}") from None
    found: list[Partition] = []
    for topic in topics:
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise KafkaUnavailable(f"topic {topic!r} does not exist or has no partitions")
        found += [(topic, p) for p in sorted(described.partitions)]
    return found


def topic_ends(settings: Settings) -> dict[Partition, int]:
    """The high watermark of every partition of the configured topics, now."""
    consumer = snapshot_consumer(settings)
    try:
        return partition_ends(consumer, topic_partitions(consumer, settings.kafka.topics))
    finally:
        consumer.close()


def partition_ends(consumer: Consumer, partitions: list[Partition]) -> dict[Partition, int]:
    ends: dict[Partition, int] = {}
    for topic, partition in partitions:
        try:
            _, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=_METADATA_TIMEOUT_S, cached=False)
        except KafkaException as error:
            raise KafkaUnavailable(f"cannot read the end of {topic}[{partition}]: {error}") \
                from None
        ends[(topic, partition)] = max(0, int(high))
    return ends


class KafkaSnapshot:
    """The configured topics up to the marks captured at :meth:`open`."""

    def __init__(self, settings: Settings, start: Mapping[Partition, int] | None = None,
                 covered: Mapping[Partition, int] | None = None) -> None:
        """``start``: resume offsets per partition (default: each partition's
        beginning). ``covered``: the marks of an earlier, interrupted run of the
        same rebuild, kept so a resumed run covers exactly what it first set out to."""
        self._settings = settings
        self._start = dict(start or {})
        self.covered: dict[Partition, int] = dict(covered or {})
        self._consumer: Consumer | None = None
        self._topic_ids: TopicIds | None = None
        self._reader: ValueReader | None = None

    def open(self) -> None:
        consumer = snapshot_consumer(self._settings)
        try:
            partitions = topic_partitions(consumer, self._settings.kafka.topics)
            self._topic_ids = snapshot_topic_ids(self._settings)
            self._reader = build_reader(self._settings)
            if not self.covered:
                self.covered = partition_ends(consumer, partitions)
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer
        log.info("kafka snapshot up to %s", {f"{t}[{p}]": o for (t, p), o in
                                             sorted(self.covered.items())})

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def items(self) -> Iterator[BulkEvent | BulkFailure | BulkSkip]:
        """Every message below the marks, decoded (see the module docstring)."""
        consumer = self._consumer
        assert consumer is not None, "open() first"
        pending = {tp for tp, end in self.covered.items() if self._start.get(tp, 0) < end}
        if not pending:
            return
        consumer.assign([TopicPartition(t, p, self._start.get((t, p), OFFSET_BEGINNING))
                         for t, p in sorted(pending)])
        seen: dict[str, DocState] = {}
        while pending:
            for message in consumer.consume(1000, timeout=_POLL_S):
                topic, partition = message.topic(), message.partition()
                assert topic is not None and partition is not None
                tp = (topic, partition)
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        self._done(consumer, tp, pending)
                        continue
                    if error.fatal():
                        raise KafkaException(error)
                    log.warning("kafka error during the snapshot: %s", error)
                    continue
                if tp not in pending:
                    continue  # fetched before the partition was paused
                offset = int(message.offset() or 0)
                end = self.covered[tp]
                if offset >= end:
                    self._done(consumer, tp, pending)
                    continue
                yield self._decode(message, position_of(message, self._topic_ids), seen)
                if offset + 1 >= end:
                    self._done(consumer, tp, pending)

    @staticmethod
    def _done(consumer: Consumer, tp: Partition, pending: set[Partition]) -> None:
        if tp in pending:
            pending.discard(tp)
            consumer.pause([TopicPartition(*tp)])

    def _decode(self, message: Message, position: Position,
                seen: dict[str, DocState]) -> BulkEvent | BulkFailure | BulkSkip:
        taken = take_in_patiently(message, position, self._settings, None, self._reader)
        if isinstance(taken, Rejected):
            return BulkFailure(position, taken.reason, taken.detail)
        if isinstance(taken, Skipped):
            return BulkSkip(position)
        folded = fold(seen.get(taken.event.doc_id), [taken])
        if folded.state is None:
            return BulkSkip(position)  # older than an event already read: stale
        seen[taken.event.doc_id] = folded.state
        return BulkEvent(taken.event, folded.state)


def take_in_patiently(message: Message, position: Position, settings: Settings,
                      chunker: Chunker | None, reader: ValueReader | None
                      ) -> PreparedEvent | Skipped | Rejected:
    """:func:`~embedstream.stream.intake.take_in`, waiting out a Schema Registry outage
    (backing off from its ``retry_after`` doubling up to 10 s) for up to
    ``embed.give_up_after_s``; then :class:`RegistryUnavailable` saying what to do."""
    patience = settings.embed.give_up_after_s
    deadline: float | None = None
    wait = 0.0
    while True:
        try:
            return take_in(message.key(), message.value(), position, settings.source, chunker,
                           reader=reader)
        except RegistryUnavailable as error:
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + patience
            if now >= deadline:
                raise RegistryUnavailable(
                    f"{error} (for {patience:g} s, embed.give_up_after_s, at "
                    f"{position.topic}[{position.partition}]@{position.offset}); run the "
                    "same rebuild again once it answers: it resumes where it stopped",
                    error.retry_after) from None
            wait = min(max(wait * 2, error.retry_after), _REGISTRY_BACKOFF_MAX_S)
            log.warning("Schema Registry unavailable, retrying in %.1f s: %s", wait, error)
            time.sleep(min(wait, deadline - now))
