"""The Sink protocol and the plain data it takes and gives.

A sink applies whole-document writes. What every sink guarantees:

* ``apply`` is visible to reads when it returns, and survives a crash of this
  process (SIGKILL included).
* ``flush`` makes every write applied before it durable against a crash of the
  machine as well (power loss, kernel panic). The consumer commits Kafka
  offsets only after ``flush`` returns, so the two together lose nothing.
* Each :class:`DocumentWrite` replaces the document's whole chunk set. Chunks
  beyond ``len(chunks)`` left by a longer earlier version are deleted; a
  deletion removes every chunk.
* The document's :class:`DocState` (version, source, deleted) is written after
  its chunks, so a crash in between leaves the old state and the write is
  simply applied again on replay (writes are idempotent).

What is not guaranteed: atomicity across documents in one ``apply`` call. The
consumer only commits Kafka offsets after ``apply`` and ``flush`` return, so a
partial apply is always replayed.

Names: a sink is built with the configured ``sink.collection``, which is an
*alias*. ``open`` resolves it once to a physical collection
(``<alias>_<UTC timestamp>``, or, in a store made before aliases, the
collection named like the alias) and keeps using that one, even when the
alias is switched later: a caller notices a switch with
:meth:`SinkAdmin.resolve` and reopens. :class:`SinkAdmin` lists, switches and
drops collections.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from embedstream.stream.filters import Filter
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.sparse import SparseVector

__all__ = [
    "ChunkPoint",
    "CollectionInfo",
    "DocState",
    "DocumentWrite",
    "Handover",
    "Hit",
    "Sink",
    "SinkAdmin",
    "StoredDocument",
    "StoredPoint",
    "Vector",
    "chunk_point_id",
    "doc_state_point_id",
]

# Fixed namespaces: point ids must be identical across processes and releases.
_CHUNK_NAMESPACE = uuid.UUID("6f1d4e8a-2b7c-5d3e-9f4a-1c2b3d4e5f60")
_STATE_NAMESPACE = uuid.UUID("0b5e7c9d-3a1f-5e2d-8c4b-6a7f8e9d0c1b")


# A dense vector: a float32 numpy row or a plain sequence of floats.
Vector = Sequence[float] | npt.NDArray[np.float32]


def chunk_point_id(doc_id: str, chunk_index: int) -> str:
    """Deterministic point id of a document's chunk (a UUIDv5 string)."""
    return str(uuid.uuid5(_CHUNK_NAMESPACE, f"{doc_id}\x00{chunk_index}"))


def doc_state_point_id(doc_id: str) -> str:
    """Deterministic id of a document's state record in the state collection."""
    return str(uuid.uuid5(_STATE_NAMESPACE, doc_id))


@dataclass(frozen=True, slots=True)
class DocState:
    """What the store last applied for a document, and where it came from.

    The version guard (:mod:`embedstream.stream.plan`) compares an event with
    this: ``version`` (with ``versioned``: whether the source gave it, or it is
    only a Kafka offset), the log it was read from (``topic``,
    ``partition``, ``topic_id``) at ``offset``, and the record's Kafka
    ``timestamp_ms``. ``topic`` None: no log recorded (a bulk rebuild's file
    row, or a state stored by an earlier release), ordered by
    ``(version, offset)`` alone as then.
    """

    version: int
    offset: int
    deleted: bool
    versioned: bool = True
    topic: str | None = None
    partition: int | None = None
    topic_id: str | None = None
    timestamp_ms: int | None = None
    # Made by a Kafka tombstone, which carries no version: ``version`` is the
    # one it kept, and another log's events are weighed against it by timestamp.
    tombstone: bool = False

    @property
    def order_key(self) -> tuple[int, int]:
        return (self.version, self.offset)


@dataclass(frozen=True, slots=True)
class ChunkPoint:
    """One chunk's vector and payload. ``payload`` holds ``doc_id``,
    ``chunk_index``, ``text``, ``start``, ``end``, ``version``, ``content_hash``
    and the configured metadata and filter fields."""

    chunk_index: int
    vector: Vector
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """The new state of one document: its full chunk set, or a deletion.

    ``sparse``: the document's sparse vector (a collection with ``retrieval.sparse``
    on), stored with its state, with ``fields`` (the document's metadata and filter
    fields) beside it so a sparse search filters as a dense one does. ``None`` for a
    deletion, and for a document whose text has no term: it then has none, and
    no sparse search finds it."""

    doc_id: str
    state: DocState
    chunks: Sequence[ChunkPoint] = field(default_factory=tuple)
    sparse: SparseVector | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StoredDocument:
    """A live document's sparse vector as stored (for export)."""

    doc_id: str
    sparse: SparseVector
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StoredPoint:
    id: str
    vector: list[float]
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Handover:
    """Where the stream takes over from a bulk rebuild.

    ``offsets``: per ``(topic, partition)``, the first offset the rebuilt
    collection does not reflect. ``acknowledged``: per consumer group id, the
    partitions that group has already moved to its handover offset. The sink
    stores the record; what it means is the rebuild's and consumer's business.
    """

    offsets: Mapping[tuple[str, int], int]
    acknowledged: Mapping[str, frozenset[tuple[str, int]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """One physical collection as :meth:`SinkAdmin.collections` lists it.

    ``points`` is the chunk count; ``fingerprint`` is ``None`` for a collection
    embedstream did not make (or whose fingerprint this version cannot read).
    ``in_use`` (Qdrant Edge only): a sink has it open, so it cannot be read:
    ``points`` is ``None``, and so is ``fingerprint`` unless that sink is in
    this process. A Qdrant server cannot tell, so there it is always false."""

    name: str
    points: int | None
    aliases: tuple[str, ...]
    fingerprint: Fingerprint | None
    in_use: bool = False


class Sink(Protocol):
    """A vector store holding one collection of chunk points."""

    @property
    def collection(self) -> str:
        """The physical collection this sink uses once open. Before ``open``:
        the forced physical name if one was given, else the configured alias."""
        ...

    def open(self, fingerprint: Fingerprint | None) -> None:
        """Create the collection (dimension and cosine distance from the
        fingerprint, payload indexes on ``doc_id``, ``version``, ``chunk_index``
        and each filter field the sink was built with) or check that the
        existing one was made under the same fingerprint, then, given a
        fingerprint, create the payload indexes of filter fields it lacks
        (Qdrant indexes the points already there; no rebuild).

        Raises :class:`~embedstream.stream.errors.FingerprintMismatch` when it was not.
        ``None`` opens an existing collection without checking (for reading
        it, e.g. ``export``); a missing one is a :class:`SinkError`."""
        ...

    def document_states(self, doc_ids: Collection[str]) -> dict[str, DocState]:
        """Stored state of the given documents; unknown ones are absent."""
        ...

    def apply(self, writes: Sequence[DocumentWrite]) -> None:
        """Apply the writes: visible to reads and safe from a process crash on
        return (see the module docstring)."""
        ...

    def flush(self) -> None:
        """Make every applied write durable against a machine crash. Called
        before each offset commit; a store whose writes are durable on
        ``apply`` makes this a no-op."""
        ...

    def maintenance_due(self) -> bool:
        """Whether :meth:`maintain` has work to do now (cheap: no I/O)."""
        ...

    def maintain(self) -> None:
        """Bring the store's index up to date with what was written (Qdrant Edge: run
        the optimizer; a server does this by itself, so there it does nothing). Its
        duration grows with what was written since the last call, not with the store,
        except for the first call after an open, which also tidies what a crash left
        (Qdrant Edge: seconds for a large store). The consumer makes that one before it
        joins its group, the others between batches when :meth:`maintenance_due` says
        so; a rebuild calls it once, before its new collection is swapped in."""
        ...

    def stored_vectors(self, doc_ids: Collection[str]) -> dict[str, list[float]]:
        """Vectors of the chunks now stored for these documents, by ``content_hash``.

        Lets an update reuse the vector of an unchanged chunk text instead of
        embedding it again. Sound because every vector in a collection was made
        under the collection's fingerprint, and the key is a hash of the exact
        input embedded (the chunk's text, under its title header with
        ``source.title_field``), so a vector is never attached to a different input."""
        ...

    def search(self, vector: Sequence[float], limit: int,
               filter: Filter | None = None) -> list[Hit]:
        """Nearest chunks by cosine similarity, best first; with ``filter``, only
        chunks that match it (see :mod:`embedstream.stream.filters`)."""
        ...

    def search_sparse(self, vector: SparseVector, limit: int,
                      filter: Filter | None = None) -> list[Hit]:
        """Documents by their sparse vector (dot product, with the store's ``Idf``
        modifier applied), best first; a hit's payload holds ``doc_id``. With
        ``filter``, only documents whose fields match it. A collection without
        sparse vectors finds nothing."""
        ...

    @property
    def sparse(self) -> bool:
        """Whether the open collection holds document sparse vectors."""
        ...

    def points(self) -> Iterator[StoredPoint]:
        """Every chunk point with its vector and payload (for export)."""
        ...

    def documents(self) -> Iterator[StoredDocument]:
        """Every live document's sparse vector (for export); nothing when the
        collection holds none."""
        ...

    def write_handover(self, offsets: Mapping[tuple[str, int], int]) -> None:
        """Store a handover record with these offsets and no acknowledgements in
        this collection, replacing any earlier one. Durable against a machine
        crash when it returns."""
        ...

    def read_handover(self) -> Handover | None:
        """The stored handover record, or ``None`` when there is none."""
        ...

    def acknowledge_handover(self, group_id: str,
                             partitions: Collection[tuple[str, int]]) -> None:
        """Add ``partitions`` to ``group_id``'s acknowledgements (durable on
        return, like :meth:`write_handover`). A read-modify-write: two processes
        acknowledging at the same instant may lose one's change, so each
        partition must be acknowledged by one process at a time (its owner).
        Raises :class:`~embedstream.stream.errors.SinkError` when there is no record."""
        ...

    def close(self) -> None:
        """Flush and release the store."""
        ...


class SinkAdmin(Protocol):
    """Collections and aliases of one store (built by
    :func:`embedstream.sinks.factory.build_admin`). Names are physical collection names
    unless a parameter says ``alias``. Errors are
    :class:`~embedstream.stream.errors.SinkError` with a message meant for the user."""

    def resolve(self, alias: str) -> str | None:
        """The collection ``alias`` points at now, or ``None`` when there is no
        such alias (a collection of that name made before aliases is not an
        alias). Reads the store afresh on every call; cheap enough to call
        about once a second."""
        ...

    def probe(self, alias: str) -> None:
        """Check, creating nothing, that a sink for ``alias`` could be opened now:
        the store answers, its directory is writable, the collection is not held
        by another process. :class:`~embedstream.stream.errors.SinkError` says why
        not (a start-up check, before the model loads)."""
        ...

    def switch(self, alias: str, target: str) -> str | None:
        """Point ``alias`` at the physical collection ``target`` in one atomic
        step (readers see the old target or the new one, never no alias) and
        return the previous target. Refuses a target that does not exist or
        holds no embedstream fingerprint. The previous target is kept."""
        ...

    def collections(self) -> list[CollectionInfo]:
        """Every physical collection in the store, by name, without the
        ``_state`` companions (they belong to their collection)."""
        ...

    def drop(self, name: str, force: bool = False) -> None:
        """Delete the physical collection ``name`` and its ``_state`` companion.
        Refuses a name that is not an embedstream collection, and one an alias
        points at unless ``force`` (which removes those aliases too)."""
        ...

    def close(self) -> None:
        """Release the connection. Safe to call twice."""
        ...
