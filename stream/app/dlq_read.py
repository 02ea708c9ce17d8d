"""Read the dead-letter topics: :class:`DeadLetter` records and ``embedstream dlq list``.

The dead-letter topics are ``kafka.dlq_topic_for(t)`` for each configured topic
(one shared topic when ``kafka.dlq_topic`` is set). A record there holds the
original key and value and the headers :mod:`embedstream.stream.dead_letters` adds.

Both commands (``dlq list`` here, ``dlq replay`` in :mod:`embedstream.stream.app.dlq`) read
through this module a fixed range: from their start offset up to the high
watermarks captured when they start (or, if higher, the ones their first fetch
reports). They never wait for more records, so a consumer dead-lettering at the
same time only adds records the next run sees.
Partitions are ``assign``-ed with explicit offsets; neither command joins a
consumer group, so neither disturbs the running consumer.

Which topics: :func:`dlq_topics`, the dead-letter topic of each configured topic
(``<group_id>.<topic>.dlq``, or ``kafka.dlq_topic``), and with
``kafka.dlq_legacy_topics: true`` also the old default ``<topic>.dlq`` that
every group shared. Without that setting an old topic that still holds records
is not read, but a warning names it and the setting. Records carry the group
that wrote them (none for records written before groups were recorded):
``dlq list`` shows every record with its group; ``dlq replay`` resubmits only
its own group's and those naming none.

:func:`list_dead_letters` reads every dead-letter topic from its earliest
offset and commits nothing: it shows everything still retained, replayed or not.

Whatever Kafka fails or refuses (metadata, offsets, reading) raises
:class:`~embedstream.stream.errors.KafkaUnavailable` saying what failed; the command line
prints it and exits 2. Clients are created per call, never at import.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TextIO

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from embedstream.stream.config import Settings
from embedstream.stream.dead_letters import (
    CONSUMER_HEADER,
    DETAIL_HEADER,
    GROUP_HEADER,
    HEADERS_DROPPED_HEADER,
    KEY_TRUNCATED_HEADER,
    REASON_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
    TRUNCATED_HEADER,
)
from embedstream.stream.errors import KafkaUnavailable
from embedstream.stream.events import Position
from embedstream.stream.kafka_config import kafka_client_config

__all__ = [
    "DeadLetter",
    "dlq_topics",
    "list_dead_letters",
    "read_dead_letters",
]

log = logging.getLogger("embedstream.dlq")

_PREFIX = "embedstream."

# Seconds to wait for metadata, watermarks, commits and for reading progress
# (replay in embedstream.stream.app.dlq uses it too, through _timeout).
_TIMEOUT_S = 10.0
_BATCH = 500
_TEXT_DETAIL = 120
_TEXT_KEY = 60

Header = tuple[str, str | bytes | None]

# What a dead letter's notes say was cut to fit (see embedstream.stream.dead_letters),
# by the name `dropped` gives it.
_CUT_NOTES = {"value": TRUNCATED_HEADER, "headers": HEADERS_DROPPED_HEADER,
              "key": KEY_TRUNCATED_HEADER}


def dlq_topics(settings: Settings) -> list[str]:
    """The dead-letter topics of the configured topics, in order, without repeats;
    with ``kafka.dlq_legacy_topics``, each followed by its old default name."""
    kafka = settings.kafka
    names = [kafka.dlq_topic_for(t) for t in kafka.topics]
    if kafka.dlq_legacy_topics:
        names = [name for t, new in zip(kafka.topics, names, strict=True)
                 for name in (new, kafka.legacy_dlq_topic_for(t)) if name is not None]
    return list(dict.fromkeys(names))


def _timeout(timeout_s: float | None) -> float:
    """``timeout_s``, else the default :data:`_TIMEOUT_S` (read at call time)."""
    return timeout_s or _TIMEOUT_S


def _text(raw: str | bytes | None) -> str:
    if raw is None or isinstance(raw, str):
        return raw or ""
    return raw.decode("utf-8", "backslashreplace")


def _int(raw: str | bytes | None) -> int | None:
    try:
        return int(_text(raw))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-letter record, its headers parsed.

    ``source`` is None when the source headers are missing or malformed;
    ``headers`` are the original message's own headers (no ``embedstream.*``).
    ``dropped``: what was cut to fit the dead-letter topic (``value``, ``key``,
    ``headers``), with its original size in bytes (-1: unreadable); ``truncated``
    when anything was, so the record is no longer the message. ``group`` and
    ``consumer``: the consumer group and consumer that dead-lettered it (None in
    records written before they were recorded).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str
    source: Position | None
    headers: tuple[Header, ...] = ()
    truncated: bool = False
    timestamp_ms: int | None = None
    dropped: tuple[tuple[str, int], ...] = ()
    group: str | None = None
    consumer: str | None = None

    @classmethod
    def from_message(cls, message: Message) -> DeadLetter:
        raw = message.headers() or []
        pairs: list[Header] = list(raw.items() if isinstance(raw, dict) else raw)
        ours: dict[str, str | bytes | None] = {}
        own: list[Header] = []
        for name, value in pairs:
            if name.startswith(_PREFIX):
                ours[name] = value  # the last one wins
            else:
                own.append((name, value))
        source_topic = _text(ours.get(SOURCE_TOPIC_HEADER))
        source_partition = _int(ours.get(SOURCE_PARTITION_HEADER))
        source_offset = _int(ours.get(SOURCE_OFFSET_HEADER))
        source = (Position(source_topic, source_partition, source_offset)
                  if source_topic and source_partition is not None and source_offset is not None
                  else None)
        dropped = tuple((part, -1 if (size := _int(ours[note])) is None else size)
                        for part, note in _CUT_NOTES.items() if note in ours)
        _kind, stamp = message.timestamp()
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        return cls(
            topic=topic, partition=partition, offset=offset,
            key=message.key(), value=message.value(),
            reason=_text(ours.get(REASON_HEADER)) or "unknown",
            detail=_text(ours.get(DETAIL_HEADER)),
            source=source, headers=tuple(own), truncated=bool(dropped),
            timestamp_ms=stamp if stamp and stamp > 0 else None, dropped=dropped,
            group=_text(ours[GROUP_HEADER]) if GROUP_HEADER in ours else None,
            consumer=_text(ours[CONSUMER_HEADER]) if CONSUMER_HEADER in ours else None,
        )

    @property
    def coordinates(self) -> str:
        """``<dlq topic>/<partition>/<offset>``: the value of the replayed-from header."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; key and detail as text (non-UTF-8 bytes as ``\\xNN``)."""
        source = self.source
        return {
            "dlq_topic": self.topic, "dlq_partition": self.partition, "dlq_offset": self.offset,
            "source_topic": source.topic if source else None,
            "source_partition": source.partition if source else None,
            "source_offset": source.offset if source else None,
            "reason": self.reason, "detail": self.detail,
            "key": None if self.key is None else _text(self.key),
            "value_bytes": None if self.value is None else len(self.value),
            "truncated": self.truncated, "timestamp_ms": self.timestamp_ms,
            "dropped": dict(self.dropped), "group": self.group, "consumer": self.consumer,
        }

    def to_line(self) -> str:
        """One line for people: where it is, where it came from, the group that
        dead-lettered it (``-``: not recorded), why, key, detail (cut)."""
        source = self.source
        where = f"{source.topic}/{source.partition}/{source.offset}" if source else "-"
        key = "-" if self.key is None else _one_line(_text(self.key), _TEXT_KEY)
        cut = f"  cut={','.join(f'{part}:{size}' for part, size in self.dropped)}" \
            if self.dropped else ""
        return (f"{self.coordinates}  source={where}  group={self.group or '-'}  "
                f"reason={self.reason}  key={key}{cut}  "
                f"{_one_line(self.detail, _TEXT_DETAIL)}")


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items()))


@contextmanager
def _broker(settings: Settings, what: str) -> Iterator[None]:
    """Turn a Kafka client failure into a KafkaUnavailable that says what failed."""
    try:
        yield
    except KafkaException as error:
        raise KafkaUnavailable(
            f"dlq: {what} failed (Kafka at {settings.kafka.bootstrap_servers}): {error.args[0]}"
        ) from None


def _consumer(settings: Settings, group: str) -> Consumer:

    # "error": a start out of range must fail, never silently restart from the earliest.
    config = {**kafka_client_config(settings, "consumer"), "group.id": group,
              "auto.offset.reset": "error", "enable.partition.eof": False}
    # Only `assign` is used: no group membership, so no assignment strategy applies.
    config.pop("partition.assignment.strategy", None)
    return Consumer(config)


# Where each dead-letter partition's read starts (committed progress, else earliest),
# and the high watermark listed for it at the start.
_Plan = dict[tuple[str, int], tuple[int, int]]


def _plan(consumer: Consumer, settings: Settings, committed: bool, timeout_s: float) -> _Plan:
    """Capture each dead-letter partition's start and high watermark."""
    plan: _Plan = {}
    for topic in dlq_topics(settings):
        partitions = _partitions(consumer, settings, topic, timeout_s)
        if partitions is None:
            log.info("dead-letter topic %s does not exist: nothing dead-lettered there", topic)
            continue
        starts: dict[int, int] = {}
        if committed:
            with _broker(settings, f"reading the committed offsets of {topic!r}"):
                for tp in consumer.committed(partitions, timeout=timeout_s):
                    if tp.error is not None:
                        raise KafkaUnavailable(f"dlq: committed offset of {topic!r}: {tp.error}")
                    if tp.offset >= 0:
                        starts[tp.partition] = tp.offset
        for tp in partitions:
            with _broker(settings, f"reading the offsets of {topic}[{tp.partition}]"):
                low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            start = starts.get(tp.partition, low)
            if start < low:
                log.warning("%s[%d]: records %d..%d are gone (retention) before replay saw them",
                            topic, tp.partition, start, low - 1)
                start = low
            plan[(topic, tp.partition)] = (start, high)
    _warn_of_legacy_topics(consumer, settings, timeout_s)
    return plan


def _partitions(consumer: Consumer, settings: Settings, topic: str,
                timeout_s: float) -> list[TopicPartition] | None:
    """The partitions of ``topic``; None when it does not exist."""
    with _broker(settings, f"reading metadata of {topic!r}"):
        metadata = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None:
        if metadata is not None and metadata.error.code() not in (
                KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
            raise KafkaUnavailable(f"dlq: topic {topic!r}: {metadata.error}")
        return None
    return [TopicPartition(topic, p) for p in sorted(metadata.partitions)]


def _warn_of_legacy_topics(consumer: Consumer, settings: Settings, timeout_s: float) -> None:
    """Name the old default dead-letter topics (``<topic>.dlq``) that still hold
    records but are not read, and the setting that reads them."""
    kafka = settings.kafka
    legacy = {name for t in kafka.topics if (name := kafka.legacy_dlq_topic_for(t))}
    for topic in sorted(legacy - set(dlq_topics(settings))):
        partitions = _partitions(consumer, settings, topic, timeout_s)
        held = 0
        for tp in partitions or ():
            with _broker(settings, f"reading the offsets of {topic}[{tp.partition}]"):
                low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            held += max(0, high - low)
        if held:
            log.warning("the dead-letter topic %s (the old default name, shared by every "
                        "group) still holds records and is not read: set "
                        "kafka.dlq_legacy_topics: true to list and replay them too", topic)


def _batches(consumer: Consumer, settings: Settings, plan: _Plan,
             timeout_s: float) -> Iterator[list[Message]]:
    """The records of ``plan`` in batches, in offset order per partition, then stop.

    A partition's end is its high watermark at the start or, if higher, the one
    its first fetch reported: some brokers (the bundled Tansu) list only the
    base offset of the last record batch plus one, while fetches report the
    true end. Either way the end is fixed early, so a busy topic is not chased.
    """
    if not plan:
        return
    next_offset = {tp: start for tp, (start, _) in plan.items()}
    ends: dict[tuple[str, int], int] = {}
    pending = set(plan)
    consumer.assign([TopicPartition(t, p, start) for (t, p), start in next_offset.items()])
    progress_at, last_error = time.monotonic(), None
    while pending:
        with _broker(settings, "reading dead-letter records"):
            messages = consumer.consume(_BATCH, 0.5)
            # The fetch that brought these messages has reported its high watermark.
            for t, p in sorted(pending - ends.keys()):
                fetched = consumer.get_watermark_offsets(TopicPartition(t, p), cached=True)[1]
                if fetched >= 0:
                    ends[(t, p)] = max(plan[(t, p)][1], fetched)
                    if next_offset[(t, p)] > ends[(t, p)]:
                        log.warning("%s[%d]: replay progress %d is past the end %d (topic "
                                    "recreated?): nothing read there",
                                    t, p, next_offset[(t, p)], ends[(t, p)])
        batch: list[Message] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal() or error.code() == KafkaError._AUTO_OFFSET_RESET:
                    raise KafkaUnavailable(f"dlq: reading dead-letter records: {error}")
                if error.code() != KafkaError._PARTITION_EOF:
                    last_error = error
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None
            tp = (topic, partition)
            if tp not in pending:
                continue
            if offset >= ends.get(tp, plan[tp][1]):
                continue  # arrived after the start: left for the next run
            batch.append(message)
            next_offset[tp] = offset + 1
        # Also past records no message stands for (control records, compacted gaps).
        with _broker(settings, "reading positions"):
            positions = consumer.position([TopicPartition(t, p) for t, p in sorted(pending)])
        for position in positions:
            tp = (position.topic, position.partition)
            next_offset[tp] = max(next_offset[tp], position.offset)
            if tp in ends and next_offset[tp] >= ends[tp]:
                pending.discard(tp)
                progress_at = time.monotonic()
        if batch:
            progress_at = time.monotonic()
            yield batch
        elif pending and time.monotonic() - progress_at > timeout_s:
            raise KafkaUnavailable(
                f"dlq: no progress reading {sorted(pending)} for {timeout_s:.0f}s "
                f"(Kafka at {settings.kafka.bootstrap_servers}; last error: {last_error})")


def read_dead_letters(settings: Settings, *, timeout_s: float | None = None
                      ) -> Iterator[DeadLetter]:
    """Every retained dead-letter record, earliest first per partition, up to the
    high watermarks captured at the start. Commits nothing."""
    timeout = _timeout(timeout_s)
    consumer = _consumer(settings, f"{settings.kafka.group_id}.dlq-list")
    try:
        plan = _plan(consumer, settings, committed=False, timeout_s=timeout)
        for batch in _batches(consumer, settings, plan, timeout):
            yield from (DeadLetter.from_message(m) for m in batch)
    finally:
        consumer.close()


def list_dead_letters(settings: Settings, out: TextIO, *, as_json: bool = False,
                      timeout_s: float | None = None) -> Counter[str]:
    """Write one line (or JSON object) per dead-letter record to ``out``; log the
    count by reason; return it."""
    reasons: Counter[str] = Counter()
    for letter in read_dead_letters(settings, timeout_s=timeout_s):
        out.write((json.dumps(letter.to_json()) if as_json else letter.to_line()) + "\n")
        reasons[letter.reason] += 1
    out.flush()
    log.info("%d dead-letter records in %s%s", sum(reasons.values()),
             ", ".join(dlq_topics(settings)), f": {_counts(reasons)}" if reasons else "")
    return reasons
