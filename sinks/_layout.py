"""The store layout both Qdrant sinks share.

Both sinks keep two collections: the chunk collection ``<collection>`` (one
point per chunk, id :func:`~embedstream.stream.store.chunk_point_id`) and the state
collection ``<collection>_state`` (one point per document, id
:func:`~embedstream.stream.store.doc_state_point_id`, payload ``doc_id``, ``version``,
``offset``, ``deleted``, ``chunk_bound``; plus the fingerprint point and, once a
rebuild has written one, the handover point).

``chunk_bound`` lets a write delete a document's leftover chunks by id, where a
filter on ``doc_id`` would search every segment (it costs most in a large,
optimized store). Invariant: no chunk of the document has an index at or above
it. A write that grows a document raises it (``set_payload`` on the state point)
before any chunk is written, and the state written last sets it to the chunk
count; so a crash anywhere in between leaves it an upper bound, and the replayed
write deletes whatever the cut-short one left. A document without one (no state
yet, or a state written before the field existed) is trimmed by filter. Only the
Qdrant Edge sink keeps bounds: it is its store's one writer (a process lock) and
reads what it wrote. A server's replicas may answer a read with an older bound,
and a consumer that lost its partitions may still be writing, so a leftover
missed there would stay for good; a filter delete finds it at the next write.

The helpers here are that shared layout, independent of the client library.

Sparse vectors (``retrieval.sparse`` on, named in the fingerprint): a live document's
state point also holds its sparse vector, named ``sparse`` (modifier ``Idf``), and its
metadata under the payload key ``fields``. So the documents are exactly the points
that have a sparse vector, and the store's IDF counts documents, not chunks (the
fingerprint and handover points, and a deleted document's state, have none; Qdrant
counts only points that have the vector). A sparse search filters on
``fields.<name>`` (indexed as the chunk collection indexes ``<name>``). The write
that replaces a document's chunks replaces its state point with them, so its sparse
vector changes with its text, in the same fenced write, and goes with a delete.

Names: the configured ``sink.collection`` is an alias; the physical collections
behind it are ``<alias>_<UTC timestamp>`` (:func:`new_physical_name`). A store
made before aliases holds a physical collection named like the alias itself.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

import numpy as np

from embedstream.stream.errors import FingerprintMismatch, SinkError
from embedstream.stream.filters import Condition, FieldType, Filter
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.names import name_problem
from embedstream.stream.sparse import SPARSE_NAME, SparseVector, as_pairs
from embedstream.stream.store import (
    DocState,
    DocumentWrite,
    StoredDocument,
    Vector,
    chunk_point_id,
    doc_state_point_id,
)

STATE_SUFFIX = "_state"
CHUNK_BOUND = "chunk_bound"  # the state payload field (see the module docstring)
Part = Literal["chunks", "state"]  # the chunk collection or its state companion
CHUNKS: Part = "chunks"
STATE: Part = "state"
Schema = Literal["keyword", "integer"] | FieldType  # a payload index's type
# The payload indexes every collection gets, in this order.
_INDEXES: tuple[tuple[Part, str, Schema], ...] = (
    (CHUNKS, "doc_id", "keyword"),
    (CHUNKS, "version", "integer"),
    (CHUNKS, "chunk_index", "integer"),
    (STATE, "doc_id", "keyword"),
)
# Fixed id of the fingerprint point in the state collection (uuid5 of
# "embedstream:fingerprint"); state points use uuid5 ids of another namespace.
FINGERPRINT_POINT_ID = "c1c86a3b-311e-5a2e-9268-cdbaef47be79"
# Fixed id of the handover point (uuid5(NAMESPACE_URL, "embedstream:handover")).
# Neither special point has a ``doc_id``, so no state read takes one for a document.
HANDOVER_POINT_ID = "87458333-df8c-5469-a4ac-fe359ead1600"
STATE_VECTOR = [1.0]  # state points need some dense vector; it is never searched
# A state point's payload key holding its document's fields (metadata and filter
# fields), beside its sparse vector: a sparse search filters on ``fields.<name>``.
DOC_FIELDS = "fields"
SCROLL_PAGE = 256
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# The shape of a new_physical_name: <alias>_<timestamp>, optionally _<n>.
_STAMP = r"_\d{8}T\d{6}Z(?:_\d+)?"
_PHYSICAL = re.compile(f".+{_STAMP}")


def payload_indexes(filter_fields: Mapping[str, FieldType]
                    ) -> tuple[tuple[Part, str, Schema], ...]:
    """The payload indexes a collection has: embedstream's own, then one per
    filter field (``source.filter_fields``) on the chunks, of its type."""
    own = {field for part, field, _ in _INDEXES if part == CHUNKS}
    return _INDEXES + tuple((CHUNKS, name, kind) for name, kind in filter_fields.items()
                            if name not in own)


def document_field_indexes(filter_fields: Mapping[str, FieldType]
                           ) -> tuple[tuple[Part, str, Schema], ...]:
    """The state collection's indexes of the documents' filter fields (a collection
    with sparse vectors): ``fields.<name>``, of its type."""
    return tuple((STATE, f"{DOC_FIELDS}.{name}", kind) for name, kind in filter_fields.items())


def state_filter(filter: Filter | None) -> Filter | None:
    """``filter`` (on filter fields, as the chunks hold them) on the state points'
    ``fields.<name>``; ``None`` or an empty filter: ``None``."""
    if not filter:
        return None

    def moved(conditions: tuple[Condition, ...]) -> tuple[Condition, ...]:
        return tuple(replace(c, field=f"{DOC_FIELDS}.{c.field}") for c in conditions)

    return Filter(must=moved(filter.must), must_not=moved(filter.must_not))


def stored_document(record: Record) -> StoredDocument | None:
    """A state record (read with its vectors) as a live document with its sparse
    vector; ``None`` for a point without one (special points, deleted documents)."""
    payload = record.payload or {}
    vector = record.vector
    sparse = vector.get(SPARSE_NAME) if isinstance(vector, Mapping) else None
    if "doc_id" not in payload or sparse is None:
        return None
    return StoredDocument(str(payload["doc_id"]), as_pairs(sparse),
                          dict(payload.get(DOC_FIELDS) or {}))


def valid_name(name: str, *, alias: bool = False) -> bool:
    """Whether ``name`` can name a collection (``alias``: an alias) in either
    store, by the one rule of :mod:`embedstream.stream.names` (it is also a
    directory name for Qdrant Edge: no path separators, no dot names, short
    enough for every name derived from it)."""
    return name_problem(name, alias=alias) is None


def new_physical_name(alias: str, taken: Callable[[str], bool],
                      now: float | None = None) -> str:
    """``<alias>_<UTC timestamp>``, or with ``_2``, ``_3``... appended when
    ``taken`` says that name (or its state companion) is in use already."""
    base = f"{alias}_{time.strftime(TIMESTAMP_FORMAT, time.gmtime(now))}"
    name, n = base, 1
    while taken(name) or taken(f"{name}{STATE_SUFFIX}"):
        n += 1
        name = f"{base}_{n}"
    return name


def looks_physical(name: str) -> bool:
    """Whether ``name`` has the shape :func:`new_physical_name` gives."""
    return bool(_PHYSICAL.fullmatch(name))


def made_for(alias: str, names: Collection[str]) -> list[str]:
    """The collections among ``names`` made for ``alias`` (``<alias>_<timestamp>``,
    or only its state companion, left by an interrupted drop), sorted."""
    shape = re.compile(re.escape(alias) + _STAMP)
    return sorted({n.removesuffix(STATE_SUFFIX) for n in names
                   if shape.fullmatch(n.removesuffix(STATE_SUFFIX))})


def listed_names(names: Collection[str]) -> list[str]:
    """The collection names to list: every name but the ``<x>_state`` of an
    ``<x>`` that is there too (it belongs to that collection)."""
    return sorted(n for n in names
                  if not (n.endswith(STATE_SUFFIX) and n[:-len(STATE_SUFFIX)] in names))


def orphan_owner(name: str, names: Collection[str]) -> str | None:
    """``<x>`` when ``name`` is ``<x>_state`` and ``<x>`` is gone (a drop
    interrupted between its two deletes) while ``name`` has no companion of
    its own; whether it really is ``<x>``'s state, only its fingerprint says."""
    owner = name.removesuffix(STATE_SUFFIX)
    if owner == name or owner in names or f"{name}{STATE_SUFFIX}" in names:
        return None
    return owner if valid_name(owner) else None


def alias_missing_message(alias: str, at: str, found: Sequence[str]) -> str:
    """The refusal to create a collection behind ``alias`` while ``found``,
    made for it, exist: the alias was lost (e.g. ``aliases.json`` deleted), and
    a new, empty collection would hide every document they hold."""
    return (
        f"alias {alias!r} at {at} is missing, but collections made for it exist: "
        f"{', '.join(found)}. Refusing to create a new, empty one (the stream would go "
        "on from its committed offsets and leave out every document already indexed). "
        "Point the alias at the right one with `embedstream collections switch NAME` "
        "(`embedstream collections list` shows their points), or drop those you do not "
        "need with `embedstream collections drop NAME`, then start again."
    )


def not_ours_message(collection: str, detail: str) -> str:
    return (
        f"collection {collection!r} already exists but holds no embedstream fingerprint "
        f"({detail}); refusing to write into it. Point sink.collection elsewhere, or "
        "delete the collection if it is a leftover."
    )


@dataclass(frozen=True, slots=True)
class WritePlan:
    """What one ``apply`` call writes, in the order it must be written."""

    chunks: list[tuple[str, list[float], dict[str, Any]]]  # (point id, vector, payload)
    # Written first: new chunk bound -> state point ids of documents that grow past
    # their stored bound (grouped, one payload write per distinct bound).
    raises: dict[int, list[str]]
    # Chunk point ids to delete: leftovers of documents whose stored bound is known.
    leftovers: list[str]
    # Chunk count -> documents with no stored bound whose chunks at index >= count
    # must go (by filter). Grouping by count makes one delete per distinct count.
    trims: dict[int, list[str]]
    states: list[StatePoint]


# A state point to write: (point id, payload, the document's sparse vector or None).
StatePoint = tuple[str, dict[str, Any], SparseVector | None]


class Record(Protocol):
    """A point as either client library returns it."""

    @property
    def id(self) -> object: ...
    @property
    def vector(self) -> object: ...
    @property
    def payload(self) -> Mapping[str, Any] | None: ...


class Scored(Record, Protocol):
    """A point found by a search."""

    @property
    def score(self) -> float: ...


def as_floats(vector: Vector) -> list[float]:
    if isinstance(vector, np.ndarray):  # one C call instead of a float() per item
        values: list[float] = vector.tolist()
        return values
    return [float(x) for x in vector]


def plan_writes(writes: Sequence[DocumentWrite],
                bounds: Mapping[str, int] | None = None) -> WritePlan:
    """Validate and flatten writes. A later write for the same document in one
    call supersedes an earlier one, exactly as if they were applied in turn.
    ``bounds``: the stored ``chunk_bound`` of the documents whose state has one
    (:func:`chunk_bounds`); the others are trimmed by filter. None: the sink keeps
    no bounds (every document trimmed by filter, no ``chunk_bound`` written).

    Raises ValueError for a malformed write (a deletion with chunks, chunk
    indexes other than 0..n-1) before anything is written."""
    latest: dict[str, DocumentWrite] = {}
    for write in writes:
        latest[write.doc_id] = write
    chunks: list[tuple[str, list[float], dict[str, Any]]] = []
    trims: dict[int, list[str]] = defaultdict(list)
    raises: dict[int, list[str]] = defaultdict(list)
    leftovers: list[str] = []
    states: list[StatePoint] = []
    known = bounds or {}
    for doc_id, write in latest.items():
        if write.state.deleted and write.chunks:
            raise ValueError(f"document {doc_id!r}: a deletion must not carry chunks")
        # The leftover delete keeps indexes < len(chunks): they must be exactly 0..n-1.
        if sorted(c.chunk_index for c in write.chunks) != list(range(len(write.chunks))):
            raise ValueError(
                f"document {doc_id!r}: chunk indexes must be 0..{len(write.chunks) - 1}")
        for chunk in write.chunks:
            # doc_id and chunk_index drive the leftover delete: take them from the
            # write itself rather than trusting the payload to agree.
            payload = {**chunk.payload, "doc_id": doc_id, "chunk_index": chunk.chunk_index}
            pid = chunk_point_id(doc_id, chunk.chunk_index)
            chunks.append((pid, as_floats(chunk.vector), payload))
        count, stored = len(write.chunks), known.get(doc_id)
        if stored is None:
            trims[count].append(doc_id)
        else:
            if count > stored:
                raises[count].append(doc_state_point_id(doc_id))
            leftovers.extend(chunk_point_id(doc_id, i) for i in range(count, stored))
        payload = state_payload(doc_id, write.state)
        if bounds is not None:
            payload[CHUNK_BOUND] = count
        sparse = write.sparse or None  # an empty vector: none (no term to find it by)
        if sparse is not None:
            if write.state.deleted:
                raise ValueError(f"document {doc_id!r}: a deletion must not carry a sparse vector")
            payload[DOC_FIELDS] = dict(write.fields)
        states.append((doc_state_point_id(doc_id), payload, sparse))
    return WritePlan(chunks, dict(raises), leftovers, dict(trims), states)


def chunk_bounds(payloads: Sequence[Mapping[str, Any] | None]) -> dict[str, int]:
    """Document id to stored ``chunk_bound``, from state payloads; documents whose
    state has none (written before the field existed) are left out."""
    bounds: dict[str, int] = {}
    for payload in payloads:
        if not payload or "doc_id" not in payload:
            continue
        bound = payload.get(CHUNK_BOUND)
        if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 0:
            bounds[str(payload["doc_id"])] = bound
    return bounds


def state_payload(doc_id: str, state: DocState) -> dict[str, Any]:
    return {"doc_id": doc_id, "version": state.version, "offset": state.offset,
            "deleted": state.deleted, "versioned": state.versioned, "topic": state.topic,
            "partition": state.partition, "topic_id": state.topic_id,
            "timestamp_ms": state.timestamp_ms, "tombstone": state.tombstone}


def state_from_payload(payload: Mapping[str, Any] | None) -> tuple[str, DocState] | None:
    """A state point's document and state; ``None`` for the fingerprint and
    handover points (no ``doc_id``), so a scroll of the state collection that
    reads points through this never takes one of them for a document. A state
    stored before the log was recorded reads with ``topic`` None."""
    if not payload or "doc_id" not in payload:
        return None
    def number(name: str) -> int | None:
        value = payload.get(name)
        return None if value is None else int(value)

    def text(name: str) -> str | None:
        value = payload.get(name)
        return None if value is None else str(value)

    state = DocState(
        int(payload["version"]), int(payload["offset"]), bool(payload["deleted"]),
        versioned=bool(payload.get("versioned", True)), topic=text("topic"),
        partition=number("partition"), topic_id=text("topic_id"),
        timestamp_ms=number("timestamp_ms"), tombstone=bool(payload.get("tombstone", False)),
    )
    return str(payload["doc_id"]), state


def parse_fingerprint(payload: Mapping[str, Any] | None, collection: str) -> Fingerprint | None:
    """The fingerprint in the fingerprint point's payload; ``None`` for no
    point (``payload`` None) or no fingerprint in it. Raises
    FingerprintMismatch for one this version cannot read."""
    raw = (payload or {}).get("fingerprint")
    if raw is None:
        return None
    try:
        return Fingerprint.from_json(str(raw))
    except (ValueError, TypeError) as exc:  # bad JSON, or fields this version lacks
        raise FingerprintMismatch(
            f"collection {collection!r} holds a fingerprint this version cannot read "
            f"({exc}); refusing to write into it"
        ) from exc


def dense_vector(vector: object) -> list[float]:
    """The unnamed dense vector of a returned record, as a list of floats."""
    if isinstance(vector, list) and all(isinstance(x, int | float) for x in vector):
        return [float(x) for x in vector]
    raise SinkError(f"expected a single dense vector, got {type(vector).__name__}")
