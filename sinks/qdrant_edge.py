"""Qdrant Edge sink: an embedded Qdrant shard in this process, on local disk.

Layout under ``path``: the chunk collection ``<collection>/`` (one point per
chunk, the default dense vector, cosine), the state collection
``<collection>_state/`` (one point per document holding its
:class:`~sinks.base.DocState`, plus one point holding the fingerprint) and the
lock file ``.<collection>.lock``.

Guarantees, beyond those of :mod:`sinks.base`:

* ``apply`` survives a crash of this process (SIGKILL included) when it
  returns: every update goes through the shard's write-ahead log, which Edge
  writes through a memory map, so the kernel holds it once ``update`` returns.
* ``flush`` syncs both shards to disk, making the writes survive a crash of the
  machine too. It costs 10-20 ms on an idle disk and up to ~0.4 s for 1,000
  chunks on a busy one, which is why ``apply`` does not do it by default: the
  consumer calls ``flush`` once per ``sink.flush_interval_ms``, before it
  commits offsets.
* One process at a time: ``open`` takes an exclusive ``flock`` on the lock file
  and raises :class:`~stream.errors.SinkError` naming the holder's pid
  otherwise. The lock dies with its process, so no stale lock survives a crash.

Not guaranteed: consistency of ``points()`` with writes made while iterating;
use from several threads at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from sinks._layout import (
    FINGERPRINT_POINT_ID,
    SCROLL_PAGE,
    STATE_SUFFIX,
    STATE_VECTOR,
    as_floats,
    dense_vector,
    not_ours_message,
    parse_fingerprint,
    plan_writes,
    state_from_payload,
)
from sinks.base import DocState, DocumentWrite, Hit, StoredPoint, doc_state_point_id
from stream.errors import ConfigError, FingerprintMismatch, SinkError
from stream.fingerprint import Fingerprint

__all__ = ["QdrantEdgeSink"]

_CHUNK_INDEXES = (
    ("doc_id", qe.PayloadSchemaType.Keyword),
    ("version", qe.PayloadSchemaType.Integer),
    ("chunk_index", qe.PayloadSchemaType.Integer),
)


class _ProcessLock:
    """An exclusive ``flock`` on a file holding the owner's pid.

    ``flock`` locks belong to the open file, so a second open in the same
    process is refused too, and the kernel drops the lock when its owner dies.
    """

    def __init__(self, file: Path, what: str) -> None:
        self._fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            who = ("this process" if holder == str(os.getpid()) else "another process")
            raise SinkError(
                f"{what} is in use by {who} (pid {holder}); a Qdrant Edge store can be "
                "opened by one process at a time. Stop that process (e.g. the running "
                "consumer) and try again."
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        # Closing the descriptor drops the lock; the file stays, as deleting it
        # would race with a process that has just opened it.
        os.close(self._fd)


class QdrantEdgeSink:
    """Chunk points in a local Qdrant Edge shard (see the module docstring)."""

    def __init__(self, path: Path | str, collection: str) -> None:
        if not collection or collection in {".", ".."} or "/" in collection:
            raise ConfigError(f"sink.collection {collection!r} is not a valid collection name")
        self._path = Path(path)
        self._collection = collection
        self._where = f"Qdrant Edge collection {collection!r} at {self._path}"
        self._lock: _ProcessLock | None = None
        self._chunks: qe.EdgeShard | None = None
        self._state: qe.EdgeShard | None = None

    # -- lifecycle ---------------------------------------------------------

    def open(self, fingerprint: Fingerprint | None) -> None:
        if self._lock is not None:
            raise SinkError(f"{self._where} is already open")
        with self._errors("open"):
            self._path.mkdir(parents=True, exist_ok=True)
        lock = _ProcessLock(self._path / f".{self._collection}.lock", self._where)
        try:
            self._open_shards(fingerprint)
        except BaseException:
            self._close_shards()
            lock.release()
            raise
        self._lock = lock

    def _open_shards(self, fingerprint: Fingerprint | None) -> None:
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
            return
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

    def close(self) -> None:
        """Flush and close both shards and release the lock. Safe to call twice."""
        try:
            with self._errors("flush"):
                for shard in (self._chunks, self._state):
                    if shard is not None:
                        shard.flush()
        finally:
            self._close_shards()
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
