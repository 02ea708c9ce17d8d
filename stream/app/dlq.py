"""Replay the dead-letter topics (``embedstream dlq replay``).

Reading the dead-letter topics (the :class:`~embedstream.stream.app.dlq_read.DeadLetter`
record, the bounded-range reader and ``dlq list``) lives in
:mod:`embedstream.stream.app.dlq_read`, whose names are re-exported here. Replay reads the
same way as ``dlq list`` (see there): a fixed range up to the high watermarks
captured at the start, never waiting for more records, partitions
``assign``-ed without joining a consumer group.

:func:`replay_dead_letters` takes the records of its own group
(``kafka.group_id``, from the ``embedstream.consumer.group`` header) and those
that name no group (written before the header existed, e.g. in an old
``<topic>.dlq`` read with ``kafka.dlq_legacy_topics``); another group's records,
in a ``kafka.dlq_topic`` that groups share, are left to that group's replay
and counted as ``other_groups``. It decodes each record again under the *current*
``source`` settings, with the consumer's own checks (``take_in``: the
``source.max_message_bytes`` / ``source.max_document_chars`` limits, and Schema
Registry framed values read with the current ``kafka.schema_registry``). A record
that passes is produced back to its source topic and partition (from its
headers) with its original key, value and non-``embedstream.*`` headers, plus
``embedstream.replayed.from: <dlq topic>/<partition>/<offset>``; the consumer
then applies it like any other event. A record that still fails stays where it
is and is counted under its current reason.

Progress lives in the consumer group ``<kafka.group_id>.dlq-replay``: after
each batch, once the producer (``acks=all``) has acknowledged every record
resubmitted from it, the group commits, per dead-letter partition, the offset
just past the last resubmitted record. A replay starts from those offsets
(else from the earliest retained). Hence:

* A record is resubmitted at most once across replays that finish their
  commit. If a replay dies between the acknowledgement and the commit, the next
  one resubmits that batch again: at least once, not exactly once. The version
  guard makes a second copy of an event a no-op, except with offset versions
  (below).
* Still-failing records *after* the last resubmitted one of their partition
  stay ahead of the committed offset: the next replay (after another fix)
  looks at them again. Still-failing records *before* a resubmitted one are
  passed over for good by replay (counted as ``passed_over``); ``dlq list``
  still shows them, and the messages themselves remain in the source topic at
  the offset their headers name (while retention keeps them).

Not guaranteed:

* Ordering against newer events. A replayed event is decoded again at its new
  offset. Its version is kept when it carries one (an LSN, a ``ts_ms``, a native
  ``version``), so it loses to anything newer. With ``source.version: offset``
  (or a native event without ``version``, or a Debezium event without
  ``source.lsn``/``ts_ms`` in ``auto`` mode) its version *is* the new offset,
  so it overwrites any later change of its document applied before it.
* That a resubmitted record is then applied: the consumer may still reject it
  for a reason decoding cannot see (``chunk_failed``, an embedding that runs
  out of memory); it then goes back to the dead-letter topic at a new offset,
  and a later replay would resubmit it again.
* Mutual exclusion: two replays run at once may both resubmit a record.

A record cut to fit the dead-letter topic (its value, key or headers: the
``embedstream.dlq.*`` notes of :mod:`embedstream.stream.dead_letters`) is never
resubmitted (reason ``truncated_in_dlq``): it is no longer the message, and one
whose value was dropped would read as a delete. Nor is one without readable
source headers (``no_source``) or from a topic no longer configured
(``source_not_configured``). The whole message stays in its source topic.

Whatever Kafka fails or refuses (metadata, offsets, reading, a delivery, the
commit) raises :class:`~embedstream.stream.errors.KafkaUnavailable` saying what failed; a
Schema Registry that cannot be reached raises
:class:`~embedstream.stream.errors.RegistryUnavailable` (nothing of the batch is
committed, so the next replay looks at it again); the command line prints either
and exits 2. Clients are created per call, never at import.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from embedstream.stream.app.dlq_read import (
    DeadLetter,
    Header,
    _batches,
    _broker,
    _consumer,
    _counts,
    _plan,
    _timeout,
    dlq_topics,
    list_dead_letters,
    read_dead_letters,
)
from embedstream.stream.config import Settings
from embedstream.stream.errors import KafkaUnavailable, RegistryUnavailable
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.registry import ValueReader, build_reader

# Replay's names, and those of embedstream.stream.app.dlq_read re-exported (DeadLetter, dlq_topics,
# list_dead_letters, read_dead_letters): the module's public names are unchanged.
__all__ = [
    "REPLAYED_FROM_HEADER",
    "DeadLetter",
    "ReplayReport",
    "dlq_topics",
    "list_dead_letters",
    "read_dead_letters",
    "replay_dead_letters",
    "replay_group",
]

log = logging.getLogger("embedstream.dlq")

REPLAYED_FROM_HEADER = "embedstream.replayed.from"


def replay_group(settings: Settings) -> str:
    """The consumer group in which ``dlq replay`` keeps its progress."""
    return f"{settings.kafka.group_id}.dlq-replay"


@dataclass
class ReplayReport:
    """What a replay did (or, with ``dry_run``, would do)."""

    dry_run: bool
    resubmitted: int = 0
    # Records examined that still fail, by their reason under the current settings.
    still_failing: Counter[str] = field(default_factory=Counter)
    # Coordinates of still-failing records the committed offset has now passed.
    passed_over: list[str] = field(default_factory=list)
    # Next offset per dead-letter partition committed in the replay group.
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    # Records another consumer group dead-lettered (left to that group's replay).
    other_groups: int = 0

    def summary(self) -> str:
        failing = sum(self.still_failing.values())
        head = (f"dry run: would resubmit {self.resubmitted}" if self.dry_run
                else f"resubmitted {self.resubmitted}")
        text = f"{head}, still failing {failing}"
        if failing:
            text += f" ({_counts(self.still_failing)})"
        if self.passed_over:
            text += (f", {len(self.passed_over)} of them "
                     f"{'would be ' if self.dry_run else ''}passed over")
        if self.other_groups:
            text += f", {self.other_groups} of other groups left alone"
        return text


def _why_not(letter: DeadLetter, settings: Settings, reader: ValueReader) -> str | None:
    """None if the consumer would now take ``letter``, else the reason it would not.
    Raises :class:`RegistryUnavailable` when the registry cannot tell."""
    source = letter.source
    if source is None:
        return "no_source"
    if source.topic not in settings.kafka.topics:
        return "source_not_configured"
    if letter.truncated:
        return "truncated_in_dlq"
    try:
        taken = take_in(letter.key, letter.value, source, settings.source, None, reader=reader)
    except RegistryUnavailable as error:
        raise RegistryUnavailable(
            f"dlq: cannot decide on {letter.coordinates}: {error}; nothing of this batch "
            "is committed, so the next replay looks at it again", error.retry_after) from None
    return taken.reason if isinstance(taken, Rejected) else None


class _Resubmitter:
    """An ``acks=all`` producer whose :meth:`flush` raises unless every record
    produced since the last flush was acknowledged."""

    def __init__(self, settings: Settings, timeout_s: float) -> None:

        self._settings = settings
        self._timeout_s = timeout_s
        # acks=all whatever kafka.options say: the commit that follows relies on it.
        self._producer = Producer({**kafka_client_config(settings, "producer"), "acks": "all"})
        self._failures: list[KafkaError] = []

    def send(self, letter: DeadLetter) -> None:
        assert letter.source is not None
        headers: list[Header] = [*letter.headers, (REPLAYED_FROM_HEADER,
                                                   letter.coordinates.encode())]
        source = letter.source
        while True:
            try:
                with _broker(self._settings, f"resubmitting {letter.coordinates} to "
                             f"{source.topic}[{source.partition}]"):
                    self._producer.produce(
                        source.topic, key=letter.key, value=letter.value,
                        partition=source.partition, headers=headers, on_delivery=self._delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain
                self._producer.poll(1.0)
        self._producer.poll(0)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(error)

    def flush(self) -> None:
        remaining = self._producer.flush(self._timeout_s * 3)
        failures, self._failures = self._failures, []
        if remaining or failures:
            cause = failures[0] if failures else f"{remaining} records unacknowledged"
            raise KafkaUnavailable(
                f"dlq: resubmitting failed (Kafka at "
                f"{self._settings.kafka.bootstrap_servers}): {cause}; nothing committed for "
                "this batch, so the next replay submits it again")

    def discard(self) -> None:
        """Drop what is not yet sent (after a failure: nothing of it will be committed)."""
        self._producer.purge()
        self._producer.flush(1.0)


def replay_dead_letters(settings: Settings, *, dry_run: bool = False,
                        timeout_s: float | None = None) -> ReplayReport:
    """Resubmit the dead-letter records the current settings can decode (see the
    module doc for what is and is not guaranteed); ``dry_run`` changes nothing."""
    timeout = _timeout(timeout_s)
    report = ReplayReport(dry_run=dry_run)
    # Still-failing records per partition since the last resubmitted one of it.
    failing: dict[tuple[str, int], list[str]] = {}
    reader = build_reader(settings)  # one registry client (and schema cache) per replay
    consumer = _consumer(settings, replay_group(settings))
    producer = None if dry_run else _Resubmitter(settings, timeout)
    try:
        plan = _plan(consumer, settings, committed=True, timeout_s=timeout)
        for batch in _batches(consumer, settings, plan, timeout):
            advanced: dict[tuple[str, int], int] = {}
            for message in batch:
                letter = DeadLetter.from_message(message)
                if letter.group is not None and letter.group != settings.kafka.group_id:
                    report.other_groups += 1
                    continue
                tp = (letter.topic, letter.partition)
                reason = _why_not(letter, settings, reader)
                if reason is not None:
                    report.still_failing[reason] += 1
                    failing.setdefault(tp, []).append(letter.coordinates)
                    continue
                if producer is not None:
                    producer.send(letter)
                report.resubmitted += 1
                advanced[tp] = letter.offset
                report.passed_over += failing.pop(tp, [])
            if producer is not None and advanced:
                producer.flush()
                _commit(consumer, settings, advanced, report)
    except BaseException:
        if producer is not None:
            producer.discard()
        raise
    finally:
        consumer.close()
    if report.passed_over:
        log.warning("passed over %d still-failing records before resubmitted ones (dlq list "
                    "still shows them): %s", len(report.passed_over),
                    ", ".join(report.passed_over[:10])
                    + (" ..." if len(report.passed_over) > 10 else ""))
    return report


def _commit(consumer: Consumer, settings: Settings, advanced: dict[tuple[str, int], int],
            report: ReplayReport) -> None:
    offsets = [TopicPartition(t, p, offset + 1) for (t, p), offset in sorted(advanced.items())]
    what = f"committing replay progress in group {replay_group(settings)!r}"
    with _broker(settings, what + " (the resubmitted records are delivered; the next "
                 "replay submits them again)"):
        done: Sequence[TopicPartition] | None = consumer.commit(offsets=offsets,
                                                                asynchronous=False)
    for tp in done or []:
        if tp.error is not None:
            raise KafkaUnavailable(f"dlq: {what}: {tp.topic}[{tp.partition}]: {tp.error}")
    report.committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})
