"""Building a sink from settings.

The sink modules are imported only when a sink of their kind is built, so
that using the Edge sink never pays for importing ``qdrant_client`` (about a
second).
"""

from __future__ import annotations

from typing import assert_never

from sinks.base import Sink
from stream.config import SinkSettings
from stream.errors import ConfigError

__all__ = ["build_sink"]

def build_sink(settings: SinkSettings) -> Sink:
    """The sink ``settings.kind`` names, not yet opened.

    Raises :class:`~stream.errors.ConfigError` naming the field when the
    settings cannot describe a working sink. Nothing is connected or created
    until ``open``."""
    if settings.kind == "qdrant-edge":
        from sinks.qdrant_edge import QdrantEdgeSink

        return QdrantEdgeSink(settings.path, settings.collection)
    if settings.kind == "qdrant":
        if not settings.url:
            raise ConfigError(
                "sink.url is required when sink.kind is 'qdrant' "
                "(http://host:6333, https://..., or ':memory:' for an in-process store)"
            )
        from sinks.qdrant_server import QdrantServerSink

        return QdrantServerSink.from_settings(settings)
    assert_never(settings.kind)
