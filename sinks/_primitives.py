"""What every mixin of :class:`~embedstream.sinks._collection.CollectionSink` needs from it:
the primitives the sink itself supplies, declared once."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

__all__ = ["SinkPrimitives"]


class SinkPrimitives(ABC):
    @property
    @abstractmethod
    def _where(self) -> str:
        """The collection and store, as messages name them."""

    @abstractmethod
    def _check_open(self) -> None: ...

    @abstractmethod
    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]: ...
