"""librdkafka client configuration, shared by the stream, the rebuild and the commands.

Built from the :class:`~embedstream.stream.config.Settings` tree on each call;
nothing here creates a client.
"""

from __future__ import annotations

from typing import Any

from embedstream.stream.config import Settings

__all__ = ["kafka_client_config"]

# Defaults that embedstream needs for its guarantees; `kafka.options` may not undo them.
_CONSUMER_REQUIRED = {"enable.auto.commit": False, "enable.auto.offset.store": False}
# Defaults a user may override through `kafka.options`.
_CONSUMER_DEFAULTS = {
    "auto.offset.reset": "earliest",
    # A short broker wait keeps freshness low on quiet topics.
    "fetch.wait.max.ms": 100,
    # Incremental rebalancing: members keep the partitions that do not move.
    "partition.assignment.strategy": "cooperative-sticky",
}
_PRODUCER_DEFAULTS = {"acks": "all", "linger.ms": 5}
# Consumer-only settings librdkafka would warn about on a producer.
_CONSUMER_ONLY_PREFIXES = ("session.", "heartbeat.", "fetch.", "auto.offset", "max.poll",
                           "group.", "partition.assignment", "isolation.", "enable.auto")


def kafka_client_config(settings: Settings, role: str) -> dict[str, Any]:
    """librdkafka configuration for the ``consumer``, ``producer`` or ``admin`` client."""
    kafka = settings.kafka
    options = kafka.librdkafka_options()
    base: dict[str, Any] = {"bootstrap.servers": kafka.bootstrap_servers,
                            **kafka.security.librdkafka()}
    if role == "consumer":
        return {**base, **_CONSUMER_DEFAULTS, **options, "group.id": kafka.group_id,
                **_CONSUMER_REQUIRED}
    shared = {k: v for k, v in options.items() if not k.startswith(_CONSUMER_ONLY_PREFIXES)}
    if role == "producer":
        return {**base, **_PRODUCER_DEFAULTS, **shared}
    return {**base, **shared}
