"""The dead-letter topic: where messages that cannot be applied go, with the reason.

A record keeps the original key, value and headers, so it can be replayed once
the cause is fixed, and carries headers naming the error and where the message
came from:

``embedstream.error.reason``, ``embedstream.error.detail``,
``embedstream.source.topic``, ``embedstream.source.partition``,
``embedstream.source.offset``, and who dead-lettered it:
``embedstream.consumer.group`` (``kafka.group_id``) and
``embedstream.consumer.id`` (see :class:`DeadLetters`), plus the original headers.

The topic is ``kafka.dlq_topic`` if set, else ``<group_id>.<topic>.dlq``
(:meth:`~embedstream.stream.config.KafkaSettings.dlq_topic_for`): two groups
reading one topic keep their dead letters apart, and ``dlq replay`` resubmits
only its own group's (the group header decides where one topic is shared).

Kafka refuses a record over the producer's (and the broker's)
``message.max.bytes``, and a dead letter that cannot be written would stop the
stream at that message on every restart. So a value over
``kafka.dlq_max_value_bytes`` is cut to that size, and a record still over the
producer's ``message.max.bytes`` (key, value and headers counted, known before
sending) is shrunk by :func:`fit`: original headers larger than the key go
first (largest first), then the key is cut, then the other headers go, and the
value is cut last, so a small value survives a huge header or key. What was cut
says so, with its original size:
``embedstream.dlq.truncated`` (value), ``embedstream.dlq.headers_dropped``
(bytes of the original headers dropped), ``embedstream.dlq.key_truncated``
(key). Should Kafka refuse the record anyway (a broker or topic limit below the
producer's), a minimal record goes instead: our headers only, no key, an empty
value (not a tombstone), every size noted. Our own headers are always kept; the whole message
stays readable in the source topic at the offset they name, for as long as that
topic retains it. ``dlq replay`` does not resubmit a shrunk record.

:meth:`DeadLetters.flush` must succeed before the consumer commits past a
dead-lettered message, so a record is never lost between the two topics.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from embedstream.stream.config import KafkaSettings

__all__ = [
    "CONSUMER_HEADER",
    "DETAIL_HEADER",
    "GROUP_HEADER",
    "HEADERS_DROPPED_HEADER",
    "KEY_TRUNCATED_HEADER",
    "REASON_HEADER",
    "SOURCE_OFFSET_HEADER",
    "SOURCE_PARTITION_HEADER",
    "SOURCE_TOPIC_HEADER",
    "TRUNCATED_HEADER",
    "DeadLetters",
    "Fitted",
    "default_consumer_id",
    "ensure_topics",
    "fit",
]

# The headers a dead-letter record carries (the `dlq list` and `dlq replay` commands read
# them back).
REASON_HEADER = "embedstream.error.reason"
DETAIL_HEADER = "embedstream.error.detail"
SOURCE_TOPIC_HEADER = "embedstream.source.topic"
SOURCE_PARTITION_HEADER = "embedstream.source.partition"
SOURCE_OFFSET_HEADER = "embedstream.source.offset"
GROUP_HEADER = "embedstream.consumer.group"
CONSUMER_HEADER = "embedstream.consumer.id"
TRUNCATED_HEADER = "embedstream.dlq.truncated"
HEADERS_DROPPED_HEADER = "embedstream.dlq.headers_dropped"
KEY_TRUNCATED_HEADER = "embedstream.dlq.key_truncated"

Header = tuple[str, bytes | None]

_DETAIL_LIMIT = 1000
# librdkafka's default message.max.bytes.
_DEFAULT_MAX_BYTES = 1_000_000
# Left below message.max.bytes for what a record costs beyond its key, value and
# header bytes (lengths, varints, the batch header: under 100 bytes), with room.
_MARGIN = 512
# Per header beyond its name and value (two varint lengths), rounded up.
_HEADER_COST = 8
# Reserved for the notes fit() may add (three headers, each under 60 bytes).
_NOTES = 3 * 64


def _size(headers: Iterable[Header]) -> int:
    return sum(len(name.encode()) + len(value or b"") + _HEADER_COST for name, value in headers)


@dataclass(frozen=True, slots=True)
class Fitted:
    """A record within the size limit; ``notes`` are the headers saying what was cut."""

    key: bytes | None
    value: bytes | None
    headers: list[Header]  # the original headers kept
    notes: list[Header]


def fit(key: bytes | None, value: bytes | None, headers: Sequence[Header], own: int,
        value_cap: int, limit: int) -> Fitted:
    """Cut ``value`` to ``value_cap``; then, while the record (with ``own`` bytes of
    our headers) is over ``limit`` bytes: drop the original headers larger than the
    key, largest first; cut the key; drop the other headers, largest first; cut the
    value. The value goes last: it is what people inspect and what a fix replays.
    If our headers alone are over ``limit``, everything else goes (the send then
    fails and the caller sends the minimal record)."""
    cut_value = value if value is None or len(value) <= value_cap else value[:value_cap]
    sizes = [_size([header]) for header in headers]
    largest_first = sorted(range(len(headers)), key=lambda i: -sizes[i])
    over = len(key or b"") + len(cut_value or b"") + sum(sizes) - (limit - own - _NOTES)
    dropped = 0  # how many of largest_first are gone

    def drop_headers(larger_than: int) -> None:
        nonlocal over, dropped
        while over > 0 and dropped < len(headers) \
                and sizes[largest_first[dropped]] > larger_than:
            over -= sizes[largest_first[dropped]]
            dropped += 1

    def cut(part: bytes | None) -> bytes | None:
        nonlocal over
        if over <= 0 or not part:
            return part
        keep = max(0, len(part) - over)
        over -= len(part) - keep
        return part[:keep]

    drop_headers(larger_than=len(key or b""))
    cut_key = cut(key)
    drop_headers(larger_than=-1)
    cut_value = cut(cut_value)

    notes: list[Header] = []
    if value is not None and len(cut_value or b"") < len(value):
        notes.append((TRUNCATED_HEADER, str(len(value)).encode()))
    gone = set(largest_first[:dropped])
    if gone:
        original = _size(headers[i] for i in gone) - _HEADER_COST * len(gone)
        notes.append((HEADERS_DROPPED_HEADER, str(original).encode()))
    if key is not None and len(cut_key or b"") < len(key):
        notes.append((KEY_TRUNCATED_HEADER, str(len(key)).encode()))
    kept = [header for i, header in enumerate(headers) if i not in gone]
    return Fitted(cut_key, cut_value, kept, notes)


def _minimal(own: list[Header], key: bytes | None, value: bytes | None,
             headers: Sequence[Header]) -> list[Header]:
    """The headers of the smallest dead letter of a message: ours, and every size."""
    notes = [(TRUNCATED_HEADER, str(len(value or b"")).encode())]
    if headers:
        original = _size(headers) - _HEADER_COST * len(headers)
        notes.append((HEADERS_DROPPED_HEADER, str(original).encode()))
    if key:
        notes.append((KEY_TRUNCATED_HEADER, str(len(key)).encode()))
    return own + notes


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def default_consumer_id(settings: KafkaSettings) -> str:
    """Who dead-letters, when the caller does not say: ``client.id`` from
    ``kafka.options`` if set, then ``<host>:<pid>`` (unique among the consumers alive)."""
    host = f"{socket.gethostname()}:{os.getpid()}"
    client = settings.librdkafka_options().get("client.id")
    return f"{client}@{host}" if client else host


class DeadLetters:
    """The dead-letter producer of one consumer. ``consumer_id`` goes into the
    ``embedstream.consumer.id`` header of every record (default:
    :func:`default_consumer_id`); a caller that knows the group member id may
    assign it at any time (each send reads the attribute; the id changes with
    each rebalance)."""

    def __init__(self, producer: Producer, settings: KafkaSettings,
                 consumer_id: str | None = None) -> None:
        self._producer = producer
        self._settings = settings
        self.consumer_id = consumer_id or default_consumer_id(settings)
        # What this producer refuses (librdkafka checks before sending); the broker's
        # own limit may be lower: a refused record is sent again, minimal.
        configured = settings.librdkafka_options().get("message.max.bytes")
        self._limit = (int(configured) if configured is not None else _DEFAULT_MAX_BYTES) \
            - _MARGIN
        self._failures: list[KafkaError] = []
        self._resend: list[tuple[str, list[Header]]] = []
        self._pending = 0

    def send(self, message: Message, reason: str, detail: str) -> bool:
        """Queue the dead letter of ``message``; True when something of it was cut
        or dropped to fit (the notes say what)."""
        source_topic = message.topic() or ""
        original = message.headers() or []
        headers = [(name, _bytes(value)) for name, value in
                   (original.items() if isinstance(original, dict) else original)]
        own: list[Header] = [
            (REASON_HEADER, reason.encode()),
            (DETAIL_HEADER, detail[:_DETAIL_LIMIT].encode("utf-8", "replace")),
            (SOURCE_TOPIC_HEADER, source_topic.encode()),
            (SOURCE_PARTITION_HEADER, str(message.partition()).encode()),
            (SOURCE_OFFSET_HEADER, str(message.offset()).encode()),
            (GROUP_HEADER, self._settings.group_id.encode()),
            (CONSUMER_HEADER, self.consumer_id.encode()),
        ]
        key, value = message.key(), message.value()
        record = fit(key, value, headers, _size(own), self._settings.dlq_max_value_bytes,
                     self._limit)
        minimal = _minimal(own, key, value, headers)
        topic = self._settings.dlq_topic_for(source_topic)
        try:
            self._produce(topic, record.key, record.value, record.headers + own + record.notes,
                          self._delivered_or_resend(topic, minimal))
        except KafkaException as error:
            # Over a limit fit() did not know of: the minimal record must pass.
            if error.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            self._produce(topic, None, b"", minimal, self._delivered)
            return True
        return bool(record.notes)

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[Header],
                 on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        wire: list[tuple[str, str | bytes | None]] = [*headers]
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, headers=wire,
                                       on_delivery=on_delivery)
                break
            except BufferError:  # the local queue is full: deliver some, then retry
                self._producer.poll(0.5)
        self._pending += 1
        self._producer.poll(0)

    def _delivered_or_resend(self, topic: str, minimal: list[Header]
                             ) -> Callable[[KafkaError | None, Message], None]:
        def delivered(error: KafkaError | None, message: Message) -> None:
            if error is not None and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                self._resend.append((topic, minimal))  # sent by flush()
            else:
                self._delivered(error, message)

        return delivered

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(error)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every record sent so far is acknowledged; raise if any failed."""
        if not self._pending:
            return
        remaining = self._producer.flush(timeout_s)
        while self._resend and not remaining:
            # The broker refused records the producer let pass: their minimal records.
            resend, self._resend = self._resend, []
            for topic, headers in resend:
                self._produce(topic, None, b"", headers, self._delivered)
            remaining = self._producer.flush(timeout_s)
        if remaining or self._failures:
            # Sticky: a record that failed stays failed, so no later flush (e.g.
            # the one a revoke runs while the process stops) lets a commit pass it.
            raise KafkaException(
                self._failures[0] if self._failures else KafkaError(KafkaError._TIMED_OUT)
            )
        self._pending = 0

    def poll(self) -> None:
        """Serve delivery reports and the producer's log lines (once per loop turn)."""
        self._producer.poll(0)

    def close(self) -> None:
        """Deliver what is pending and release the producer."""
        self._producer.flush(10.0)
        self._producer.close()


def ensure_topics(admin: AdminClient, topics: Iterable[str], partitions: int = 1) -> None:
    """Create the topics that do not exist yet (an existing one is left as it is)."""
    wanted = set(topics)
    existing = set(admin.list_topics(timeout=10).topics)
    missing = [NewTopic(t, num_partitions=partitions) for t in sorted(wanted - existing)]
    if not missing:
        return
    for future in admin.create_topics(missing).values():
        try:
            future.result()
        except KafkaException as error:
            if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
