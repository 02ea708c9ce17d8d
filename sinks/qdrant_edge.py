"""Qdrant Edge sink: an embedded Qdrant shard in this process, on local disk.

Layout under ``path``, for each physical collection: the chunk collection
``<collection>/`` (one point per chunk, the default dense vector, cosine), the
state collection ``<collection>_state/`` (one point per document holding its
:class:`~embedstream.sinks.base.DocState`, plus the fingerprint point and maybe the
handover point) and the lock file ``.<collection>.lock``; for the store, the
aliases (``aliases.json``, see :mod:`embedstream.sinks._edge_files`).

``open`` takes the alias's target (see :mod:`embedstream.stream.store`); else a collection
named like the alias (made before aliases); else, given a fingerprint, creates
``<alias>_<UTC timestamp>`` and then the alias, under the aliases lock (two
processes creating a store at once end up on one collection, the second
refused its lock). The alias is written last: an interrupted creation leaves
an unaliased collection (``collections list`` shows it), never an alias to
nothing.

Guarantees, beyond those of :mod:`embedstream.stream.store`:

* ``apply`` survives a crash of this process (SIGKILL included) when it
  returns: every update goes through the shard's write-ahead log, which Edge
  writes through a memory map, so the kernel holds it once ``update`` returns.
* ``flush`` syncs both shards to disk, making the writes survive a crash of the
  machine too. It costs 10-20 ms on an idle disk and up to ~0.4 s for 1,000
  chunks on a busy one, which is why ``apply`` does not do it by default: the
  consumer calls ``flush`` once per ``sink.flush_interval_ms``, before it
  commits offsets.
* One process at a time per physical collection: ``open`` takes an exclusive
  ``flock`` on its lock file and raises :class:`~embedstream.stream.errors.SinkError`
  naming the holder's pid otherwise. The lock dies with its process, so no
  stale lock survives a crash.

Not guaranteed: consistency of ``points()`` with writes made while iterating;
use from several threads at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from embedstream.sinks._edge_files import AliasRegistry, ProcessLock, lock_path
from embedstream.sinks._handover import HandoverMethods
from embedstream.sinks._layout import (
    FINGERPRINT_POINT_ID,
    HANDOVER_POINT_ID,
    SCROLL_PAGE,
    STATE_SUFFIX,
    STATE_VECTOR,
    as_floats,
    dense_vector,
    new_physical_name,
    not_ours_message,
    parse_fingerprint,
    plan_writes,
    state_from_payload,
    valid_name,
)
from embedstream.stream.errors import ConfigError, FingerprintMismatch, SinkError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import DocState, DocumentWrite, Hit, StoredPoint, doc_state_point_id

__all__ = ["QdrantEdgeSink", "open_fingerprint"]

_CHUNK_INDEXES = (
    ("doc_id", qe.PayloadSchemaType.Keyword),
    ("version", qe.PayloadSchemaType.Integer),
    ("chunk_index", qe.PayloadSchemaType.Integer),
)
# How often open resolves the alias again when it moved while opening.
_RESOLVE_ATTEMPTS = 5
# Lock file (real path) -> fingerprint of each collection open in this process:
# another process's shard cannot be read, and neither can our own from a second
# handle, so the admin asks here.
_OPEN: dict[str, Fingerprint] = {}


def open_fingerprint(lock_file: Path) -> Fingerprint | None:
    """The fingerprint of the collection of ``lock_file`` if a sink of this
    process has it open; ``None`` otherwise."""
    return _OPEN.get(os.path.realpath(lock_file))


class QdrantEdgeSink(HandoverMethods):
    """Chunk points in a local Qdrant Edge shard (see the module docstring)."""

    def __init__(self, path: Path | str, collection: str, *,
                 physical: str | None = None) -> None:
        """``collection`` is the configured name (an alias). ``physical``, when
        given, is the physical collection ``open`` uses or creates instead,
        without reading or touching any alias (a rebuild fills a new collection
        this way while the live consumer keeps using the alias)."""
        for name, what in ((collection, "sink.collection"), (physical, "physical collection")):
            if name is not None and not valid_name(name):
                raise ConfigError(f"{what} {name!r} is not a valid collection name")
        self._path = Path(path)
        self._alias = collection
        self._forced = physical
        self._collection = physical or collection
        self._aliases = AliasRegistry(self._path)
        self._lock: ProcessLock | None = None
        self._lock_file: str | None = None
        self._chunks: qe.EdgeShard | None = None
        self._state: qe.EdgeShard | None = None

    @property
    def collection(self) -> str:
        return self._collection

    @property
    def _where(self) -> str:
        alias = f" (alias {self._alias!r})" if self._collection != self._alias else ""
        return f"Qdrant Edge collection {self._collection!r}{alias} at {self._path}"

    # -- lifecycle ---------------------------------------------------------

    def open(self, fingerprint: Fingerprint | None) -> None:
        if self._lock is not None:
            raise SinkError(f"{self._where} is already open")
        with self._errors("open"):
            self._path.mkdir(parents=True, exist_ok=True)
        if self._forced is not None:
            if self._forced in self._aliases.read():
                raise SinkError(f"{self._forced!r} at {self._path} is an alias, not a "
                                "physical collection")
            self._open_physical(self._forced, fingerprint, via_alias=False)
            return
        for _ in range(_RESOLVE_ATTEMPTS):
            target = self._aliases.read().get(self._alias)
            if target is not None:
                if self._open_physical(target, fingerprint, via_alias=True):
                    return
                continue  # switched while we were opening: resolve again
            if self._exists(self._alias):  # a store made before aliases
                self._open_physical(self._alias, fingerprint, via_alias=False)
                return
            if fingerprint is None:
                raise SinkError(f"{self._where} does not exist (or was not made by embedstream)")
            if self._create_behind_alias(fingerprint):
                return
        raise SinkError(f"alias {self._alias!r} at {self._path} kept changing while opening; "
                        "try again")

    def _create_behind_alias(self, fingerprint: Fingerprint) -> bool:
        """Create ``<alias>_<timestamp>`` and then the alias; False when another
        process created the alias first (the caller resolves it again)."""
        try:
            with self._aliases.changing() as aliases:
                if self._alias in aliases:
                    return False
                name = new_physical_name(
                    self._alias, lambda n: n in aliases or (self._path / n).exists())
                self._open_physical(name, fingerprint, via_alias=False)
                self.flush()  # on disk before the alias can lead anyone to it
                aliases[self._alias] = name  # written on leaving the block
        except BaseException:
            self.close()
            raise
        return True

    def _open_physical(self, name: str, fingerprint: Fingerprint | None,
                       via_alias: bool) -> bool:
        """Lock and open (or create) the physical collection ``name``. With
        ``via_alias``, False when the alias no longer points at ``name`` once
        the lock is held (nothing stays open then)."""
        self._collection = name
        file = lock_path(self._path, name)
        lock = ProcessLock.take(file, self._where)
        try:
            if via_alias:
                if self._aliases.read().get(self._alias) != name:
                    lock.release()
                    return False
                if not self._exists(name):
                    raise SinkError(
                        f"alias {self._alias!r} at {self._path} points at {name!r}, which does "
                        f"not exist; point it at another collection or remove it from "
                        f"{self._path / 'aliases.json'}")
            stored = self._open_shards(fingerprint)
        except BaseException:
            self._close_shards()
            lock.release()
            raise
        self._lock = lock
        self._lock_file = os.path.realpath(file)
        _OPEN[self._lock_file] = stored
        return True

    def _exists(self, name: str) -> bool:
        return _has_files(self._path / name) or _has_files(self._path / f"{name}{STATE_SUFFIX}")

    def _open_shards(self, fingerprint: Fingerprint | None) -> Fingerprint:
        """Open (or create) both shards; the fingerprint the collection holds."""
        chunk_dir = self._path / self._collection
        state_dir = self._path / f"{self._collection}{STATE_SUFFIX}"
        stored: Fingerprint | None = None
        if _has_files(state_dir):
            self._state = self._load(state_dir)
            stored = self._read_fingerprint(self._state)
        if stored is None and fingerprint is None:
            raise SinkError(f"{self._where} does not exist (or was not made by embedstream)")
        if stored is not None:
            if fingerprint is not None:
                fingerprint.require_compatible(stored, self._collection)
            if not _has_files(chunk_dir):
                raise SinkError(f"{self._where}: {chunk_dir} is missing although its state "
                                "collection exists; delete both to rebuild")
            self._chunks = self._load(chunk_dir)
            return stored
        # No fingerprint: a new store, or a creation interrupted before its last
        # step (writing the fingerprint). An empty leftover is adopted; one with
        # points was not made by embedstream and is refused.
        assert fingerprint is not None
        chunk_config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=fingerprint.dimension, distance=qe.Distance.Cosine))
        if _has_files(chunk_dir):
            self._chunks = self._load(chunk_dir, chunk_config)  # refuses another dimension
            self._refuse_points(self._chunks)
        else:
            with self._errors("create"):
                self._chunks = qe.EdgeShard.create(str(chunk_dir), chunk_config)
        if self._state is not None:
            self._refuse_points(self._state)
        else:
            with self._errors("create"):
                self._state = qe.EdgeShard.create(str(state_dir), qe.EdgeConfig(
                    vectors=qe.EdgeVectorParams(size=1, distance=qe.Distance.Cosine)))
        with self._errors("create"):
            for name, schema in _CHUNK_INDEXES:
                self._chunks.update(qe.UpdateOperation.create_field_index(name, schema))
            self._state.update(
                qe.UpdateOperation.create_field_index("doc_id", qe.PayloadSchemaType.Keyword))
            # Written last: its presence marks the creation as complete. Like
            # every update it is in the WAL once update() returns.
            self._state.update(qe.UpdateOperation.upsert_points([qe.Point(
                FINGERPRINT_POINT_ID, STATE_VECTOR, {"fingerprint": fingerprint.to_json()})]))
        return fingerprint

    def close(self) -> None:
        """Flush and close both shards and release the lock. Safe to call twice."""
        try:
            with self._errors("flush"):
                for shard in (self._chunks, self._state):
                    if shard is not None:
                        shard.flush()
        finally:
            self._close_shards()
            if self._lock_file is not None:
                _OPEN.pop(self._lock_file, None)
                self._lock_file = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _close_shards(self) -> None:
        for shard in (self._chunks, self._state):
            if shard is not None:
                with contextlib.suppress(Exception):  # closing must not mask the first error
                    shard.close()
        self._chunks = self._state = None

    # -- reads and writes --------------------------------------------------

    def document_states(self, doc_ids: Collection[str]) -> dict[str, DocState]:
        state = self._open_state()
        if not doc_ids:
            return {}
        wanted = set(doc_ids)
        with self._errors("retrieve"):
            records = state.retrieve([doc_state_point_id(d) for d in wanted],
                                     with_payload=True, with_vector=False)
        found = (state_from_payload(r.payload) for r in records)
        return {doc_id: s for doc_id, s in filter(None, found) if doc_id in wanted}

    def apply(self, writes: Sequence[DocumentWrite]) -> None:
        chunks, state = self._open_chunks(), self._open_state()
        plan = plan_writes(writes)
        with self._errors("write"):
            # Order is the crash-safety argument of sinks.base: chunks, then
            # leftovers, then state (so a crash in between is replayed).
            if plan.chunks:
                chunks.update(qe.UpdateOperation.upsert_points(
                    [qe.Point(pid, vector, payload) for pid, vector, payload in plan.chunks]))
            for keep, doc_ids in plan.trims.items():
                chunks.update(
                    qe.UpdateOperation.delete_points_by_filter(_trim_filter(doc_ids, keep)))
            if plan.states:
                state.update(qe.UpdateOperation.upsert_points(
                    [qe.Point(pid, STATE_VECTOR, payload) for pid, payload in plan.states]))

    def flush(self) -> None:
        chunks, state = self._open_chunks(), self._open_state()
        with self._errors("flush"):
            chunks.flush()
            state.flush()

    def stored_vectors(self, doc_ids: Collection[str]) -> dict[str, list[float]]:
        if not doc_ids:
            return {}
        only = qe.Filter(must=[qe.FieldCondition("doc_id", match=qe.MatchAny(sorted(doc_ids)))])
        return {
            digest: dense_vector(record.vector)
            for record in self._scroll(only, ["content_hash"])
            if isinstance(digest := (record.payload or {}).get("content_hash"), str)
        }

    def search(self, vector: Sequence[float], limit: int) -> list[Hit]:
        chunks = self._open_chunks()
        if limit <= 0:
            return []
        request = qe.QueryRequest(limit=limit, query=qe.Query.Nearest(as_floats(vector)),
                                  with_payload=True)
        with self._errors("search"):
            found = chunks.query(request)
        return [Hit(str(p.id), p.score, p.payload or {}) for p in found]

    def points(self) -> Iterator[StoredPoint]:
        for record in self._scroll(None, True):
            yield StoredPoint(str(record.id), dense_vector(record.vector), record.payload or {})

    # -- handover (the record's logic is in HandoverMethods) ----------------

    def _handover_payload(self) -> Mapping[str, Any] | None:
        state = self._open_state()
        with self._errors("read the handover record"):
            found = state.retrieve([HANDOVER_POINT_ID], with_payload=True, with_vector=False)
        return found[0].payload if found else None

    def _replace_handover_payload(self, payload: dict[str, Any]) -> None:
        state = self._open_state()
        with self._errors("write the handover record"):
            state.update(qe.UpdateOperation.upsert_points(
                [qe.Point(HANDOVER_POINT_ID, STATE_VECTOR, payload)]))
            state.flush()  # a rare control record: durable at once, not at the next flush

    def _scroll(self, only: qe.Filter | None, payload: bool | list[str]) -> Iterator[qe.Record]:
        """Every chunk record (matching ``only``), with its vector, page by page."""
        chunks = self._open_chunks()
        offset: Any = None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=SCROLL_PAGE, filter=only,
                                       with_payload=payload, with_vector=True)
            with self._errors("scroll"):
                records, offset = chunks.scroll(request)
            yield from records
            if offset is None:
                return

    # -- helpers -----------------------------------------------------------

    def _open_chunks(self) -> qe.EdgeShard:
        if self._chunks is None:
            raise SinkError(f"{self._where} is not open")
        return self._chunks

    def _open_state(self) -> qe.EdgeShard:
        if self._state is None:
            raise SinkError(f"{self._where} is not open")
        return self._state

    def _load(self, directory: Path, config: qe.EdgeConfig | None = None) -> qe.EdgeShard:
        try:
            return qe.EdgeShard.load(str(directory), config)
        except Exception as exc:
            if "incompatible" in str(exc).lower():
                raise FingerprintMismatch(not_ours_message(self._collection, str(exc))) from exc
            raise self._error("open", exc) from exc

    def _read_fingerprint(self, state: qe.EdgeShard) -> Fingerprint | None:
        with self._errors("open"):
            found = state.retrieve([FINGERPRINT_POINT_ID], with_payload=True, with_vector=False)
        raw = (found[0].payload or {}).get("fingerprint") if found else None
        return parse_fingerprint(raw, self._collection)

    def _refuse_points(self, shard: qe.EdgeShard) -> None:
        """A shard with points but no fingerprint was not made by embedstream."""
        with self._errors("open"):
            held = shard.count(qe.CountRequest(exact=True))
        if held:
            raise FingerprintMismatch(not_ours_message(self._collection, f"{held} points"))

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (SinkError, FingerprintMismatch):
            raise
        except Exception as exc:
            raise self._error(what, exc) from exc

    def _error(self, what: str, exc: Exception) -> SinkError:
        if "WouldBlock" in str(exc):  # the shard's own WAL lock, held without ours
            return SinkError(f"{self._where} is in use by another process; a Qdrant Edge "
                             "store can be opened by one process at a time")
        return SinkError(f"{self._where}: {what} failed: {exc}")


def _has_files(directory: Path) -> bool:
    # EdgeShard.load on an empty directory fails after creating files in it, so
    # only directories with content count as existing shards.
    return directory.is_dir() and any(directory.iterdir())


def _trim_filter(doc_ids: list[str], keep: int) -> qe.Filter:
    must: list[Any] = [qe.FieldCondition("doc_id", match=qe.MatchAny(doc_ids))]
    if keep > 0:
        must.append(qe.FieldCondition("chunk_index", range=qe.RangeFloat(gte=keep)))
    return qe.Filter(must=must)
