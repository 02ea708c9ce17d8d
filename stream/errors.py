"""One exception tree for everything embedstream raises on purpose.

Callers catch :class:`EmbedstreamError` to handle any of them; the subclasses
say what went wrong and, where it matters, what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "EmbedstreamError",
    "FingerprintMismatch",
    "KafkaUnavailable",
    "SinkError",
    "SinkUnavailable",
    "SourceError",
]


class EmbedstreamError(Exception):
    """Base class of every error embedstream raises deliberately."""


class ConfigError(EmbedstreamError):
    """The configuration is invalid; the message names the offending field."""


class DecodeError(EmbedstreamError):
    """A Kafka message could not be turned into a change event.

    ``reason`` is a short, bounded machine-readable code (used as a DLQ header
    and a metric label); the message text is the human detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class FingerprintMismatch(EmbedstreamError):
    """The collection holds vectors made under a different fingerprint.

    Mixing them would make scores meaningless, so the consumer refuses to start.
    """


class KafkaUnavailable(EmbedstreamError):
    """Kafka could not be reached, or refused us (authentication, authorisation)."""


class SinkError(EmbedstreamError):
    """The vector store rejected or failed a request."""


class SinkUnavailable(SinkError):
    """The store is (probably temporarily) unreachable or overloaded.

    ``retry_after`` is the suggested wait in seconds before trying again; the
    consumer pauses its partitions for that long instead of sleeping in the loop.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceError(EmbedstreamError):
    """A corpus file of a bulk rebuild cannot be read on: truncated or corrupt
    compressed data, an unreadable Parquet file, an unusable TSV header.

    The message names the path. A bad *row* is never this (it is reported and the
    read goes on); this means the rest of the file cannot be trusted or reached.
    """
