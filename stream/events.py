"""The change-event model: what decoding produces and planning consumes.

Pure data, no I/O. A :class:`ChangeEvent` is the latest known state of one
document at one version; a :class:`Skipped` is a well-formed message that carries
no document change (a Debezium schema change or heartbeat).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChangeEvent", "Op", "Position", "Skipped"]


class Op(enum.Enum):
    """What an event does to its document."""

    UPSERT = "upsert"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message sits in Kafka.

    Equal positions name the same record: ``topic_id`` and ``timestamp_ms`` are
    extra facts about it, left out of comparisons and hashing.
    """

    topic: str
    partition: int
    offset: int
    # The topic's Kafka topic id, when known: tells a topic that was deleted and
    # recreated under the same name (offsets start again at 0) from the old one.
    topic_id: str | None = field(default=None, compare=False)
    # The record's Kafka timestamp (ms), when it has one: what orders records of
    # one key that sit in different partitions, where offsets say nothing.
    timestamp_ms: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """The state of one document after a change.

    ``version`` only grows for a given document (``source.lsn``, ``source.ts_ms``
    or the Kafka offset, per ``source.version``). Two events with the same
    version are ordered by their Kafka offset, so the later one in the log wins.
    ``versioned``: the version came from the message itself (an LSN, a
    timestamp, a ``version`` field), so it orders events across partitions and
    topics; False when it is only the Kafka offset (tombstones included), which
    orders nothing outside its own partition.

    ``kind`` is a bounded label for metrics: ``create``, ``read`` (snapshot),
    ``update``, ``delete``, ``tombstone`` or ``native``.

    ``title``: the document's title (``source.title_field``; None when that is
    unset, or the field absent, null or blank), embedded in front of each chunk's
    text; the stored text stays ``text``'s own.
    """

    doc_id: str
    op: Op
    version: int
    position: Position
    text: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source_ts_ms: int | None = None
    kind: str = "native"
    versioned: bool = True
    title: str | None = None

    @property
    def order_key(self) -> tuple[int, int]:
        """Order of one document's events within one partition: version, then log offset."""
        return (self.version, self.position.offset)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A valid message with no document change in it (counted, not an error)."""

    reason: str
    position: Position
