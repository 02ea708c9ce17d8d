"""embedstream: keep a Qdrant index in step with a changing corpus.

The public surface is what ``__all__`` names; modules starting with anything
else are internal and may change.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .chunking import Chunk, Chunker
from .config import Settings, load_settings
from .embedding import Embedder
from .errors import (
    ConfigError,
    DecodeError,
    EmbedderError,
    EmbedderUnavailable,
    EmbedFailures,
    EmbedstreamError,
    FingerprintMismatch,
    SinkError,
    SinkUnavailable,
    Unavailable,
)
from .events import ChangeEvent, Op, Position, Skipped
from .fingerprint import Fingerprint

__all__ = [
    "ChangeEvent",
    "Chunk",
    "Chunker",
    "ConfigError",
    "DecodeError",
    "EmbedFailures",
    "Embedder",
    "EmbedderError",
    "EmbedderUnavailable",
    "EmbedstreamError",
    "Fingerprint",
    "FingerprintMismatch",
    "Op",
    "Position",
    "Settings",
    "SinkError",
    "SinkUnavailable",
    "Skipped",
    "Unavailable",
    "__version__",
    "load_settings",
]
