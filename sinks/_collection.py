"""What both Qdrant sinks do alike, over primitives each store supplies.

:class:`CollectionSink` holds every decision of a sink that does not depend
on the client library: how ``open`` resolves the alias (its target; else a
collection named like the alias, made before aliases; else, given a
fingerprint, a new ``<alias>_<UTC timestamp>``, unless collections made for
the alias exist: then the alias was lost, and the sink refuses), how it
checks the stored fingerprint, adopts an empty leftover of an interrupted creation or creates
both collections (fingerprint point last), and the reads, the order of writes
and the handover record. A sink subclasses it and supplies the abstract
primitives (:mod:`embedstream.sinks._collection_primitives`): single calls on its
store, none of which decides anything.

Guaranteed: both sinks make these decisions alike, in this order, with the
same point ids, payloads and messages (each naming its own store and
location). Not here: how a store is reached, locked, flushed or closed, how a
new collection gets its alias (each sink's ``_create_behind_alias``), and
which exceptions become which error (each sink's ``_translate``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from embedstream.sinks._collection_primitives import CollectionPrimitives
from embedstream.sinks._documents import DocumentVectors
from embedstream.sinks._handover import HandoverRecords
from embedstream.sinks._layout import (
    CHUNKS,
    FINGERPRINT_POINT_ID,
    STATE,
    STATE_SUFFIX,
    STATE_VECTOR,
    Part,
    Record,
    Schema,
    Scored,
    alias_missing_message,
    as_floats,
    chunk_bounds,
    dense_vector,
    document_field_indexes,
    made_for,
    parse_fingerprint,
    payload_indexes,
    plan_writes,
    state_from_payload,
)
from embedstream.stream.errors import ConfigError, FingerprintMismatch, NeedsOperator, SinkError
from embedstream.stream.filters import FieldType, Filter
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.names import name_error
from embedstream.stream.store import (
    DocState,
    DocumentWrite,
    Hit,
    StoredPoint,
    doc_state_point_id,
)

__all__ = ["CHUNKS", "STATE", "CollectionSink", "Part", "Record", "Schema", "Scored",
           "translated"]

# How often open resolves the alias again when it moved while opening.
_RESOLVE_ATTEMPTS = 5


@contextlib.contextmanager
def translated(translate: Callable[[Exception], SinkError], *,
               keep_cause: bool) -> Iterator[None]:
    """Raise what ``translate`` makes of any exception but embedstream's own
    (a SinkError or FingerprintMismatch passes unchanged). Without
    ``keep_cause`` the original is dropped from the traceback."""
    try:
        yield
    except (SinkError, FingerprintMismatch):
        raise
    except Exception as exc:
        raise translate(exc) from (exc if keep_cause else None)


class CollectionSink(CollectionPrimitives, HandoverRecords, DocumentVectors):
    """A sink of one chunk collection and its state companion (see the module
    docstring). ``alias`` is the configured name; ``physical``, when given,
    the physical collection ``open`` uses or creates instead, without reading
    or touching any alias; ``at`` where the store is, for messages;
    ``filter_fields`` the payload fields to index by type (``source.filter_fields``)."""

    _STORE: ClassVar[str]  # the store's name in messages
    _KEEP_CAUSE: ClassVar[bool] = True  # whether a translated error keeps its cause
    # Whether leftovers go by id, bounded by each state's chunk_bound (see _layout):
    # sound only where this sink is the store's one writer and reads what it wrote.
    _TRIM_BY_ID: ClassVar[bool] = False

    def __init__(self, alias: str, physical: str | None, at: str,
                 filter_fields: Mapping[str, FieldType] | None = None) -> None:
        # The one name rule, before any name reaches a path or a request.
        problem = (name_error(alias, "sink.collection", alias=True)
                   or (physical and name_error(physical, "physical collection")))
        if problem:
            raise ConfigError(problem)
        self._alias = alias
        self._forced = physical
        self._collection = physical or alias
        self._at = at
        self._filter_fields = dict(filter_fields or {})
        self._indexes = payload_indexes(self._filter_fields)
        # Known once open: the fingerprint's sparse spec ("none": no sparse vectors).
        self._sparse_spec = "none"

    @property
    def collection(self) -> str:
        return self._collection

    @property
    def _where(self) -> str:
        alias = f" (alias {self._alias!r})" if self._collection != self._alias else ""
        return f"{self._STORE} collection {self._collection!r}{alias} at {self._at}"

    @property
    def _chunks_where(self) -> str:
        """How a message names the chunk collection (per store where it differs)."""
        return self._where

    def _name(self, part: Part) -> str:
        return self._collection if part == CHUNKS else f"{self._collection}{STATE_SUFFIX}"

    def _before_write(self) -> None:
        """Raise SinkUnavailable when a write must wait (the Edge sink: a nearly
        full disk); a store that cannot tell writes on."""
        return

    def _open_leftover(self, names: Collection[str], fingerprint: Fingerprint) -> str | None:
        """Before a collection is created behind the missing alias: with none made
        for it among ``names`` (the store's collections), None (create one). The
        only one made for it, holding no points, is a first creation cut short
        (killed, or the disk filled, before the alias was written): it is opened
        and its name returned, to be adopted. Anything else means the alias was
        lost, and a new, empty collection would hide what they hold: refused."""
        found = made_for(self._alias, names)
        if not found:
            return None
        if len(found) == 1:
            try:
                self._open_physical(found[0], fingerprint, via_alias=False)
            except (SinkError, FingerprintMismatch):
                self.close()  # not one to adopt (e.g. only its state is left): refused
            else:
                if next(iter(self.points()), None) is None:
                    return found[0]
                self.close()
        raise NeedsOperator(alias_missing_message(self._alias, self._at, found))

    # -- opening -------------------------------------------------------------

    def open(self, fingerprint: Fingerprint | None) -> None:
        self._start()
        if self._forced is not None:
            with self._errors("open"):
                aliases = self._read_aliases()
            if self._forced in aliases:
                raise SinkError(f"{self._forced!r} at {self._at} is an alias, not a "
                                "physical collection")
            self._open_physical(self._forced, fingerprint, via_alias=False)
            return
        for _ in range(_RESOLVE_ATTEMPTS):
            with self._errors("open"):
                target = self._read_aliases().get(self._alias)
                legacy = target is None and (  # a store made before aliases
                    self._has(self._alias) or self._has(f"{self._alias}{STATE_SUFFIX}"))
            if target is not None:
                if self._open_physical(target, fingerprint, via_alias=True):
                    return
                continue  # switched while we were opening: resolve again
            if legacy:
                self._open_physical(self._alias, fingerprint, via_alias=False)
                return
            if fingerprint is None:
                raise SinkError(f"{self._where} does not exist (or was not made by embedstream)")
            if self._create_behind_alias(fingerprint):
                return
        raise SinkError(f"alias {self._alias!r} at {self._at} kept changing while opening; "
                        "try again")

    def _open_physical(self, name: str, fingerprint: Fingerprint | None,
                       via_alias: bool) -> bool:
        """Open (or, given a fingerprint, create) the physical collection
        ``name``. False when, ``via_alias``, the alias moved meanwhile (a store
        that can tell overrides this)."""
        self._collection = name
        self._open_collection(fingerprint)
        return True

    def _open_collection(self, fingerprint: Fingerprint | None) -> Fingerprint:
        """Open (or create) both parts of ``self._collection``; the fingerprint
        it holds."""
        stored: Fingerprint | None = None
        with self._errors("open"):
            if self._has(self._name(STATE)):
                self._load(STATE)
                found = self._state_payloads([FINGERPRINT_POINT_ID])
                stored = parse_fingerprint(found[0] if found else None, self._collection)
            chunks_exist = self._has(self._collection)
        if stored is not None:
            if fingerprint is not None:
                fingerprint.require_compatible(stored, self._collection)
            self._sparse_spec = stored.sparse
            if not chunks_exist:
                raise SinkError(f"{self._chunks_where} is missing although its state "
                                "collection exists; delete both to rebuild")
            with self._errors("open"):
                self._load(CHUNKS, stored.dimension)
            if fingerprint is not None:  # a writer: add the indexes of new filter fields
                with self._errors("create a payload index"):
                    self._add_indexes()
            return stored
        if fingerprint is None:
            raise SinkError(f"{self._where} does not exist (or was not made by embedstream)")
        # No fingerprint: a new collection, or a creation interrupted before its
        # last step (writing the fingerprint). An empty leftover of the right shape
        # is adopted; anything else was not made by embedstream and is refused.
        self._sparse_spec = fingerprint.sparse
        with self._errors("create"):
            if chunks_exist:
                self._adopt(CHUNKS, fingerprint.dimension)
            else:
                self._make(CHUNKS, fingerprint.dimension)
            if self._has(self._name(STATE)):
                self._adopt(STATE, len(STATE_VECTOR))
            else:
                self._make(STATE, len(STATE_VECTOR))
            for part, field, schema in self._all_indexes():
                self._index(part, field, schema)
            # Written last: its presence marks the creation as complete.
            self._put_states([(FINGERPRINT_POINT_ID, {"fingerprint": fingerprint.to_json()},
                               None)])
        return fingerprint

    def _add_indexes(self) -> None:
        """Index what is not indexed (as its type): a filter field added to the
        settings later needs no rebuild, as Qdrant indexes existing points."""
        have = {part: self._indexed(part) for part in (CHUNKS, STATE)}
        for part, field, schema in self._all_indexes():
            if have[part].get(field) != schema:
                self._index(part, field, schema)

    # -- reads and writes ----------------------------------------------------

    def document_states(self, doc_ids: Collection[str]) -> dict[str, DocState]:
        self._check_open()
        if not doc_ids:
            return {}
        wanted = set(doc_ids)
        with self._errors("retrieve"):
            payloads = self._state_payloads([doc_state_point_id(d) for d in wanted])
        found = (state_from_payload(p) for p in payloads)
        return {doc_id: s for doc_id, s in filter(None, found) if doc_id in wanted}

    def apply(self, writes: Sequence[DocumentWrite]) -> None:
        self._check_open()
        self._before_write()
        bounds: dict[str, int] | None = None
        if self._TRIM_BY_ID:
            with self._errors("write"):
                # One read for the batch: it lets leftovers go by id (see _layout).
                bounds = chunk_bounds(self._state_payloads(
                    list({doc_state_point_id(w.doc_id) for w in writes})))
        plan = plan_writes(writes, bounds)
        with self._errors("write"):
            if plan.raises:  # before any chunk, so a crash leaves the bound above them
                self._raise_bounds(plan.raises)
            self._write_chunks(plan)
            # States last: a crash before this line leaves the old states, so the
            # writes are replayed (see embedstream.stream.store).
            if plan.states:
                self._put_states(plan.states)

    def stored_vectors(self, doc_ids: Collection[str]) -> dict[str, list[float]]:
        if not doc_ids:
            return {}
        return {
            digest: dense_vector(record.vector)
            for record in self._scroll(sorted(doc_ids), ["content_hash"])
            if isinstance(digest := (record.payload or {}).get("content_hash"), str)
        }

    def search(self, vector: Sequence[float], limit: int,
               filter: Filter | None = None) -> list[Hit]:
        self._check_open()
        if limit <= 0:
            return []
        with self._errors("search"):
            found = self._nearest(as_floats(vector), limit, filter or None)
        return [Hit(str(p.id), p.score, p.payload or {}) for p in found]

    def points(self) -> Iterator[StoredPoint]:
        for record in self._scroll(None, True):
            yield StoredPoint(str(record.id), dense_vector(record.vector), record.payload or {})

    def _all_indexes(self) -> tuple[tuple[Part, str, Schema], ...]:
        """The payload indexes of the open collection: with sparse vectors, its
        states' document fields too (a sparse search filters on them)."""
        if not self.sparse:
            return self._indexes
        return self._indexes + document_field_indexes(self._filter_fields)

    def _scroll(self, doc_ids: list[str] | None, payload: bool | list[str]) -> Iterator[Record]:
        """Every chunk record (of ``doc_ids``, or all), with its vector, page by page."""
        self._check_open()
        offset: Any = None
        while True:
            with self._errors("scroll"):
                records, offset = self._scroll_page(doc_ids, payload, offset)
            yield from records
            if offset is None:
                return

    def _errors(self, what: str) -> contextlib.AbstractContextManager[None]:
        """Translate what the store raises while doing ``what``."""
        return translated(lambda exc: self._translate(what, exc), keep_cause=self._KEEP_CAUSE)
