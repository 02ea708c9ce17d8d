"""The version guard (stream/plan.py) under any delivery the consumer can see.

A generated log holds creates, updates, deletes, tombstones and Debezium's
at-least-once duplicates (an older event re-emitted at a later offset) for a few
documents, with versions from an LSN-like counter (ties included) or the offsets.
It is delivered the way a consumer sees it: in log order, in micro-batches cut
anywhere, with restarts from any earlier offset (a crash before the commit) and
stray re-deliveries of earlier events in any order. Each batch goes through
group_by_document / fold / build_write into a simulated store of DocState and
chunk texts, as the consumer does. The in-order history (the log applied once,
event by event) is checked against the documented rule, written out plainly in
:func:`reference`. Held after every batch:

* the stored (version, offset) of a document never goes back;
* a deleted document is brought back only by an event later in the log;
* the store is always a state of the in-order history (applying the log once,
  event by event), never a mix: the chunk texts are those of the event that made it;

and at the end the store equals that history's last state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedstream.stream.chunking import Chunk, content_hash
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.plan import PreparedEvent, build_write, fold, group_by_document
from embedstream.stream.store import DocState, DocumentWrite

from .conftest import hypothesis_examples


def examples(n: int) -> settings:
    """``n`` examples in the "full" hypothesis profile, scaled to the loaded one."""
    return settings(max_examples=hypothesis_examples(n), deadline=None, database=None,
                    derandomize=True, suppress_health_check=list(HealthCheck))
DOCS = ("a", "b", "c")
VECTOR = np.zeros(2, np.float32)


def prepared(doc: str, op: Op, version: int, offset: int, kind: str,
             versioned: bool = True) -> PreparedEvent:
    """An event whose chunk texts name it, so the store shows which event it holds."""
    text = f"{doc} v{version} at {offset}. Second chunk." if op is Op.UPSERT else ""
    event = ChangeEvent(doc, op, version, Position("t", 0, offset), text, {"n": offset},
                        kind=kind, versioned=versioned and kind != "tombstone")
    chunks = []
    for index, piece in enumerate(text.split(". ") if text else []):
        start = text.index(piece)
        chunks.append(Chunk(index, start, start + len(piece), piece, 4, content_hash(piece)))
    return PreparedEvent(event, chunks)


def state(version: int, offset: int, deleted: bool, versioned: bool = True,
          tombstone: bool = False) -> DocState:
    """A state stored from partition 0 of topic ``t``, where these logs live."""
    return DocState(version, offset, deleted, versioned, "t", 0, tombstone=tombstone)


# A stored document: its state and the texts of its chunk points, in index order.
Stored = tuple[DocState, tuple[str, ...]]


def apply_write(store: dict[str, Stored], write: DocumentWrite) -> None:
    """What a sink does with a write (stream/store.py): replace the whole chunk set."""
    indexes = [point.chunk_index for point in write.chunks]
    assert indexes == list(range(len(indexes)))
    assert not (write.state.deleted and write.chunks)
    for point in write.chunks:
        assert point.payload["doc_id"] == write.doc_id
        assert point.payload["chunk_index"] == point.chunk_index
    store[write.doc_id] = (write.state, tuple(str(p.payload["text"]) for p in write.chunks))


def vectors_for(events: Sequence[PreparedEvent]) -> dict[str, np.ndarray]:
    return {c.content_hash: VECTOR for p in events for c in p.chunks}


def apply_batch(store: dict[str, Stored], batch: Sequence[PreparedEvent]) -> None:
    """One micro-batch, as StreamConsumer._apply does it."""
    grouped = group_by_document(batch)
    assert [p for events in grouped.values() for p in events] == sorted(
        batch, key=lambda p: list(grouped).index(p.event.doc_id))  # log order kept per doc
    for doc_id, events in grouped.items():
        before = store.get(doc_id)
        folded = fold(before[0] if before else None, events)
        assert folded.applied + folded.stale == len(events)
        assert (folded.winner is None) == (folded.applied == 0) == (folded.state is None)
        if folded.winner is not None:
            assert folded.winner in events
            apply_write(store, build_write(folded, vectors_for([folded.winner])))


def in_log_order(log: Sequence[PreparedEvent]) -> dict[str, list[Stored]]:
    """Each document's history: its states applying the log once, in order, one by one."""
    history: dict[str, list[Stored]] = {}
    store: dict[str, Stored] = {}
    for event in log:
        apply_batch(store, [event])
        doc = event.event.doc_id
        states = history.setdefault(doc, [])
        if doc in store and (not states or states[-1] != store[doc]):
            states.append(store[doc])
    return history


def reference(log: Sequence[PreparedEvent]) -> dict[str, list[Stored]]:
    """The in-order history from the documented rule alone (README, "Version guard"): an
    event applies when its (version, offset) is greater than the stored one; a tombstone
    deletes a live document (or records an unknown one as deleted), keeping its version."""
    history: dict[str, list[Stored]] = {}
    for item in log:
        event, offset = item.event, item.event.position.offset
        states = history.setdefault(event.doc_id, [])
        current = states[-1][0] if states else None
        texts = tuple(chunk.text for chunk in item.chunks)
        if event.kind == "tombstone":
            if current is None:
                states.append((state(-1, offset, True, versioned=False, tombstone=True), ()))
            elif not current.deleted and offset > current.offset:
                states.append((state(current.version, offset, True, current.versioned,
                                     tombstone=True), ()))
        elif current is None or (event.version, offset) > (current.version, current.offset):
            states.append((state(event.version, offset, event.op is Op.DELETE, event.versioned),
                           texts))
    return history


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

ACTIONS = st.sampled_from(["upsert", "upsert", "upsert", "delete", "tombstone", "duplicate"])


@st.composite
def logs(draw: st.DrawFn) -> list[PreparedEvent]:
    docs = DOCS[: draw(st.integers(1, 3))]
    by_offset = draw(st.booleans())  # source.version: offset; else an LSN-like counter
    steps = draw(st.lists(st.tuples(st.sampled_from(docs), ACTIONS, st.integers(0, 3)),
                          min_size=1, max_size=24))
    counters = {doc: draw(st.integers(0, 5)) for doc in docs}
    emitted: dict[str, list[PreparedEvent]] = {doc: [] for doc in docs}
    log: list[PreparedEvent] = []
    for offset, (doc, action, step) in enumerate(steps):
        if action == "duplicate" and emitted[doc]:
            # Debezium is at-least-once: an earlier event again, at a new offset.
            old = emitted[doc][step % len(emitted[doc])].event
            version = offset if by_offset else old.version
            item = prepared(doc, old.op, version, offset, old.kind, not by_offset)
        elif action == "tombstone":
            item = prepared(doc, Op.DELETE, -1, offset, "tombstone")
        else:
            counters[doc] += step  # 0: the same version as the last one (e.g. one ts_ms)
            version = offset if by_offset else counters[doc]
            op = Op.DELETE if action == "delete" else Op.UPSERT
            item = prepared(doc, op, version, offset, "delete" if op is Op.DELETE else "update",
                            not by_offset)
        emitted[doc].append(item)
        log.append(item)
    return log


@st.composite
def deliveries(draw: st.DrawFn, n: int) -> list[list[int]]:
    """Log indexes as a consumer sees them, cut into micro-batches: in order, with
    restarts from an earlier offset and stray re-deliveries of earlier events."""
    seen: list[int] = []
    upto = 0
    for _ in range(40):
        if upto >= n:
            break
        action = draw(st.sampled_from(["advance", "advance", "restart", "stray"]))
        if action == "advance" or upto == 0:
            step = draw(st.integers(1, 6))
            seen += range(upto, min(n, upto + step))
            upto = min(n, upto + step)
        elif action == "restart":
            seen += range(draw(st.integers(0, upto - 1)), upto)
        else:
            seen += draw(st.lists(st.integers(0, upto - 1), min_size=1, max_size=5))
    seen += range(upto, n)
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=8))  # used in turn
    batches: list[list[int]] = []
    while seen:
        size = sizes[len(batches) % len(sizes)]
        batches.append(seen[:size])
        seen = seen[size:]
    return batches


@dataclass
class Scenario:
    log: list[PreparedEvent]
    batches: list[list[int]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    log = draw(logs())
    return Scenario(log, draw(deliveries(len(log))))


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@examples(2_000)
@given(scenario=scenarios())
def test_any_batching_with_replays_ends_as_the_log_applied_once_in_order(
    scenario: Scenario,
) -> None:
    log = scenario.log
    history = in_log_order(log)
    assert history == reference(log), "applying the log once in order breaks the rule"
    store: dict[str, Stored] = {}
    for batch in scenario.batches:
        previous = dict(store)
        apply_batch(store, [log[i] for i in batch])
        for doc, (state, texts) in store.items():
            old = previous.get(doc)
            # Always a state of the in-order history, chunks included: never a mix.
            assert (state, texts) in history[doc], (doc, state, texts)
            if old is None:
                continue
            old_state = old[0]
            assert state.order_key >= old_state.order_key, "the stored key went back"
            if history[doc].index(old) > history[doc].index((state, texts)):
                raise AssertionError(f"{doc} went back in its history: {old} -> {state}")
            if old_state.deleted and not state.deleted:
                # Brought back: only by an event after the deletion in the log.
                assert state.offset > old_state.offset, (old_state, state)
    for doc, states in history.items():
        assert store[doc] == states[-1], (doc, store[doc], states[-1])
    assert store.keys() == history.keys()


@examples(700)
@given(log=logs(), data=st.data())
def test_one_batch_equals_one_event_at_a_time(log: list[PreparedEvent],
                                               data: st.DataObject) -> None:
    """fold over a document's whole batch gives what folding its events one by one gives,
    from any stored state of its history."""
    history = in_log_order(log)
    whole: dict[str, Stored] = {}
    apply_batch(whole, log)
    assert whole == {doc: states[-1] for doc, states in history.items()}
    # From a stored state partway, the rest of the log in one batch or one by one.
    cut = data.draw(st.integers(0, len(log)))
    partway: dict[str, Stored] = {}
    for event in log[:cut]:
        apply_batch(partway, [event])
    one_by_one = dict(partway)
    for event in log[cut:]:
        apply_batch(one_by_one, [event])
    apply_batch(partway, log[cut:])
    assert partway == one_by_one == whole


@examples(700)
@given(log=logs(), data=st.data())
def test_a_consumer_that_started_mid_log_converges_after_a_replay_from_zero(
    log: list[PreparedEvent], data: st.DataObject
) -> None:
    """A store first fed from offset ``start`` (a new group reading from ``latest``, or a
    retention cut), then the whole topic again: it ends as the in-order history, chunks
    and version (a deleted document may keep a later tombstone's offset).

    On the way, a document whose first event seen was a tombstone (stored version -1,
    since a tombstone carries none) is briefly live again when the replay reaches the
    events before the tombstone, until the tombstone comes round again: the price of
    recovering the versions it never saw. Without that, its version -1 would let an old
    duplicate re-emitted after the tombstone bring it back for good."""
    start = data.draw(st.integers(0, len(log)))
    size = data.draw(st.integers(1, 8))
    store: dict[str, Stored] = {}
    for batch_start in range(start, len(log), size):
        apply_batch(store, log[batch_start:batch_start + size])
    for batch_start in range(0, len(log), size):
        apply_batch(store, log[batch_start:batch_start + size])
    final = {doc: states[-1] for doc, states in in_log_order(log).items()}
    assert store.keys() == final.keys()
    for doc, (state, texts) in store.items():
        truth, truth_texts = final[doc]
        assert (texts, state.deleted, state.version) == (truth_texts, truth.deleted,
                                                          truth.version), (doc, state, truth)
        if not state.deleted:
            assert state == truth


def test_tombstone_first_then_replay_from_zero_is_briefly_live() -> None:
    """The behaviour described above, pinned: change it knowingly."""
    create, tombstone = prepared("a", Op.UPSERT, 5, 0, "create"), prepared(
        "a", Op.DELETE, -1, 1, "tombstone")
    store: dict[str, Stored] = {}
    apply_batch(store, [tombstone])  # started at offset 1
    assert store["a"][0] == state(-1, 1, True, versioned=False, tombstone=True)
    apply_batch(store, [create])  # the replay from 0
    assert store["a"][0] == state(5, 0, False)
    apply_batch(store, [tombstone])
    assert store["a"] == (state(5, 1, True, tombstone=True), ())


def test_a_replayed_older_create_never_resurrects_a_deleted_document() -> None:
    """The classic replay: create, update, delete, tombstone, then everything again."""
    log = [prepared("a", Op.UPSERT, 5, 0, "create"), prepared("a", Op.UPSERT, 6, 1, "update"),
           prepared("a", Op.DELETE, 7, 2, "delete"), prepared("a", Op.DELETE, -1, 3, "tombstone")]
    store: dict[str, Stored] = {}
    apply_batch(store, log)
    assert store["a"] == (state(7, 2, True), ())
    for order in ([0], [1, 0], [3, 2, 1, 0], [0, 1, 2, 3]):
        apply_batch(store, [log[i] for i in order])
        assert store["a"] == (state(7, 2, True), ())
