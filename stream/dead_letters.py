"""The dead-letter topic: where messages that cannot be applied go, with the reason.

A record keeps the original key and value bytes untouched, so it can be
replayed once the cause is fixed, and carries headers naming the error and
where the message came from:

``embedstream.error.reason``, ``embedstream.error.detail``,
``embedstream.source.topic``, ``embedstream.source.partition``,
``embedstream.source.offset`` (plus the original headers).

A value over ``kafka.dlq_max_value_bytes`` is cut to that size (Kafka refuses
records over the broker's ``message.max.bytes``, and a DLQ that cannot be
written would stop the stream); the header ``embedstream.dlq.truncated`` then
holds the original size, and the whole message stays readable in the source
topic at the offset the headers name, for as long as that topic retains it.

:meth:`DeadLetters.flush` must succeed before the consumer commits past a
dead-lettered message, so a record is never lost between the two topics.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from embedstream.stream.config import KafkaSettings

__all__ = [
    "DETAIL_HEADER",
    "REASON_HEADER",
    "SOURCE_OFFSET_HEADER",
    "SOURCE_PARTITION_HEADER",
    "SOURCE_TOPIC_HEADER",
    "TRUNCATED_HEADER",
    "DeadLetters",
    "ensure_topics",
]

# The headers a dead-letter record carries (the `dlq list` and `dlq replay` commands read
# them back).
REASON_HEADER = "embedstream.error.reason"
DETAIL_HEADER = "embedstream.error.detail"
SOURCE_TOPIC_HEADER = "embedstream.source.topic"
SOURCE_PARTITION_HEADER = "embedstream.source.partition"
SOURCE_OFFSET_HEADER = "embedstream.source.offset"
TRUNCATED_HEADER = "embedstream.dlq.truncated"

_DETAIL_LIMIT = 1000


class DeadLetters:
    def __init__(self, producer: Producer, settings: KafkaSettings) -> None:
        self._producer = producer
        self._settings = settings
        self._failures: list[KafkaError] = []
        self._pending = 0

    def send(self, message: Message, reason: str, detail: str) -> None:
        source_topic = message.topic() or ""
        original = message.headers() or []
        headers: list[tuple[str, str | bytes | None]] = list(
            original.items() if isinstance(original, dict) else original
        )
        headers += [
            (REASON_HEADER, reason.encode()),
            (DETAIL_HEADER, detail[:_DETAIL_LIMIT].encode("utf-8", "replace")),
            (SOURCE_TOPIC_HEADER, source_topic.encode()),
            (SOURCE_PARTITION_HEADER, str(message.partition()).encode()),
            (SOURCE_OFFSET_HEADER, str(message.offset()).encode()),
        ]
        value = message.value()
        cap = self._settings.dlq_max_value_bytes
        if value is not None and len(value) > cap:
            headers.append((TRUNCATED_HEADER, str(len(value)).encode()))
            value = value[:cap]
        topic = self._settings.dlq_topic_for(source_topic)
        while True:
            try:
                self._producer.produce(topic, key=message.key(), value=value, headers=headers,
                                       on_delivery=self._delivered)
                break
            except BufferError:  # the local queue is full: deliver some, then retry
                self._producer.poll(0.5)
            except KafkaException as error:
                # Key and headers count against message.max.bytes too: keep them, drop the value.
                if error.args[0].code() != KafkaError.MSG_SIZE_TOO_LARGE or value is None:
                    raise
                size = str(len(message.value() or b"")).encode()
                headers = [h for h in headers if h[0] != TRUNCATED_HEADER]
                headers.append((TRUNCATED_HEADER, size))
                value = None
        self._pending += 1
        self._producer.poll(0)

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(error)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every record sent so far is acknowledged; raise if any failed."""
        if not self._pending:
            return
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
