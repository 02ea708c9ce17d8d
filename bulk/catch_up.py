"""The handover's catch-up: apply to a rebuilt collection what arrived during the rebuild.

A rebuild covers each partition up to an offset (``covered``). Before the
alias moves to the new collection, :func:`catch_up` reads every partition from
that offset to its current end and applies the events with the stream's own
rules (decode, chunk, version guard, reuse of stored vectors, whole-document
writes), then does so once more up to the end it finds then, so only what
arrives in the last moments is left. It returns the offset it reached per
partition; the rebuild stores those in the new collection as its handover
record, and the live consumer, once it follows the alias, moves each of its
partitions to exactly that offset. Every event is therefore applied to the new
collection once: by the bulk pass (below ``covered``), the catch-up (from
``covered`` to the handover offset), or the live stream (from there on).

Not done here: dead-lettering. A message the catch-up cannot decode goes to
``on_failure`` (the rebuild's failure list) and the catch-up moves on; the live
consumer may have dead-lettered it too before the swap, but it moves past the
catch-up's range, so the failure list is the record to keep. So is a document
with a text that cannot be embedded even alone (out of memory, refused by a
remote provider), which is not written, as the stream would dead-letter it.

Schema Registry framed values are read as the snapshot reads them
(:func:`~embedstream.bulk.kafka_source.take_in_patiently`: an outage is waited out
for up to ``embed.give_up_after_s``, then stops the rebuild, resumable).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from embedstream.bulk.kafka_source import (
    Partition,
    partition_ends,
    snapshot_consumer,
    snapshot_topic_ids,
    take_in_patiently,
    topic_partitions,
)
from embedstream.stream.apply import apply_batch
from embedstream.stream.chunking import Chunker
from embedstream.stream.config import Settings
from embedstream.stream.embedding import Embedder
from embedstream.stream.events import Position, Skipped
from embedstream.stream.intake import Rejected
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.registry import ValueReader, build_reader
from embedstream.stream.store import Sink
from embedstream.stream.topic_ids import TopicIds, position_of
from embedstream.stream.vectors import ChunkVectors, Failure

__all__ = ["CatchUpReport", "catch_up"]

log = logging.getLogger("embedstream.bulk")

# Told the position of a message or document left out, with a reason code and detail.
OnFailure = Callable[[Position, str, str], None]

_BATCH_MESSAGES = 500
_POLL_S = 0.5


@dataclass(slots=True)
class CatchUpReport:
    reached: dict[Partition, int] = field(default_factory=dict)
    messages: int = 0
    applied: int = 0  # documents written
    failed: int = 0  # messages and documents given to on_failure
    rounds: int = 0


def catch_up(settings: Settings, sink: Sink, chunker: Chunker, embedder: Embedder,
             covered: Mapping[Partition, int], *, rounds: int = 2,
             on_failure: OnFailure | None = None,
             reader: ValueReader | None = None) -> CatchUpReport:
    """Apply every event from ``covered`` to the partitions' current ends to
    ``sink``, ``rounds`` times over (each round chases the end found when it
    starts); returns the offsets reached (see the module docstring). ``reader``
    reads framed values (default: one built from ``settings``)."""
    if not covered:
        return CatchUpReport()
    reader = reader if reader is not None else build_reader(settings)
    consumer = snapshot_consumer(settings)
    # Counted nowhere that is read: the live consumer's metrics are its own.
    metrics = Metrics()
    vectors = ChunkVectors(embedder, metrics)
    try:
        # A partition added since the rebuild started is in none of it: from its start.
        start = {tp: covered.get(tp, 0) for tp in topic_partitions(consumer, settings.kafka.topics)}
        start.update(covered)
        covered = start
        report = CatchUpReport(reached=dict(covered))
        topic_ids = snapshot_topic_ids(settings)

        def unembedded(winner: PreparedEvent, failure: Failure) -> None:
            # Not written, as the stream would dead-letter it: reported like a row that fails.
            _report(report, on_failure, winner.event.position, failure)

        consumer.assign([TopicPartition(t, p, o) for (t, p), o in sorted(covered.items())])
        for _ in range(rounds):
            ends = partition_ends(consumer, sorted(covered))
            behind = {tp for tp, end in ends.items() if report.reached[tp] < end}
            report.rounds += 1
            if not behind:
                break
            while behind:
                batch: list[PreparedEvent] = []
                for message in consumer.consume(_BATCH_MESSAGES, timeout=_POLL_S):
                    prepared = _prepare(settings, chunker, message, report, ends, behind,
                                        on_failure, topic_ids, reader)
                    if prepared is not None:
                        batch.append(prepared)
                if batch:
                    report.applied += len(apply_batch(batch, sink, vectors, metrics, unembedded))
    finally:
        consumer.close()
    log.info("catch-up wrote %d documents from %d messages (%d failed) up to %s",
             report.applied, report.messages, report.failed,
             {f"{t}[{p}]": o for (t, p), o in sorted(report.reached.items())})
    return report


def _prepare(settings: Settings, chunker: Chunker, message: Message, report: CatchUpReport,
             ends: Mapping[Partition, int], behind: set[Partition],
             on_failure: OnFailure | None, topic_ids: TopicIds,
             reader: ValueReader) -> PreparedEvent | None:
    error = message.error()
    if error is not None and error.code() != KafkaError._PARTITION_EOF:
        if error.fatal():
            raise KafkaException(error)
        log.warning("kafka error during the catch-up: %s", error)
        return None
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None  # a record or its partition's end
    tp = (topic, partition)
    if error is not None:
        behind.discard(tp)
        return None
    assert offset is not None
    # Past this round's end is fine: it is applied and counted like the rest.
    report.reached[tp] = offset + 1
    report.messages += 1
    if offset + 1 >= ends.get(tp, 0):
        behind.discard(tp)
    position = position_of(message, topic_ids)
    taken = take_in_patiently(message, position, settings, chunker, reader)
    if isinstance(taken, Rejected):  # reported, like a bulk row that fails
        _report(report, on_failure, position, (taken.reason, taken.detail))
        return None
    return None if isinstance(taken, Skipped) else taken


def _report(report: CatchUpReport, on_failure: OnFailure | None, position: Position,
            failure: Failure) -> None:
    report.failed += 1
    if on_failure is not None:
        on_failure(position, *failure)
