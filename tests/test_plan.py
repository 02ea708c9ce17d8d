"""The version guard: which events of a batch apply to the store."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embedstream.stream.chunking import Chunk, content_hash
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.plan import PreparedEvent, build_write, fold, group_by_document
from embedstream.stream.store import DocState

from .conftest import hypothesis_examples

_offsets = itertools.count()


def event(doc: str, op: Op, version: int, offset: int | None = None, kind: str = "update",
          text: str = "hello world") -> PreparedEvent:
    position = Position("t", 0, next(_offsets) if offset is None else offset)
    ev = ChangeEvent(doc_id=doc, op=op, version=version, position=position,
                     text=text if op is Op.UPSERT else "", kind=kind)
    chunks = [Chunk(0, 0, len(text), text, 2, content_hash(text))] if op is Op.UPSERT else []
    return PreparedEvent(ev, chunks)


def test_newer_event_applies_and_older_is_stale() -> None:
    stored = DocState(version=10, offset=5, deleted=False)
    older, newer = event("a", Op.UPSERT, 9, 7), event("a", Op.UPSERT, 11, 8)
    result = fold(stored, [older, newer])
    assert result.winner is newer and result.stale == 1
    assert result.state is not None
    assert (result.state.version, result.state.offset, result.state.deleted) == (11, 8, False)


def test_older_event_never_resurrects_a_deleted_document() -> None:
    stored = DocState(version=10, offset=5, deleted=True)
    result = fold(stored, [event("a", Op.UPSERT, 9, 20)])
    assert result.winner is None and result.stale == 1


def test_equal_version_is_ordered_by_offset_so_replays_are_no_ops() -> None:
    stored = DocState(version=10, offset=5, deleted=False)
    assert fold(stored, [event("a", Op.UPSERT, 10, 5)]).winner is None  # the same event again
    later = event("a", Op.UPSERT, 10, 6)  # same source time, later in the log
    assert fold(stored, [later]).winner is later


def test_last_applying_event_of_the_batch_wins() -> None:
    events = [event("a", Op.UPSERT, 1), event("a", Op.DELETE, 2), event("a", Op.UPSERT, 3)]
    result = fold(None, events)
    assert result.winner is events[2] and result.applied == 3 and not result.state.deleted


def test_tombstone_deletes_a_live_document_and_keeps_its_version() -> None:
    stored = DocState(version=10, offset=5, deleted=False)
    tomb = event("a", Op.DELETE, -1, 9, kind="tombstone")
    result = fold(stored, [tomb])
    assert result.winner is tomb and result.state is not None
    assert (result.state.version, result.state.offset, result.state.deleted) == (10, 9, True)
    # An older create replayed afterwards must not bring it back.
    assert fold(result.state, [event("a", Op.UPSERT, 9, 3)]).winner is None


def test_tombstone_after_delete_or_before_stored_state_is_a_no_op() -> None:
    after_delete = event("a", Op.DELETE, -1, 6, kind="tombstone")
    assert fold(DocState(10, 5, True), [after_delete]).winner is None
    earlier_in_log = event("a", Op.DELETE, -1, 4, kind="tombstone")
    assert fold(DocState(10, 5, False), [earlier_in_log]).winner is None


def test_build_write_payload_and_deletion() -> None:
    up = event("doc-1", Op.UPSERT, 4, text="some text")
    write = build_write(fold(None, [up]), {up.chunks[0].content_hash: np.ones(3, np.float32)})
    [point] = write.chunks
    assert point.payload["doc_id"] == "doc-1" and point.payload["version"] == 4
    assert point.payload["text"] == "some text"
    assert (point.payload["start"], point.payload["end"]) == (0, 9)
    gone = build_write(fold(None, [event("doc-1", Op.DELETE, 5)]), {})
    assert gone.state.deleted and not gone.chunks


def test_group_by_document_keeps_log_order() -> None:
    a1, b1, a2 = event("a", Op.UPSERT, 1), event("b", Op.UPSERT, 1), event("a", Op.UPSERT, 2)
    assert group_by_document([a1, b1, a2]) == {"a": [a1, a2], "b": [b1]}


@settings(max_examples=hypothesis_examples(300), deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=12),
       st.randoms(use_true_random=False))
def test_any_interleaving_of_replays_reaches_the_newest_state(
    history: list[tuple[int, bool]], rnd: object
) -> None:
    """Applying events in batches, in any order and with replays, ends at the newest event."""
    events = [event("a", Op.DELETE if deleted else Op.UPSERT, version, offset=i)
              for i, (version, deleted) in enumerate(history)]
    newest = max(events, key=lambda p: p.event.order_key)
    shuffled = events + events[: len(events) // 2]
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    state: DocState | None = None
    for start in range(0, len(shuffled), 3):
        result = fold(state, shuffled[start:start + 3])
        if result.state is not None:
            assert state is None or result.state.order_key > state.order_key  # never regresses
            state = result.state
    assert state is not None and state.order_key == newest.event.order_key
    assert state.deleted == (newest.event.op is Op.DELETE)
