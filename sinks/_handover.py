"""The handover record both Qdrant sinks store (see :class:`~embedstream.stream.store.Handover`).

It is one point in the state collection, with the fixed id
:data:`~embedstream.sinks._layout.HANDOVER_POINT_ID` and the payload
``{"handover": {"offsets": [[topic, partition, offset], ...],
"acknowledged": {group_id: [[topic, partition], ...]}}}``. It has no
``doc_id``, so no read of document states ever takes it for a document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from embedstream.stream.errors import SinkError
from embedstream.stream.store import Handover

__all__ = ["handover_payload", "parse_handover"]


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
