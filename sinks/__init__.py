"""Vector stores that embedstream writes to.

:func:`build_sink` makes the configured one; :func:`build_admin` the admin of
its store (collections and aliases). ``QdrantServerSink`` is imported
on first use only: ``qdrant_client`` takes about a second to import, which
commands using the Edge sink should not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sinks.base import (
    ChunkPoint,
    CollectionInfo,
    DocState,
    DocumentWrite,
    Handover,
    Hit,
    Sink,
    SinkAdmin,
    StoredPoint,
    Vector,
    chunk_point_id,
    doc_state_point_id,
)
from sinks.factory import build_admin, build_sink
from sinks.qdrant_edge import QdrantEdgeSink

if TYPE_CHECKING:
    from sinks.qdrant_server import QdrantServerSink

__all__ = [
    "ChunkPoint",
    "CollectionInfo",
    "DocState",
    "DocumentWrite",
    "Handover",
    "Hit",
    "QdrantEdgeSink",
    "QdrantServerSink",
    "Sink",
    "SinkAdmin",
    "StoredPoint",
    "Vector",
    "build_admin",
    "build_sink",
    "chunk_point_id",
    "doc_state_point_id",
]


def __getattr__(name: str) -> Any:
    if name == "QdrantServerSink":
        from sinks.qdrant_server import QdrantServerSink

        return QdrantServerSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
