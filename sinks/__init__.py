"""Vector stores that embedstream writes to: implementations of the store
protocol of :mod:`embedstream.stream.store`.

:func:`build_sink` makes the configured one; :func:`build_admin` the admin of
its store (collections and aliases). ``QdrantServerSink`` is imported
on first use only: ``qdrant_client`` takes about a second to import, which
commands using the Edge sink should not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from embedstream.sinks.factory import build_admin, build_sink
from embedstream.sinks.qdrant_edge import QdrantEdgeSink

if TYPE_CHECKING:
    from embedstream.sinks.qdrant_server import QdrantServerSink

__all__ = [
    "QdrantEdgeSink",
    "QdrantServerSink",
    "build_admin",
    "build_sink",
]


def __getattr__(name: str) -> Any:
    if name == "QdrantServerSink":
        from embedstream.sinks.qdrant_server import QdrantServerSink

        return QdrantServerSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
