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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from embedstream.bulk.kafka_source import (
    Partition,
    partition_ends,
    snapshot_consumer,
    topic_partitions,
)
from embedstream.stream.chunking import Chunker
from embedstream.stream.config import Settings
from embedstream.stream.embedding import Embedder
from embedstream.stream.events import Position, Skipped
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent, build_write, fold, group_by_document
from embedstream.stream.store import Sink
from embedstream.stream.vectors import ChunkVectors, failure_of

__all__ = ["CatchUpReport", "catch_up"]

log = logging.getLogger("embedstream.bulk")

_BATCH_MESSAGES = 500
_POLL_S = 0.5


@dataclass(slots=True)
class CatchUpReport:
    reached: dict[Partition, int] = field(default_factory=dict)
    messages: int = 0
    applied: int = 0
    failed: int = 0
    rounds: int = 0


def catch_up(settings: Settings, sink: Sink, chunker: Chunker, embedder: Embedder,
             covered: Mapping[Partition, int], *, rounds: int = 2,
             on_failure: Callable[[Position, str, str], None] | None = None) -> CatchUpReport:
    """Apply every event from ``covered`` to the partitions' current ends to
    ``sink``, ``rounds`` times over (each round chases the end found when it
    starts); returns the offsets reached (see the module docstring)."""
    if not covered:
        return CatchUpReport()
    consumer = snapshot_consumer(settings)
    vectors = ChunkVectors(embedder, Metrics())
    try:
        # A partition added since the rebuild started is in none of it: from its start.
        start = {tp: covered.get(tp, 0) for tp in topic_partitions(consumer, settings.kafka.topics)}
        start.update(covered)
        covered = start
        report = CatchUpReport(reached=dict(covered))
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
                                        on_failure)
                    if prepared is not None:
                        batch.append(prepared)
                if batch:
                    report.applied += _apply(sink, vectors, batch, report, on_failure)
    finally:
        consumer.close()
    log.info("catch-up applied %d events from %d messages (%d undecodable) up to %s",
             report.applied, report.messages, report.failed,
             {f"{t}[{p}]": o for (t, p), o in sorted(report.reached.items())})
    return report


def _prepare(settings: Settings, chunker: Chunker, message: object, report: CatchUpReport,
             ends: Mapping[Partition, int], behind: set[Partition],
             on_failure: Callable[[Position, str, str], None] | None) -> PreparedEvent | None:
    error = message.error()  # type: ignore[attr-defined]
    topic, partition = message.topic(), message.partition()  # type: ignore[attr-defined]
    if error is not None:
        if error.code() == KafkaError._PARTITION_EOF:
            behind.discard((topic, partition))
            return None
        if error.fatal():
            raise KafkaException(error)
        log.warning("kafka error during the catch-up: %s", error)
        return None
    tp = (topic, partition)
    offset = int(message.offset())  # type: ignore[attr-defined]
    # Past this round's end is fine: it is applied and counted like the rest.
    report.reached[tp] = offset + 1
    report.messages += 1
    if offset + 1 >= ends.get(tp, 0):
        behind.discard(tp)
    taken = take_in(message.key(), message.value(),  # type: ignore[attr-defined]
                    Position(topic, partition, offset), settings.source, chunker)
    if isinstance(taken, Rejected):  # reported, like a bulk row that fails
        report.failed += 1
        if on_failure is not None:
            on_failure(Position(topic, partition, offset), taken.reason, taken.detail)
        return None
    return None if isinstance(taken, Skipped) else taken


def _apply(sink: Sink, vectors: ChunkVectors, batch: list[PreparedEvent], report: CatchUpReport,
           on_failure: Callable[[Position, str, str], None] | None) -> int:
    """The stream's apply step for one batch; returns how many documents were written.

    A document with a chunk that cannot be embedded (out of memory alone, or refused
    by a remote provider) is reported like a row that fails, as the stream would
    dead-letter it, and not written."""
    by_doc = group_by_document(batch)
    stored = sink.document_states(list(by_doc))
    folded = [fold(stored.get(doc_id), events) for doc_id, events in by_doc.items()]
    winners = [item for item in folded if item.winner is not None]
    found, failed = vectors.for_winners(winners, stored, sink.stored_vectors)
    writes = []
    for item in winners:
        assert item.winner is not None
        failure = failure_of(item.winner.chunks, failed)
        if failure is None:
            writes.append(build_write(item, found))
            continue
        report.failed += 1
        if on_failure is not None:
            on_failure(item.winner.event.position, *failure)
    if writes:
        sink.apply(writes)
    return len(writes)
