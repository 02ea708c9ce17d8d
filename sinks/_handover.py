"""The handover record both Qdrant sinks store (see :class:`~embedstream.stream.store.Handover`).

It is one point in the state collection, with the fixed id
:data:`~embedstream.sinks._layout.HANDOVER_POINT_ID` and the payload
``{"handover": {"offsets": [[topic, partition, offset], ...],
"acknowledged": {group_id: [[topic, partition], ...]}}}``. It has no
``doc_id``, so no read of document states ever takes it for a document.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from embedstream.sinks._layout import HANDOVER_POINT_ID, StatePoint
from embedstream.sinks._primitives import SinkPrimitives
from embedstream.stream.errors import SinkError
from embedstream.stream.store import Handover

__all__ = ["HandoverRecords", "handover_payload", "parse_handover"]


def handover_payload(handover: Handover) -> dict[str, Any]:
    """The handover point's payload. Sorted, so equal records store equal payloads."""
    return {"handover": {
        "offsets": [[t, p, o] for (t, p), o in sorted(handover.offsets.items())],
        "acknowledged": {group: [[t, p] for t, p in sorted(parts)]
                         for group, parts in sorted(handover.acknowledged.items())},
    }}


def parse_handover(payload: Mapping[str, Any] | None, where: str) -> Handover | None:
    """The record in a handover point's payload; ``None`` for no point."""
    if not payload:
        return None
    try:
        raw = payload["handover"]
        offsets = {(str(t), int(p)): int(o) for t, p, o in raw["offsets"]}
        acknowledged = {str(group): frozenset((str(t), int(p)) for t, p in parts)
                        for group, parts in raw["acknowledged"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SinkError(f"{where} holds a handover record this version cannot read "
                        f"({type(exc).__name__}: {exc})") from exc
    return Handover(offsets, acknowledged)


class HandoverRecords(SinkPrimitives):
    """The store protocol's handover operations over a sink's state points (mixed
    into :class:`~embedstream.sinks._collection.CollectionSink`, which supplies the
    primitives)."""

    @abstractmethod
    def _before_write(self) -> None: ...

    @abstractmethod
    def _state_payloads(self, ids: Sequence[str]) -> list[Mapping[str, Any] | None]: ...

    @abstractmethod
    def _put_states(self, points: list[StatePoint], durable: bool = False) -> None: ...

    def write_handover(self, offsets: Mapping[tuple[str, int], int]) -> None:
        record = Handover({(str(t), int(p)): int(o) for (t, p), o in offsets.items()}, {})
        self._replace_handover(record)

    def read_handover(self) -> Handover | None:
        self._check_open()
        with self._errors("read the handover record"):
            found = self._state_payloads([HANDOVER_POINT_ID])
        return parse_handover(found[0] if found else None, self._where)

    def acknowledge_handover(self, group_id: str,
                             partitions: Collection[tuple[str, int]]) -> None:
        current = self.read_handover()
        if current is None:
            raise SinkError(f"{self._where} holds no handover record to acknowledge")
        merged = dict(current.acknowledged)
        merged[group_id] = merged.get(group_id, frozenset()) | {(str(t), int(p))
                                                                 for t, p in partitions}
        self._replace_handover(Handover(current.offsets, merged))

    def _replace_handover(self, record: Handover) -> None:
        self._check_open()
        self._before_write()
        with self._errors("write the handover record"):
            # A rare control record: durable at once, not at the next flush.
            self._put_states([(HANDOVER_POINT_ID, handover_payload(record), None)],
                             durable=True)
