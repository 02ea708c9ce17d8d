"""One exception tree for everything embedstream raises on purpose.

Callers catch :class:`EmbedstreamError` to handle any of them; the subclasses
say what went wrong and, where it matters, what to do about it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = [
    "ConfigError",
    "DecodeError",
    "EmbedFailures",
    "EmbedderError",
    "EmbedderUnavailable",
    "EmbedstreamError",
    "FingerprintMismatch",
    "KafkaUnavailable",
    "NeedsOperator",
    "QueryError",
    "RegistryUnavailable",
    "SinkError",
    "SinkUnavailable",
    "SourceError",
    "StoreDiskFull",
    "Unavailable",
]


class EmbedstreamError(Exception):
    """Base class of every error embedstream raises deliberately."""


class ConfigError(EmbedstreamError):
    """The configuration is invalid; the message names the offending field."""


class QueryError(EmbedstreamError):
    """A search cannot be run as asked: a filter on a field that is not a filter
    field, an operator or value its type does not take, a malformed line of a
    queries file. The message names the field, expression or line."""


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


class Unavailable(EmbedstreamError):
    """A service the pipeline needs (Kafka, the store, a remote embedder) is, probably
    for a while only, unreachable or overloaded.

    ``retry_after`` is the suggested wait in seconds before trying again; the
    consumer pauses its partitions for that long instead of sleeping in the loop.
    """

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class KafkaUnavailable(Unavailable):
    """Kafka could not be reached, or refused us (authentication, authorisation).

    A refusal does not pass with time: whoever catches :class:`Unavailable` to wait
    and retry should stop retrying this one after a while (the commands raising it
    stop at once and say what failed)."""


class RegistryUnavailable(Unavailable):
    """The Schema Registry could not be reached or failed (connection refused,
    timeout, 5xx): an outage, not a bad message. The consumer pauses, reports not
    ready and reads the message again later; nothing is dead-lettered or committed.
    An unknown schema id or a value that does not match its schema is a
    :class:`DecodeError` instead (a dead letter)."""


class SinkError(EmbedstreamError):
    """The vector store rejected or failed a request."""


class NeedsOperator(SinkError):
    """The store is in a state embedstream will not guess its way out of (a
    damaged ``aliases.json``; an alias gone while collections made for it are
    still there): going on could hide indexed documents behind an empty
    collection. Retrying does not help; the message says what to run."""


class SinkUnavailable(SinkError, Unavailable):
    """The store is (probably temporarily) unreachable or overloaded (see :class:`Unavailable`)."""


class StoreDiskFull(SinkUnavailable):
    """The filesystem of a local store (Qdrant Edge) has less free space than
    ``sink.min_free_bytes``; nothing was written.

    Qdrant Edge writes through memory maps, and the kernel kills a process that
    writes to one on a full filesystem with SIGBUS (no exception, no log line), so
    the sink refuses writes before that point. The consumer treats it as an outage
    (pauses, reports not ready, commits nothing) until space is freed. ``path`` is
    the store's directory, ``free_bytes`` what its filesystem had free."""

    def __init__(self, message: str, path: str, free_bytes: int, min_free_bytes: int,
                 retry_after: float = 5.0) -> None:
        super().__init__(message, retry_after)
        self.path = path
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes


class EmbedderError(EmbedstreamError):
    """The embedding provider refuses every request (credentials, model name, endpoint,
    an unexpected vector size): nothing will work until the configuration changes."""


class EmbedderUnavailable(EmbedderError, Unavailable):
    """The embedding provider is down (429, 5xx, timeouts with nothing succeeding for
    ``embed.give_up_after_s``) or too slow for the call's time budget; nothing was
    failed, the work can be retried later. ``partial`` holds the vectors that did
    arrive, by input index, for the retry to reuse."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after)
        self.partial: dict[int, npt.NDArray[np.float32]] = {}


class EmbedFailures(EmbedstreamError):
    """Some texts of an embedding call failed for good; the others have vectors.

    ``vectors`` has a row per input text; the rows of the indexes in ``failed`` are
    not vectors and must not be used. ``failed`` maps each such index to
    ``(reason, detail)``: ``reason`` is a short bounded code (a dead-letter
    header), ``detail`` what the provider said.
    """

    def __init__(self, vectors: npt.NDArray[np.float32],
                 failed: dict[int, tuple[str, str]]) -> None:
        reasons = sorted({reason for reason, _ in failed.values()})
        super().__init__(f"{len(failed)} text(s) could not be embedded: {', '.join(reasons)}")
        self.vectors = vectors
        self.failed = failed


class SourceError(EmbedstreamError):
    """A corpus file of a bulk rebuild cannot be read on: truncated or corrupt
    compressed data, an unreadable Parquet file, an unusable TSV header.

    The message names the path. A bad *row* is never this (it is reported and the
    read goes on); this means the rest of the file cannot be trusted or reached.
    """
