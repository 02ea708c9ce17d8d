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
    """Where a message sits in Kafka."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """The state of one document after a change.

    ``version`` only grows for a given document (``source.lsn``, ``source.ts_ms``
    or the Kafka offset, per ``source.version``). Two events with the same
    version are ordered by their Kafka offset, so the later one in the log wins.

    ``kind`` is a bounded label for metrics: ``create``, ``read`` (snapshot),
    ``update``, ``delete``, ``tombstone`` or ``native``.
    """

    doc_id: str
    op: Op
    version: int
    position: Position
    text: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    source_ts_ms: int | None = None
    kind: str = "native"

    @property
    def order_key(self) -> tuple[int, int]:
        """Total order of events of one document: version, then log offset."""
        return (self.version, self.position.offset)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A valid message with no document change in it (counted, not an error)."""

    reason: str
    position: Position
