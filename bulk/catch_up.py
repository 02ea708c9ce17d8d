"""The handover's catch-up: apply to a rebuilt collection what arrived during the rebuild.

A rebuild covers each partition up to an offset (``covered``). Before the
alias moves to the new collection, :func:`catch_up` reads every partition from
that offset to where it ends now and applies the events with the stream's own
rules (decode, chunk, version guard, reuse of stored vectors, whole-document
writes), then does so once more up to the end it finds then, so only what
arrives in the last moments is left. It returns the offset it reached per
partition; the rebuild stores those in the new collection as its handover
record, and the live consumer, once it follows the alias, moves each of its
partitions to exactly that offset. Every event is therefore applied to the new
collection once: by the bulk pass (below ``covered``), the catch-up (from
``covered`` to the handover offset), or the live stream (from there on).

Where a partition ends is what the broker serves (:func:`handover_ends`, read
to the end of each partition, never a ListOffsets answer alone), and never below
the offset the live consumer group has committed there: each round first reads
the group's committed offsets, then the ends, and reads up to them, so a handover
offset is at least what the group had committed when the last round began. (The
group goes on meanwhile: what it applies to the old collection after that round
is above the handover offset, and it applies it again to the new collection once
it follows the alias.) A committed offset beyond what the broker serves (a topic
deleted and recreated under the same name, or a broker reporting short ends) is
refused with :class:`HandoverRefused`, before the rebuild embeds anything and
again before each round: a handover below it would replay events the live group
has already applied, which for a file rebuild puts older texts back over the
file's (a file row loses to every stream event), and an offset above the end
cannot be read.

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from embedstream.bulk.kafka_source import (
    Partition,
    group_committed,
    snapshot_consumer,
    snapshot_topic_ids,
    take_in_patiently,
    topic_ends,
    topic_partitions,
)
from embedstream.stream.apply import apply_batch
from embedstream.stream.chunking import Chunker
from embedstream.stream.config import Settings
from embedstream.stream.embedding import Embedder
from embedstream.stream.errors import EmbedstreamError, KafkaUnavailable
from embedstream.stream.events import Position, Skipped
from embedstream.stream.intake import Rejected
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.registry import ValueReader, build_reader
from embedstream.stream.sparse import SparseEncoder
from embedstream.stream.store import Sink
from embedstream.stream.topic_ids import TopicIds, position_of
from embedstream.stream.vectors import ChunkVectors, Failure

__all__ = ["CatchUpReport", "HandoverRefused", "catch_up", "handover_ends"]

log = logging.getLogger("embedstream.bulk")

# Told the position of a message or document left out, with a reason code and detail.
OnFailure = Callable[[Position, str, str], None]

_BATCH_MESSAGES = 500
_POLL_S = 0.5
# A partition behind its end that serves nothing for this long: the broker is not
# serving what it said it holds (the catch-up would otherwise wait forever).
_STALL_S = 60.0


class HandoverRefused(EmbedstreamError):
    """The live consumer group has committed an offset beyond where the broker
    serves the partition to: no handover offset would be right (see the module
    docstring). The message names the group, the partitions and what to do."""


@dataclass(slots=True)
class CatchUpReport:
    reached: dict[Partition, int] = field(default_factory=dict)
    messages: int = 0
    applied: int = 0  # documents written
    failed: int = 0  # messages and documents given to on_failure
    rounds: int = 0
    # The live group's committed offsets read before the last round: ``reached`` is
    # at least these.
    committed: dict[Partition, int] = field(default_factory=dict)


def handover_ends(settings: Settings, partitions: Sequence[Partition] | None = None,
                  committed: dict[Partition, int] | None = None) -> dict[Partition, int]:
    """Where the partitions of the configured topics (or ``partitions``) end now, as
    the broker serves them, checked against the live group (``kafka.group_id``):
    raises :class:`HandoverRefused` where the group has committed beyond an end.
    The committed offsets are read first (the group commits only what it has read,
    so in order they never exceed the ends read after them); when given,
    ``committed`` is filled with them. A group whose offsets cannot be read (no
    authorisation to describe it) is logged and not checked."""
    if partitions is None:
        consumer = snapshot_consumer(settings)
        try:
            partitions = topic_partitions(consumer, settings.kafka.topics)
        finally:
            consumer.close()
    group = settings.kafka.group_id
    try:
        found = group_committed(settings, list(partitions))
    except KafkaUnavailable as error:
        log.warning("cannot read the committed offsets of group %s (%s): the handover "
                    "offsets are not checked against them", group, error)
        found = {}
    if committed is not None:
        committed.update(found)
    ends = topic_ends(settings, list(partitions))
    beyond = {tp: (o, ends[tp]) for tp, o in sorted(found.items()) if o > ends.get(tp, o)}
    if beyond:
        where = ", ".join(f"{t}[{p}]: committed {o}, served up to {e}"
                          for (t, p), (o, e) in beyond.items())
        raise HandoverRefused(
            f"refusing the handover: consumer group {group!r} has committed offsets beyond "
            f"what the broker serves ({where}). A handover below them would replay events "
            "the group has already applied (after a file rebuild: older texts over the "
            "file's), and one above cannot be read. Was the topic deleted and recreated? "
            "Reset the group's offsets (kafka-consumer-groups --reset-offsets), or rebuild "
            "with --no-handover and start the consumer afresh")
    return ends


def catch_up(settings: Settings, sink: Sink, chunker: Chunker, embedder: Embedder,
             covered: Mapping[Partition, int], *, rounds: int = 2,
             on_failure: OnFailure | None = None,
             reader: ValueReader | None = None,
             sparse: SparseEncoder | None = None) -> CatchUpReport:
    """Apply every event from ``covered`` to the partitions' current ends to
    ``sink``, ``rounds`` times over (each round chases the end found when it
    starts); returns the offsets reached (see the module docstring). ``reader``
    reads framed values (default: one built from ``settings``); ``sparse``: the
    document sparse encoder of a collection with sparse vectors. Raises
    :class:`HandoverRefused` (see :func:`handover_ends`)."""
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
            report.committed = {}
            ends = handover_ends(settings, sorted(covered), report.committed)
            behind = {tp for tp, end in ends.items() if report.reached[tp] < end}
            report.rounds += 1
            if not behind:
                break
            moved_at = time.monotonic()
            while behind:
                batch: list[PreparedEvent] = []
                messages = consumer.consume(_BATCH_MESSAGES, timeout=_POLL_S)
                for message in messages:
                    prepared = _prepare(settings, chunker, message, report, ends, behind,
                                        on_failure, topic_ids, reader)
                    if prepared is not None:
                        batch.append(prepared)
                if batch:
                    report.applied += len(apply_batch(batch, sink, vectors, metrics, unembedded,
                                                          sparse=sparse))
                if messages:
                    moved_at = time.monotonic()
                elif behind and time.monotonic() - moved_at > _STALL_S:
                    raise KafkaUnavailable(
                        "the catch-up read nothing for {:g} s while {} were behind their "
                        "ends; run the same rebuild again: it resumes at the catch-up".format(
                            _STALL_S, ", ".join(f"{t}[{p}] at {report.reached[(t, p)]} < "
                                                f"{ends[(t, p)]}" for t, p in sorted(behind))))
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
    assert topic is not None and partition is not None and offset is not None
    tp = (topic, partition)
    if error is not None:
        # The broker had nothing more to serve at this offset: everything below it
        # was read (records first, then this), so it is reached even when the last
        # offsets held no record (transaction markers, compacted records).
        report.reached[tp] = max(report.reached[tp], offset)
        behind.discard(tp)
        return None
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
