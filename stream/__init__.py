"""embedstream: keep a Qdrant index in step with a changing corpus.

This package is the core: events, decoding, chunking, embedding, the plan of
each write, the consumer loop, settings, errors and the store protocol that
:mod:`embedstream.sinks` implements. It imports nothing from ``embedstream.sinks``,
``embedstream.bulk`` or :mod:`embedstream.stream.app` (the command line and the
wiring); import-linter checks that.

The public surface is what ``__all__`` names; modules starting with ``_`` are
internal and may change.
"""

from __future__ import annotations

__version__ = "0.1.0"

from embedstream.stream.chunking import Chunk, Chunker
from embedstream.stream.config import Settings, load_settings
from embedstream.stream.embedding import Embedder
from embedstream.stream.errors import (
    ConfigError,
    DecodeError,
    EmbedderError,
    EmbedderUnavailable,
    EmbedFailures,
    EmbedstreamError,
    FingerprintMismatch,
    KafkaUnavailable,
    SinkError,
    SinkUnavailable,
    SourceError,
    Unavailable,
)
from embedstream.stream.events import ChangeEvent, Op, Position, Skipped
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import (
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

__all__ = [
    "ChangeEvent",
    "Chunk",
    "ChunkPoint",
    "Chunker",
    "CollectionInfo",
    "ConfigError",
    "DecodeError",
    "DocState",
    "DocumentWrite",
    "EmbedFailures",
    "Embedder",
    "EmbedderError",
    "EmbedderUnavailable",
    "EmbedstreamError",
    "Fingerprint",
    "FingerprintMismatch",
    "Handover",
    "Hit",
    "KafkaUnavailable",
    "Op",
    "Position",
    "Settings",
    "Sink",
    "SinkAdmin",
    "SinkError",
    "SinkUnavailable",
    "Skipped",
    "SourceError",
    "StoredPoint",
    "Unavailable",
    "Vector",
    "__version__",
    "chunk_point_id",
    "doc_state_point_id",
    "load_settings",
]
