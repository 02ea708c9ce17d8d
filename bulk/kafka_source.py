"""Reading the configured topics as a corpus: ``embedstream rebuild --source kafka``.

A compacted CDC topic holds the latest state of each key, so reading it from
the start rebuilds the corpus. :class:`KafkaSnapshot` records where each
partition ends when it opens (``covered``: from what the broker serves, see
:func:`~embedstream.stream.offsets.served_ends`, never from a ListOffsets answer
alone, which the bundled broker gets wrong for multi-record batches) and reads
every partition up to there twice, decoding each message exactly as the stream
does (:func:`embedstream.stream.intake.take_in` under the same ``source``
settings and limits):

1. **fold**: every event of the snapshot, from each partition's start, goes
   through the stream's version guard (:func:`embedstream.stream.plan.fold`);
   what is kept is each document's winning state only (its version and
   position, no text), on disk (:class:`~embedstream.bulk._winners.Winners`, a
   scratch SQLite table): the rebuild's memory does not grow with the corpus;
2. **yield**: from the start (or the resume offsets) again, each message becomes
   one item; only a document's winning event becomes a :class:`BulkEvent`, so
   nothing superseded is ever chunked or embedded.

Guaranteed:

* Every message below ``covered`` yields exactly one item, in each partition's log
  order: a :class:`BulkEvent`, a :class:`BulkSuperseded` (an event that is not its
  document's winner), a :class:`BulkFailure` (the stream's dead-letter reasons) or
  a :class:`BulkSkip` (schema changes, heartbeats), each with its position, so a
  caller can count every record read and resume per partition.
* Each document has at most one :class:`BulkEvent`: the event the stream's version
  guard would have left standing after reading the whole snapshot.
* ``covered`` is a consistent cut of each partition: every record below it is in
  the snapshot (records written meanwhile lie above it); the stream (the handover's
  catch-up, then the live consumer) applies everything from it.

Schema Registry framed values are read with one
:class:`~embedstream.stream.registry.ValueReader` per snapshot (schemas fetched once
per id). A registry outage is waited out (:func:`take_in_patiently`) for up to
``embed.give_up_after_s``, then raises
:class:`~embedstream.stream.errors.RegistryUnavailable`: the rebuild stops, resumable.

:meth:`KafkaSnapshot.close` may come from another thread than the one reading
:meth:`~KafkaSnapshot.items` (the rebuild's reader thread): it stops that reader at its
next poll and lets it close its own consumer, since closing a consumer under a running
``consume`` can crash librdkafka. A reader that does not stop within
:data:`_CLOSE_WAIT_S` (e.g. waiting out a registry outage) keeps its consumer, which it
closes when it stops; the fold's scratch file is removed either way.

Not guaranteed: the same instant for every partition's end (each is a cut of its
own partition); a resumed snapshot folds the whole range again (the winners are
not stored), so it reads the topic once more before it yields anything.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from embedstream.bulk._kafka_topics import (
    Partition,
    group_committed,
    snapshot_consumer,
    snapshot_topic_ids,
    topic_ends,
    topic_partitions,
)
from embedstream.bulk._winners import Winners
from embedstream.stream.chunking import Chunker
from embedstream.stream.config import Settings
from embedstream.stream.errors import RegistryUnavailable
from embedstream.stream.events import ChangeEvent, Position, Skipped
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.offsets import served_ends
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.registry import ValueReader, build_reader
from embedstream.stream.store import DocState
from embedstream.stream.topic_ids import TopicIds, position_of

__all__ = [
    "BulkEvent",
    "BulkFailure",
    "BulkSkip",
    "BulkSuperseded",
    "KafkaSnapshot",
    "Partition",
    "SnapshotClosed",
    "group_committed",
    "snapshot_consumer",
    "snapshot_topic_ids",
    "take_in_patiently",
    "topic_ends",
    "topic_partitions",
]

log = logging.getLogger("embedstream.bulk")

_BATCH = 2000  # messages decoded and looked up together (the fold's memory: one batch)
_POLL_S = 0.2  # consume() waits this long for a full batch: short, or small topics wait
_REGISTRY_BACKOFF_MAX_S = 10.0
_CLOSE_WAIT_S = 5.0  # how long close() waits for a reader thread to stop (see above)


class SnapshotClosed(Exception):
    """Raised in the thread reading :meth:`KafkaSnapshot.items` once the snapshot was closed."""


@dataclass(frozen=True, slots=True)
class BulkEvent:
    """A document's winning event in the snapshot, with the state it leaves."""

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


@dataclass(frozen=True, slots=True)
class BulkSuperseded:
    """A change event read and counted, not embedded: a later (or, by the version
    guard, newer) event of its document is in the snapshot."""

    position: Position


class KafkaSnapshot:
    """The configured topics up to the ends recorded at :meth:`open`."""

    def __init__(self, settings: Settings, start: Mapping[Partition, int] | None = None,
                 covered: Mapping[Partition, int] | None = None,
                 on_folded: Callable[[int], None] | None = None,
                 scratch: Path | None = None) -> None:
        """``start``: resume offsets per partition (default: each partition's
        beginning). ``covered``: the ends to read up to, recorded earlier (by the
        rebuild before it opens the snapshot, or by an interrupted run of the same
        rebuild, so a resumed run covers exactly what it first set out to).
        ``on_folded`` is told, once the fold has read everything, how many records
        :meth:`items` is about to yield. ``scratch``: the directory of the fold's
        on-disk state (:class:`~embedstream.bulk._winners.Winners`; default: the
        system's temporary directory)."""
        self._settings = settings
        self._start = dict(start or {})
        self.covered: dict[Partition, int] = dict(covered or {})
        self._on_folded = on_folded
        self._scratch = scratch
        self._consumer: Consumer | None = None
        self._topic_ids: TopicIds | None = None
        self._reader: ValueReader | None = None
        self._winners: Winners | None = None
        self._items: Generator[BulkEvent | BulkSuperseded | BulkFailure | BulkSkip] | None = None
        self._closed = threading.Event()

    def open(self) -> None:
        consumer = snapshot_consumer(self._settings)
        try:
            partitions = topic_partitions(consumer, self._settings.kafka.topics)
            self._topic_ids = snapshot_topic_ids(self._settings)
            self._reader = build_reader(self._settings)
            if not self.covered:
                self.covered = served_ends(consumer, partitions)
        finally:
            consumer.close()
        log.info("kafka snapshot up to %s", {f"{t}[{p}]": o for (t, p), o in
                                             sorted(self.covered.items())})

    def close(self) -> None:
        """Stop :meth:`items` (also while another thread is inside it), release its
        consumer and delete the fold's scratch file (module docstring)."""
        self._closed.set()
        items, self._items = self._items, None
        if items is not None and not _finish(items):
            log.warning("the kafka snapshot's reader did not stop within %.0f s; it closes "
                        "its consumer itself when it does", _CLOSE_WAIT_S)
        if self._winners is not None:
            # Also when items() was left mid-way (its finally runs only once the
            # generator is closed or collected; a reader thread still folding at exit
            # never gets there): the scratch file must not outlive the rebuild.
            self._winners.close()

    def items(self) -> Iterator[BulkEvent | BulkSuperseded | BulkFailure | BulkSkip]:
        """Every message below ``covered`` (from the resume offsets), decoded, with
        each document's winning event only (see the module docstring)."""
        assert self._topic_ids is not None, "open() first"
        self._items = self._iterate()
        return self._items

    def _iterate(self) -> Generator[BulkEvent | BulkSuperseded | BulkFailure | BulkSkip]:
        starts = {tp: self._start.get(tp, 0) for tp, end in self.covered.items()
                  if self._start.get(tp, 0) < end}
        if not starts:
            return
        winners = self._winners = Winners(self._scratch)
        try:
            count = self._fold(starts, winners)
            if self._on_folded is not None:
                self._on_folded(count)
            batch: list[tuple[Message, Position]] = []
            with contextlib.closing(self._read(
                    {tp: s or OFFSET_BEGINNING for tp, s in starts.items()})) as pairs:
                for pair in pairs:
                    batch.append(pair)
                    if len(batch) >= _BATCH:
                        yield from self._decode(batch, winners)
                        batch = []
            yield from self._decode(batch, winners)
        finally:
            winners.close()

    def _fold(self, starts: Mapping[Partition, int], winners: Winners) -> int:
        """Fold each document's winning state over the whole snapshot into ``winners``
        (every partition from its start: a key may have moved between partitions);
        returns how many of the records read lie at or after ``starts`` (what
        :meth:`items` then yields)."""
        began = time.monotonic()
        read = after_start = 0
        batch: list[PreparedEvent] = []
        everything = dict.fromkeys(self.covered, OFFSET_BEGINNING)
        with contextlib.closing(self._read(everything)) as read_all:
            for message, position in read_all:
                read += 1
                tp = (position.topic, position.partition)
                if tp in starts and position.offset >= starts[tp]:
                    after_start += 1
                taken = take_in_patiently(message, position, self._settings, None,
                                          self._reader)
                if not isinstance(taken, Rejected | Skipped):
                    batch.append(taken)
                    if len(batch) >= _BATCH:
                        winners.fold(batch)
                        batch = []
        winners.fold(batch)
        log.info("kafka snapshot folded: %d records, %d documents (%.1f s)", read,
                 len(winners), time.monotonic() - began)
        return after_start

    def _read(self, starts: Mapping[Partition, int]) -> Generator[tuple[Message, Position]]:
        """The records of each partition from ``starts`` up to ``covered``, in each
        partition's log order, through a consumer of its own (closed when done)."""
        consumer = snapshot_consumer(self._settings)
        self._consumer = consumer
        try:
            pending = set(starts)
            consumer.assign([TopicPartition(t, p, o) for (t, p), o in sorted(starts.items())])
            while pending:
                if self._closed.is_set():
                    raise SnapshotClosed("the kafka snapshot was closed while being read")
                for message in consumer.consume(1000, timeout=_POLL_S):
                    topic, partition = message.topic(), message.partition()
                    assert topic is not None and partition is not None
                    tp = (topic, partition)
                    if tp not in pending:
                        continue  # fetched before the partition was paused
                    offset, end = int(message.offset() or 0), self.covered[tp]
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            if offset < end:  # the broker served this end before
                                log.warning("%s[%d] now ends at %d, below the snapshot's end "
                                            "%d: records were deleted meanwhile", topic,
                                            partition, offset, end)
                            self._done(consumer, tp, pending)
                        elif error.fatal():
                            raise KafkaException(error)
                        else:
                            log.warning("kafka error during the snapshot: %s", error)
                        continue
                    if offset >= end:
                        self._done(consumer, tp, pending)
                        continue
                    yield message, position_of(message, self._topic_ids)
                    if offset + 1 >= end:
                        self._done(consumer, tp, pending)
        finally:
            consumer.close()
            if self._consumer is consumer:
                self._consumer = None

    @staticmethod
    def _done(consumer: Consumer, tp: Partition, pending: set[Partition]) -> None:
        if tp in pending:
            pending.discard(tp)
            consumer.pause([TopicPartition(*tp)])

    def _decode(self, batch: list[tuple[Message, Position]], winners: Winners
                ) -> Iterator[BulkEvent | BulkSuperseded | BulkFailure | BulkSkip]:
        """The batch's items in order, its documents' winners read in one query."""
        taken = [take_in_patiently(m, p, self._settings, None, self._reader) for m, p in batch]
        states = winners.get_many({t.event.doc_id for t in taken
                                   if not isinstance(t, Rejected | Skipped)})
        for (_, position), one in zip(batch, taken, strict=True):
            if isinstance(one, Rejected):
                yield BulkFailure(position, one.reason, one.detail)
            elif isinstance(one, Skipped):
                yield BulkSkip(position)
            else:
                state = states.get(one.event.doc_id)
                # The winner's state was stamped from its own event: its position names it.
                if state is None or (state.topic, state.partition, state.offset) != (
                        position.topic, position.partition, position.offset):
                    yield BulkSuperseded(position)
                else:
                    yield BulkEvent(one.event, state)


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


def _finish(items: Generator[object]) -> bool:
    """Close the generator ``items``; while another thread is running it, retry until it
    has stopped (it sees the snapshot closed at its next poll) or :data:`_CLOSE_WAIT_S`
    has passed. False: still running (its consumer and scratch table are its own)."""
    deadline = time.monotonic() + _CLOSE_WAIT_S
    while True:
        try:
            items.close()  # a suspended generator's finally runs here, in this thread
            return True
        except ValueError:  # "generator already executing": inside it on another thread
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
