"""Building a sink, or the admin of its store, from settings.

The sink modules are imported only when a sink of their kind is built, so
that using the Edge sink never pays for importing ``qdrant_client`` (about a
second).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import assert_never

from embedstream.stream.config import SinkSettings
from embedstream.stream.errors import ConfigError
from embedstream.stream.filters import FieldType
from embedstream.stream.store import Sink, SinkAdmin

__all__ = ["build_admin", "build_sink"]


def build_sink(settings: SinkSettings, physical: str | None = None,
               filter_fields: Mapping[str, FieldType] | None = None) -> Sink:
    """The sink ``settings.kind`` names, not yet opened.

    It opens ``settings.collection`` through the alias of that name, or, given
    ``physical``, exactly that physical collection, never touching the alias
    (see :mod:`embedstream.stream.store`). ``filter_fields``
    (``source.filter_fields``) get payload indexes of their types. Raises
    :class:`~embedstream.stream.errors.ConfigError` naming
    the field when the settings cannot describe a working sink. Nothing is
    connected or created until ``open``."""
    if settings.kind == "qdrant-edge":
        from embedstream.sinks.qdrant_edge import QdrantEdgeSink

        return QdrantEdgeSink(settings.path, settings.collection, physical=physical,
                              min_free_bytes=settings.min_free_bytes,
                              filter_fields=filter_fields, index=settings.index)
    if settings.kind == "qdrant":
        _require_url(settings)
        from embedstream.sinks.qdrant_server import QdrantServerSink

        return QdrantServerSink.from_settings(settings, physical=physical,
                                              filter_fields=filter_fields)
    assert_never(settings.kind)


def build_admin(settings: SinkSettings) -> SinkAdmin:
    """The admin (collections and aliases) of the store ``settings`` describe.

    Raises :class:`~embedstream.stream.errors.ConfigError` like :func:`build_sink`. Close
    it when done. Nothing is created; a server client is made but not yet
    contacted."""
    if settings.kind == "qdrant-edge":
        from embedstream.sinks._edge_admin import QdrantEdgeAdmin

        return QdrantEdgeAdmin(settings.path)
    if settings.kind == "qdrant":
        _require_url(settings)
        from embedstream.sinks._server_admin import QdrantServerAdmin

        return QdrantServerAdmin(settings)
    assert_never(settings.kind)


def _require_url(settings: SinkSettings) -> None:
    if not settings.url:
        raise ConfigError(
            "sink.url is required when sink.kind is 'qdrant' "
            "(http://host:6333, https://..., or ':memory:' for an in-process store)"
        )
