"""The pure core: which events of a batch apply, and what they write.

No I/O here. The consumer fetches stored document states, calls :func:`fold`
per document, embeds the chunks of the winners, and hands
:func:`build_write` results to the sink.

Ordering rule (the version guard): events of one document are ordered by
``(version, offset)``. An event applies only when its key is greater than
what the store holds, so

* an older event never overwrites a newer one,
* an older event never brings a deleted document back (deletions keep their
  version in the stored state), and
* replaying the topic from offset 0 is a no-op: every replayed event's key is
  equal to or less than the stored one.

A Kafka tombstone (null value) carries no version. It follows the delete for
its key in the log, so it is ordered by offset alone: it deletes the document
if the stored state is live and older in the log, keeping the stored version so
older events still cannot bring the document back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from embedstream.stream.chunking import Chunk
from embedstream.stream.events import ChangeEvent, Op
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite

__all__ = ["Folded", "PreparedEvent", "build_write", "fold", "group_by_document"]


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


def group_by_document(events: Iterable[PreparedEvent]) -> dict[str, list[PreparedEvent]]:
    """Events per document, in the order they were read from the log."""
    grouped: dict[str, list[PreparedEvent]] = {}
    for prepared in events:
        grouped.setdefault(prepared.event.doc_id, []).append(prepared)
    return grouped


def _next_state(current: DocState | None, event: ChangeEvent) -> DocState | None:
    """The state after ``event``, or None when the event is stale."""
    if event.kind == "tombstone":
        if current is None:
            return DocState(version=-1, offset=event.position.offset, deleted=True)
        if current.deleted or event.position.offset <= current.offset:
            return None
        return DocState(version=current.version, offset=event.position.offset, deleted=True)
    if current is not None and event.order_key <= current.order_key:
        return None
    return DocState(
        version=event.version, offset=event.position.offset, deleted=event.op is Op.DELETE
    )


def fold(stored: DocState | None, events: Sequence[PreparedEvent]) -> Folded:
    """Apply the version guard to one document's events, in log order.

    Only the last applying event needs writing: each write replaces the
    document's whole chunk set, so intermediate versions would be overwritten
    within the same batch anyway.
    """
    current = stored
    winner: PreparedEvent | None = None
    applied = stale = 0
    for prepared in events:
        state = _next_state(current, prepared.event)
        if state is None:
            stale += 1
            continue
        current, winner = state, prepared
        applied += 1
    return Folded(winner=winner, state=current if winner else None, applied=applied, stale=stale)


def build_write(
    folded: Folded,
    vectors: Mapping[str, npt.NDArray[np.float32]],
) -> DocumentWrite:
    """The sink write for a folded document; ``vectors`` maps content hash to vector."""
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
    return DocumentWrite(doc_id=event.doc_id, state=state, chunks=points)
