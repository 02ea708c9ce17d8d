"""The primitives each Qdrant sink supplies to
:class:`~embedstream.sinks._collection.CollectionSink`: single calls on its store, none of
which decides anything (the decisions, made over them, are the collection sink's)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from embedstream.sinks._layout import Part, Record, Schema, Scored, StatePoint, WritePlan
from embedstream.sinks._primitives import SinkPrimitives
from embedstream.stream.errors import SinkError
from embedstream.stream.filters import Filter
from embedstream.stream.fingerprint import Fingerprint

__all__ = ["CollectionPrimitives"]


class CollectionPrimitives(SinkPrimitives):
    """What :class:`~embedstream.sinks._collection.CollectionSink` asks of its store; a
    sink subclasses the collection sink and supplies these."""

    @abstractmethod
    def close(self) -> None:
        """Release the store (flushing first where it can); safe to call twice."""

    @abstractmethod
    def _start(self) -> None:
        """Get ready to open: reach the store, refuse a second open."""

    @abstractmethod
    def _check_open(self) -> None:
        """Raise SinkError unless the sink is open."""

    @abstractmethod
    def _read_aliases(self) -> Mapping[str, str]:
        """Every alias of the store and the collection it points at."""

    @abstractmethod
    def _has(self, name: str) -> bool:
        """Whether the store holds a collection named ``name``."""

    @abstractmethod
    def _create_behind_alias(self, fingerprint: Fingerprint) -> bool:
        """Create ``<alias>_<timestamp>``, open it and point the alias at it;
        False when the caller must resolve the alias again."""

    @abstractmethod
    def _load(self, part: Part, size: int | None = None) -> None:
        """Make the existing ``part`` usable (``size``: its vectors' size, where known)."""

    @abstractmethod
    def _adopt(self, part: Part, size: int) -> None:
        """Make the existing ``part``, which holds no fingerprint, usable if it
        is an empty leftover with vectors of ``size``; raise FingerprintMismatch
        otherwise."""

    @abstractmethod
    def _make(self, part: Part, size: int) -> None:
        """Create ``part`` with cosine vectors of ``size``; the state part also with
        the sparse vector when ``self.sparse`` (the ``Idf`` modifier when
        ``self._sparse_idf``)."""

    @abstractmethod
    def _index(self, part: Part, field: str, schema: Schema) -> None:
        """Create a payload index on ``field`` of ``part``."""

    @abstractmethod
    def _indexed(self, part: Part) -> Mapping[str, str]:
        """The payload indexes ``part`` has: field to schema type (as ``Schema``)."""

    @abstractmethod
    def _state_payloads(self, ids: Sequence[str]) -> list[Mapping[str, Any] | None]:
        """The payloads of the state points of these ids that exist."""

    @abstractmethod
    def _put_states(self, points: list[StatePoint], durable: bool = False) -> None:
        """Upsert state points (with their sparse vectors where given: the state
        part then has them, see ``_make``); ``durable``: on disk on return, not at
        the next flush."""

    def _raise_bounds(self, raises: Mapping[int, list[str]]) -> None:
        """Set ``chunk_bound`` to each given value on those state points (existing
        ones), leaving the rest of their payloads as they are. Only a sink with
        ``_TRIM_BY_ID`` is asked."""
        raise NotImplementedError(f"{type(self).__name__} keeps no chunk bounds")

    @abstractmethod
    def _write_chunks(self, plan: WritePlan) -> None:
        """Upsert the plan's chunks, then delete its leftovers (by id; only with
        ``_TRIM_BY_ID``) and trims (by filter)."""

    @abstractmethod
    def _scroll_page(self, doc_ids: list[str] | None, payload: bool | list[str],
                     offset: Any) -> tuple[Sequence[Record], Any]:
        """One page of chunk records with their vectors (of ``doc_ids``, or
        all), and the offset of the next (None after the last)."""

    @abstractmethod
    def _nearest(self, vector: list[float], limit: int,
                 only: Filter | None) -> Sequence[Scored]:
        """The ``limit`` chunk points nearest ``vector`` (among those ``only``
        matches, when given), with their payloads."""

    @abstractmethod
    def _translate(self, what: str, exc: Exception) -> SinkError:
        """``exc``, raised while doing ``what``, as embedstream's error."""
