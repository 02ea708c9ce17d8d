"""Qdrant Edge sink: an embedded Qdrant shard in this process, on local disk.

Layout under ``path``, for each physical collection: the chunk collection
``<collection>/`` (one point per chunk, the default dense vector, cosine), the
state collection ``<collection>_state/`` (one point per document holding its
:class:`~embedstream.stream.store.DocState`, plus the fingerprint point and maybe the
handover point) and the lock file ``.<collection>.lock``; for the store, the
aliases (``aliases.json``, see :mod:`embedstream.sinks._edge_files`).

``open`` takes the alias's target (see :mod:`embedstream.stream.store`); else a collection
named like the alias (made before aliases); else, given a fingerprint, creates
``<alias>_<UTC timestamp>`` and then the alias, under the aliases lock (two
processes creating a store at once end up on one collection, the second
refused its lock), unless collections made for the alias exist (then the
alias was lost: ``open`` refuses). The alias is written last: an interrupted
creation leaves an unaliased collection (``collections list`` shows it),
never an alias to nothing.

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
* ``open``, ``apply``, ``flush`` and the handover writes raise
  :class:`~embedstream.stream.errors.StoreDiskFull`, having written nothing,
  while the filesystem of ``path`` has less than ``min_free_bytes`` free (see
  :mod:`embedstream.sinks.disk`): on a full one, Edge would die with SIGBUS.

Not guaranteed: consistency of ``points()`` with writes made while iterating;
use from several threads at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from embedstream.sinks._collection import CHUNKS, STATE, CollectionSink, Part, Schema
from embedstream.sinks._edge_files import AliasRegistry, ProcessLock, is_shard, lock_path
from embedstream.sinks._edge_filters import chunk_filter, edge_filter
from embedstream.sinks._edge_index import chunk_config, maintenance_at_open, search_params
from embedstream.sinks._edge_shards import (
    PAYLOAD_SCHEMAS,
    edge_sparse,
    state_config,
    state_vectors,
    write_wal_options,
    written_sparse,
)
from embedstream.sinks._layout import (
    CHUNK_BOUND,
    SCROLL_PAGE,
    StatePoint,
    WritePlan,
    new_physical_name,
    not_ours_message,
)
from embedstream.sinks.disk import DiskGuard, FreeBytes, free_bytes
from embedstream.stream.config import IndexSettings
from embedstream.stream.errors import FingerprintMismatch, NeedsOperator, SinkError
from embedstream.stream.filters import FieldType, Filter
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.sparse import SPARSE_NAME, SparseVector

__all__ = ["QdrantEdgeSink", "open_fingerprint"]

# Lock file (real path) -> fingerprint of each collection open in this process:
# another process's shard cannot be read, and neither can our own from a second
# handle, so the admin asks here.
_OPEN: dict[str, Fingerprint] = {}


def open_fingerprint(lock_file: Path) -> Fingerprint | None:
    """The fingerprint of the collection of ``lock_file`` if a sink of this
    process has it open; ``None`` otherwise."""
    return _OPEN.get(os.path.realpath(lock_file))


class QdrantEdgeSink(CollectionSink):
    """Chunk points in a local Qdrant Edge shard (see the module docstring)."""

    _STORE = "Qdrant Edge"
    _TRIM_BY_ID = True  # one writer, under the process lock (see _layout)

    def __init__(self, path: Path | str, collection: str, *,
                 physical: str | None = None, min_free_bytes: int = 0,
                 free: FreeBytes = free_bytes,
                 filter_fields: Mapping[str, FieldType] | None = None,
                 index: IndexSettings | None = None) -> None:
        """``collection`` is the configured name (an alias). ``physical``, when
        given, is the physical collection ``open`` uses or creates instead,
        without reading or touching any alias (a rebuild fills a new collection
        this way while the live consumer keeps using the alias).
        ``min_free_bytes`` is ``sink.min_free_bytes`` (0: no check); ``free``
        tells the free space of the filesystem holding a path. ``filter_fields``
        (``source.filter_fields``) get payload indexes of their types. ``index``
        (``sink.index``) says how the chunk vectors are indexed and searched; it is
        applied at every open (see :mod:`embedstream.sinks._edge_index`)."""
        self._path = Path(path)
        self._index_settings = index or IndexSettings()
        self._search_params = search_params(self._index_settings)
        self._written_since_optimize = 0  # chunk points written (or deleted) since
        self._maintenance_held = False  # too much unindexed at open (see maintenance_at_open)
        super().__init__(collection, physical, str(self._path), filter_fields)
        self._disk = DiskGuard(self._path, min_free_bytes, lambda: self._where, free)
        self._aliases = AliasRegistry(self._path)
        self._lock: ProcessLock | None = None
        self._lock_file: str | None = None
        self._chunks: qe.EdgeShard | None = None
        self._state: qe.EdgeShard | None = None

    @property
    def _chunks_where(self) -> str:
        return f"{self._where}: {self._path / self._collection}"

    # -- lifecycle ---------------------------------------------------------

    def _start(self) -> None:
        if self._lock is not None:
            raise SinkError(f"{self._where} is already open")
        self._disk.check()  # opening writes too (and creating reserves the most)
        with self._errors("open"):
            self._path.mkdir(parents=True, exist_ok=True)

    def _read_aliases(self) -> Mapping[str, str]:
        return self._aliases.read()

    def _create_behind_alias(self, fingerprint: Fingerprint) -> bool:
        """Under the aliases lock, so two processes creating a store at once
        end up on one collection."""
        try:
            with self._aliases.changing() as aliases:
                if self._alias in aliases:
                    return False
                name = self._open_leftover(
                    {d.name for d in self._path.iterdir() if is_shard(d)}, fingerprint)
                if name is None:
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
        """Lock it first; with ``via_alias``, check once the lock is held that
        the alias still points at ``name`` (nothing stays open when not)."""
        self._collection = name
        file = lock_path(self._path, name)
        lock = ProcessLock.take(file, self._where)
        try:
            if via_alias:
                if self._aliases.read().get(self._alias) != name:
                    lock.release()
                    return False
                if not (self._has(name) or self._has(self._name(STATE))):
                    raise NeedsOperator(
                        f"alias {self._alias!r} at {self._path} points at {name!r}, which does "
                        "not exist; point it at another collection with `embedstream "
                        "collections switch NAME` (`embedstream collections list` shows them)")
            stored = self._open_collection(fingerprint)
        except BaseException:
            self._close_shards()
            lock.release()
            raise
        self._lock = lock
        self._lock_file = os.path.realpath(file)
        _OPEN[self._lock_file] = stored
        return True

    def flush(self) -> None:
        self._check_open()
        self._disk.check()
        with self._errors("flush"):
            self._flush_shards()

    def close(self) -> None:
        """Flush and close both shards and release the lock. Safe to call twice.
        On a nearly full disk the flush is left out (what it would make durable
        was never committed in Kafka, so it is replayed)."""
        try:
            if self._disk.has_room():
                with self._errors("flush"):
                    self._flush_shards()
        finally:
            self._close_shards()
            if self._lock_file is not None:
                _OPEN.pop(self._lock_file, None)
                self._lock_file = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def maintenance_due(self) -> bool:
        every = self._index_settings.maintenance.every_points
        return (every > 0 and not self._maintenance_held
                and self._written_since_optimize >= every)

    def maintain(self) -> None:
        """Run the optimizer on the chunk shard: index (quantize) the segments that
        passed the indexing threshold, merge small ones up to the maximum segment size,
        vacuum those with many deletions. It holds the interpreter while it runs, so the
        consumer calls it every ``sink.index.maintenance.every_points`` written, which
        bounds each run; the state shard is never optimized (module docstring)."""
        self._check_open()
        self._disk.check()  # an optimization writes new segments before dropping old ones
        with self._errors("optimize"):
            self._shard(CHUNKS).optimize()
        self._written_since_optimize = 0
        self._maintenance_held = False

    def _flush_shards(self) -> None:
        for shard in (self._chunks, self._state):
            if shard is not None:
                shard.flush()

    def _close_shards(self) -> None:
        for shard in (self._chunks, self._state):
            if shard is not None:
                with contextlib.suppress(Exception):  # closing must not mask the first error
                    shard.close()
        self._chunks = self._state = None

    # -- the primitives of CollectionSink ------------------------------------

    def _check_open(self) -> None:
        self._shard(CHUNKS)
        self._shard(STATE)

    def _shard(self, part: Part) -> qe.EdgeShard:
        shard = self._chunks if part == CHUNKS else self._state
        if shard is None:
            raise SinkError(f"{self._where} is not open")
        return shard

    def _has(self, name: str) -> bool:
        # EdgeShard.load on an empty directory fails after creating files in it,
        # so only directories with content count as existing shards.
        directory = self._path / name
        return directory.is_dir() and any(directory.iterdir())

    def _load(self, part: Part, size: int | None = None) -> None:
        # The chunk shard is loaded with its config, so a change of sink.index applies.
        self._loaded(part, size if part == CHUNKS else None)

    def _loaded(self, part: Part, size: int | None) -> qe.EdgeShard:
        directory = self._path / self._name(part)
        try:
            shard = qe.EdgeShard.load(str(directory),
                                  None if size is None else self._config(part, size))
        except Exception as exc:
            if "incompatible" in str(exc).lower():  # another vector size
                raise FingerprintMismatch(not_ours_message(self._collection, str(exc))) from exc
            raise self._translate("open", exc) from exc
        self._keep(part, shard)
        return shard

    def _adopt(self, part: Part, size: int) -> None:
        # The state shard is open already (its fingerprint was looked for), and
        # loaded without a size: a leftover's state vectors are not checked.
        shard = (self._state if part == STATE and self._state is not None
                 else self._loaded(part, size))
        with self._errors("open"):
            held = shard.count(qe.CountRequest(exact=True))
        if held:
            raise FingerprintMismatch(not_ours_message(self._collection, f"{held} points"))
        if part == STATE:  # made for another retrieval.sparse, its writes would all fail
            sparse = written_sparse(self._path / self._name(part))
            if sparse is not None:  # else only the WAL options: no shard was made yet
                self._check_leftover_sparse(*sparse)

    def _make(self, part: Part, size: int) -> None:
        # Loaded, not created, so that the WAL options apply (see write_wal_options).
        directory = self._path / self._name(part)
        write_wal_options(directory)
        self._keep(part, qe.EdgeShard.load(str(directory), self._config(part, size)))

    def _config(self, part: Part, size: int) -> qe.EdgeConfig:
        if part == CHUNKS:
            return chunk_config(size, self._index_settings)
        return state_config(size, self.sparse, self._sparse_idf)

    def _before_write(self) -> None:
        self._disk.check()

    def _keep(self, part: Part, shard: qe.EdgeShard) -> None:
        if part == CHUNKS:
            self._chunks = shard
            start = maintenance_at_open(shard, self._index_settings, self._chunks_where)
            if start is not None:
                self._written_since_optimize, self._maintenance_held = start
        else:
            self._state = shard

    def _index(self, part: Part, field: str, schema: Schema) -> None:
        self._shard(part).update(
            qe.UpdateOperation.create_field_index(field, PAYLOAD_SCHEMAS[schema]))

    def _indexed(self, part: Part) -> Mapping[str, str]:
        names = {schema: name for name, schema in PAYLOAD_SCHEMAS.items()}
        return {field: names.get(info.data_type, str(info.data_type))
                for field, info in self._shard(part).info().payload_schema.items()}

    def _state_payloads(self, ids: Sequence[str]) -> list[Mapping[str, Any] | None]:
        found = self._shard(STATE).retrieve(list(ids), with_payload=True, with_vector=False)
        return [record.payload for record in found]

    def _put_states(self, points: list[StatePoint], durable: bool = False) -> None:
        # Like every update, in the WAL once update() returns (see the module docstring).
        state = self._shard(STATE)
        state.update(qe.UpdateOperation.upsert_points(
            [qe.Point(pid, state_vectors(sparse), payload) for pid, payload, sparse in points]))
        if durable:
            state.flush()

    def _raise_bounds(self, raises: Mapping[int, list[str]]) -> None:
        # In the WAL on return, like every update; flushed with the next checkpoint.
        state = self._shard(STATE)
        for bound, ids in raises.items():
            state.update(qe.UpdateOperation.set_payload(list[Any](ids), {CHUNK_BOUND: bound}))

    def _write_chunks(self, plan: WritePlan) -> None:
        chunks = self._shard(CHUNKS)
        # Deletions count too: the optimizer vacuums segments that have many.
        self._written_since_optimize += (len(plan.chunks) + len(plan.leftovers)
                                         + sum(map(len, plan.trims.values())))
        if plan.chunks:
            chunks.update(qe.UpdateOperation.upsert_points(
                [qe.Point(pid, vector, payload) for pid, vector, payload in plan.chunks]))
        if plan.leftovers:
            chunks.update(qe.UpdateOperation.delete_points(list[Any](plan.leftovers)))
        for keep, doc_ids in plan.trims.items():
            chunks.update(qe.UpdateOperation.delete_points_by_filter(chunk_filter(doc_ids, keep)))

    def _scroll_page(self, doc_ids: list[str] | None, payload: bool | list[str],
                     offset: Any) -> tuple[list[qe.Record], Any]:
        only = None if doc_ids is None else chunk_filter(doc_ids)
        return self._shard(CHUNKS).scroll(qe.ScrollRequest(
            offset=offset, limit=SCROLL_PAGE, filter=only, with_payload=payload,
            with_vector=True))

    def _nearest(self, vector: list[float], limit: int,
                 only: Filter | None) -> list[qe.ScoredPoint]:
        return self._shard(CHUNKS).query(qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(vector), with_payload=True,
            filter=None if only is None else edge_filter(only), params=self._search_params))

    def _nearest_documents(self, vector: SparseVector, limit: int,
                           only: Filter | None) -> list[qe.ScoredPoint]:
        return self._shard(STATE).query(qe.QueryRequest(
            limit=limit, query=qe.Query.Nearest(edge_sparse(vector), using=SPARSE_NAME),
            with_payload=True, filter=None if only is None else edge_filter(only)))

    def _documents_page(self, offset: Any) -> tuple[list[qe.Record], Any]:
        return self._shard(STATE).scroll(qe.ScrollRequest(
            offset=offset, limit=SCROLL_PAGE, with_payload=True, with_vector=[SPARSE_NAME]))

    def _translate(self, what: str, exc: Exception) -> SinkError:
        if "WouldBlock" in str(exc):  # the shard's own WAL lock, held without ours
            return SinkError(f"{self._where} is in use by another process; a Qdrant Edge "
                             "store can be opened by one process at a time")
        return SinkError(f"{self._where}: {what} failed: {exc}")

