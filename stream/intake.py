"""From one Kafka message to a prepared event, with the stream's limits: pure, no I/O
but the ``reader``'s (a Schema Registry fetch, once per schema id).

The live consumer, the rebuild's Kafka snapshot and its catch-up all take
messages in through :func:`take_in`, so a message is accepted, skipped or
rejected for the same reasons everywhere: over ``source.max_message_bytes``
(``message_too_large``), undecodable (a :data:`embedstream.stream.decode.REASONS` code),
a document over ``source.max_document_chars`` (``document_too_large``), or one
the chunker fails on (``chunk_failed``). With a ``reader``
(:class:`~embedstream.stream.registry.ValueReader`), Schema Registry framed keys and
values are deserialized first: its ``DecodeError`` reasons reject the message like
the decoder's; :class:`~embedstream.stream.errors.RegistryUnavailable` (an outage)
propagates, and the caller reads the message again later.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedstream.stream.chunking import Chunker
from embedstream.stream.config import SourceSettings
from embedstream.stream.decode import decode_message
from embedstream.stream.errors import DecodeError
from embedstream.stream.events import Op, Position, Skipped
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.registry import ValueReader

# ValueReader: re-exported for callers' type hints (embedstream.stream.registry holds it).
__all__ = ["Rejected", "ValueReader", "take_in"]


@dataclass(frozen=True, slots=True)
class Rejected:
    """A message that gives no event: dead-lettered by the stream, listed by a rebuild.
    ``kind`` is the event kind, or ``undecodable`` when there is no event."""

    reason: str
    detail: str
    kind: str


def take_in(key: bytes | None, value: bytes | None, position: Position,
            source: SourceSettings, chunker: Chunker | None,
            reader: ValueReader | None = None) -> PreparedEvent | Skipped | Rejected:
    """The message's event with its chunks (none without a ``chunker``, or for a
    deletion; under the event's title, if it has one), a
    :class:`~embedstream.stream.events.Skipped`, or why it was :class:`Rejected`."""
    size = len(value or b"")
    if size > source.max_message_bytes:
        return Rejected("message_too_large",
                        f"{size} bytes > source.max_message_bytes {source.max_message_bytes}",
                        "undecodable")
    try:
        if reader is None:
            decoded = decode_message(key, value, position, source)
        else:
            read_key, read_value = reader.read(position.topic, key, value)
            decoded = decode_message(read_key, read_value, position, source)
    except DecodeError as error:
        return Rejected(error.reason, error.detail, "undecodable")
    if isinstance(decoded, Skipped):
        return decoded
    if len(decoded.text) > source.max_document_chars:
        return Rejected("document_too_large",
                        f"{len(decoded.text)} characters > source.max_document_chars "
                        f"{source.max_document_chars}", decoded.kind)
    chunks = []
    if decoded.op is Op.UPSERT and chunker is not None:
        try:
            chunks = chunker.chunk(decoded.text, decoded.title)
        except Exception as error:  # one bad document must not stop the stream
            return Rejected("chunk_failed", repr(error), decoded.kind)
    return PreparedEvent(decoded, chunks)
