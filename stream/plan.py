"""The pure core: which events of a batch apply, and what they write.

No I/O here. The consumer fetches stored document states, calls :func:`fold`
per document, embeds the chunks of the winners, and hands
:func:`build_write` results to the sink.

Ordering rule (the version guard): an event applies only when it is later
than what the store holds for its document (:class:`DocState`), so an older
event never overwrites a newer one, never brings a deleted document back
(deletions keep their version), and replaying a topic is a no-op. "Later":

* Within the log the stored state was read from (same topic, partition and
  topic id): the greater ``(version, offset)``. ``version`` is
  ``source.lsn``, ``source.ts_ms``, a native ``version`` field, or the offset
  itself (``source.version: offset``).
* From another log (another partition or topic, or a topic deleted and
  recreated under the same name, which has another topic id), where offsets
  say nothing: two explicit versions decide by the greater version (equal:
  the same change, read again). An event ordered by its offset alone (offset
  versions, Kafka tombstones) is later when its Kafka timestamp is (a key
  only moves to another partition going forward in time; a lagging
  partition's older records read late are stale). Equal timestamps (the same
  millisecond) are ordered by the log, (topic, partition, topic id), and so
  is everything when a timestamp is missing: deterministic, so re-reading
  records in any order never flips the result. Either way a write that
  crosses logs is counted as ``moved``.
* Where the topic id is unknown on either side (a broker without topic ids)
  and the partition is the same, it is one log, except that an offset-ordered
  event at or below the stored offset with a later timestamp marks a
  recreated topic and applies.
* A state with no log recorded (a bulk rebuild's file row, a state stored by
  an earlier release) counts as the same log.

A Kafka tombstone (null value) carries no version: it deletes the document if
the stored state is live (after a deletion it is a no-op, unless it moved:
then its position is recorded), keeping the stored version so older events of the
same log still cannot bring the document back; another log's events are then
weighed against it by timestamp (the store may not have seen every version
before the tombstone came), as for any offset-ordered event.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from embedstream.stream.chunking import Chunk
from embedstream.stream.events import ChangeEvent, Op
from embedstream.stream.sparse import SparseEncoder, document_text
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite

__all__ = [
    "Folded", "Outcome", "PreparedEvent", "build_write", "fold", "group_by_document", "supersedes",
]


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """A decoded event with its chunks (empty for deletions)."""

    event: ChangeEvent
    chunks: Sequence[Chunk]

    @property
    def n_tokens(self) -> int:
        return sum(chunk.n_tokens for chunk in self.chunks)


@dataclass(frozen=True, slots=True)
class Folded:
    """Outcome for one document: the event to write (if any) and how many were stale."""

    winner: PreparedEvent | None
    state: DocState | None
    applied: int
    stale: int
    # The write crosses logs: some applied event came from another partition,
    # topic or topic incarnation than the state before it (counted as "moved").
    moved: bool = False


def group_by_document(events: Iterable[PreparedEvent]) -> dict[str, list[PreparedEvent]]:
    """Events per document, in the order they were read from the log."""
    grouped: dict[str, list[PreparedEvent]] = {}
    for prepared in events:
        grouped.setdefault(prepared.event.doc_id, []).append(prepared)
    return grouped


# What an event that applies is counted as: "moved" when it came from another
# log (partition, topic, topic incarnation) than the stored state.
Outcome = Literal["applied", "moved"]


def _later(current: DocState, candidate: DocState) -> Outcome | None:
    """Whether ``candidate`` (an event's stamp) is later than ``current``; None: stale."""
    same = True if current.topic is None or candidate.topic is None else _same_log(
        current, candidate)
    if same is not False:  # one log (as far as anyone can tell): (version, offset)
        if candidate.order_key > current.order_key:
            return "applied"
        recreated = same is None and not (_by_version(candidate) and _by_version(current)) \
            and _before(current.timestamp_ms, candidate.timestamp_ms)
        return "moved" if recreated else None
    if _by_version(candidate) and _by_version(current):
        return "moved" if candidate.version > current.version else None
    # Offsets of different logs say nothing about each other: the record
    # timestamps do, ties (and a missing one) broken by the logs themselves, so
    # that reading the same records again, in any order, never flips the result.
    timed = candidate.timestamp_ms is not None and current.timestamp_ms is not None
    return "moved" if _log_order(candidate, timed) > _log_order(current, timed) else None


def _log_order(state: DocState, timed: bool) -> tuple[int, str, int, str]:
    return (state.timestamp_ms or 0 if timed else 0, state.topic or "", state.partition or 0,
            state.topic_id or "")


def _by_version(state: DocState) -> bool:
    """Ordered across logs by its version: one the source gave, not one a tombstone kept
    (the store may not have seen every version before the tombstone when it came)."""
    return state.versioned and not state.tombstone


def _same_log(a: DocState, b: DocState) -> bool | None:
    """True: one log; False: different ones; None: same name, identity unknown."""
    if (a.topic, a.partition) != (b.topic, b.partition):
        return False
    if a.topic_id is None or b.topic_id is None:
        return None
    return a.topic_id == b.topic_id


def _before(earlier: int | None, later: int | None) -> bool:
    return earlier is not None and later is not None and earlier < later


def _stamp(event: ChangeEvent, version: int, versioned: bool, deleted: bool,
           tombstone: bool = False) -> DocState:
    position = event.position
    return DocState(version, position.offset, deleted, versioned, position.topic,
                    position.partition, position.topic_id, position.timestamp_ms, tombstone)


def supersedes(candidate: DocState, stored: DocState | None) -> bool:
    """Whether a state made from an event replaces ``stored`` (the guard, state to state)."""
    return stored is None or _later(stored, candidate) is not None


def _next_state(current: DocState | None, event: ChangeEvent) -> tuple[DocState, Outcome] | None:
    """The state after ``event`` and how it applied, or None when the event is stale."""
    if event.kind == "tombstone":
        if current is None:
            return _stamp(event, -1, False, True, tombstone=True), "applied"
        # Ordered by its log position alone: the stored version stands in for its own.
        outcome = _later(current, _stamp(event, current.version, False, True, tombstone=True))
        # After a deletion it changes nothing a reader sees, but one from another log
        # is recorded: the guard then weighs other logs' events against its timestamp.
        if outcome is None or (current.deleted and outcome != "moved"):
            return None
        # Keep the stored version, so older events of this log (or, for a source's
        # version, of any log) cannot bring the document back. An offset version
        # of another log means nothing in this one: the tombstone's offset instead.
        if current.versioned or outcome == "applied":
            return _stamp(event, current.version, current.versioned, True, True), outcome
        return _stamp(event, event.position.offset, False, True, True), outcome
    state = _stamp(event, event.version, event.versioned, event.op is Op.DELETE)
    outcome = "applied" if current is None else _later(current, state)
    return None if outcome is None else (state, outcome)


def fold(stored: DocState | None, events: Sequence[PreparedEvent]) -> Folded:
    """Apply the version guard to one document's events, in log order.

    Only the last applying event needs writing: each write replaces the
    document's whole chunk set, so intermediate versions would be overwritten
    within the same batch anyway.
    """
    current = stored
    winner: PreparedEvent | None = None
    applied = stale = 0
    moved = False
    for prepared in events:
        step = _next_state(current, prepared.event)
        if step is None:
            stale += 1
            continue
        (current, outcome), winner = step, prepared
        applied += 1
        moved = moved or outcome == "moved"
    return Folded(winner=winner, state=current if winner else None, applied=applied, stale=stale,
                  moved=moved)


def build_write(
    folded: Folded,
    vectors: Mapping[str, npt.NDArray[np.float32]],
    sparse: SparseEncoder | None = None,
) -> DocumentWrite:
    """The sink write for a folded document; ``vectors`` maps content hash to vector.

    ``sparse`` (a collection with document sparse vectors): the live document's
    vector, from its whole text (title and body), with its metadata beside it."""
    assert folded.winner is not None and folded.state is not None
    event, state = folded.winner.event, folded.state
    if state.deleted:
        return DocumentWrite(doc_id=event.doc_id, state=state)
    points = [
        ChunkPoint(
            chunk_index=chunk.index,
            vector=vectors[chunk.content_hash],
            payload={
                **event.metadata,
                "doc_id": event.doc_id,
                "chunk_index": chunk.index,
                "text": chunk.text,
                "start": chunk.start,
                "end": chunk.end,
                "version": event.version,
                "content_hash": chunk.content_hash,
            },
        )
        for chunk in folded.winner.chunks
    ]
    if sparse is None:
        return DocumentWrite(doc_id=event.doc_id, state=state, chunks=points)
    document = sparse.encode_document(document_text(event.text, event.title),
                                      [chunk.embed_text for chunk in folded.winner.chunks])
    return DocumentWrite(doc_id=event.doc_id, state=state, chunks=points, sparse=document,
                         fields=dict(event.metadata))
