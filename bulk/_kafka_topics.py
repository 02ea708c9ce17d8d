"""What a rebuild asks of the source topics, each through a short-lived client of its
own: the snapshot's consumer (a group of its own, never committing), the topics' ids,
their partitions, where they end, and what the live group has committed."""

from __future__ import annotations

from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient

from embedstream.stream.config import Settings
from embedstream.stream.errors import KafkaUnavailable
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.offsets import committed_offsets, served_ends
from embedstream.stream.topic_ids import TopicIds

__all__ = ["Partition", "group_committed", "snapshot_consumer", "snapshot_topic_ids",
           "topic_ends", "topic_partitions"]

Partition = tuple[str, int]
_METADATA_TIMEOUT_S = 15.0


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


def topic_ends(settings: Settings, partitions: list[Partition] | None = None
               ) -> dict[Partition, int]:
    """Where every partition of the configured topics (or ``partitions``) ends now,
    as the broker serves it (:func:`~embedstream.stream.offsets.served_ends`)."""
    consumer = snapshot_consumer(settings)
    try:
        if partitions is None:
            partitions = topic_partitions(consumer, settings.kafka.topics)
        return served_ends(consumer, partitions)
    finally:
        consumer.close()


def group_committed(settings: Settings, partitions: list[Partition]) -> dict[Partition, int]:
    """The offsets the live consumer group (``kafka.group_id``) has committed on
    ``partitions`` (those it has committed at all). Reads them only: joins nothing,
    commits nothing. Raises :class:`KafkaUnavailable`."""
    config = kafka_client_config(settings, "consumer")
    config["enable.auto.commit"] = False
    consumer = Consumer(config)
    try:
        return committed_offsets(consumer, partitions)
    finally:
        consumer.close()
