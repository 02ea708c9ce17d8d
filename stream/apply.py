"""The apply step: one batch of prepared events into the store, by the stream's rules.

The live consumer and a rebuild's catch-up both call :func:`apply_batch`; they
differ only in how they report a document that cannot be written (the consumer
dead-letters it, the catch-up adds it to the rebuild's failure list) and in
where the metrics go, and both are passed in.

What is guaranteed, per call:

* The sink is called in this order: ``document_states`` once, ``stored_vectors``
  at most once (only when a winning event has chunks and its document is stored
  live), ``apply`` at most once (only when there is something to write). Each
  call is timed in ``sink_seconds{op=read_state|read_vectors|apply}``; one that
  raises :class:`~embedstream.stream.errors.SinkError` is counted in
  ``sink_errors{op}`` and re-raised.
* Each document's events are folded with the version guard
  (:func:`~embedstream.stream.plan.fold`); only the winner is written, as the
  document's whole chunk set (or its deletion), with stored vectors reused.
* A winner with a chunk that cannot be embedded even alone is not written: it
  is reported once through ``on_failure`` and recorded in ``failed``. An event
  already in ``failed`` (reported by an earlier attempt at the same batch that
  then raised) is neither reported again nor written, even if it embeds now:
  what was reported as failed must not also be applied.
* ``events{op,outcome}`` counts each event that loses the fold as ``stale`` and
  each written winner as ``applied``, once the write is in: an attempt that
  raises counts no events, so a batch retried through an outage is counted once
  (chunk and embedding figures, counted as the embedding happens, are not undone).
  A failed winner is left to ``on_failure``.

Not guaranteed: anything about a call that raises (the sink or the embedding
provider unavailable, a sink error). Writes are not atomic across documents,
failure reports made before the error stay, and the caller
retries the whole batch (harmless: the version guard makes applied events
no-ops). Ordering across documents is not kept either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import TypeVar

from embedstream.stream.config import DEFAULT_ROUTE
from embedstream.stream.errors import ConfigError, SinkError
from embedstream.stream.events import ChangeEvent, Position
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import Folded, PreparedEvent, build_write, fold, group_by_document
from embedstream.stream.sparse import SparseEncoder
from embedstream.stream.store import Sink
from embedstream.stream.vectors import ChunkVectors, Failure, failure_of

__all__ = ["FailureCallback", "apply_batch", "call_sink"]

_T = TypeVar("_T")

# Told about a winning event that is not written because a chunk could not be embedded.
FailureCallback = Callable[[PreparedEvent, Failure], None]


def call_sink(metrics: Metrics, op: str, call: Callable[[], _T]) -> _T:
    """``call()``, timed in ``sink_seconds{op}``; a SinkError is counted in ``sink_errors{op}``."""
    with metrics.sink_seconds.labels(op=op).time():
        try:
            return call()
        except SinkError:
            metrics.sink_errors.labels(op=op).inc()
            raise


def apply_batch(
    events: Sequence[PreparedEvent],
    sink: Sink,
    vectors: ChunkVectors,
    metrics: Metrics,
    on_failure: FailureCallback,
    failed: MutableMapping[Position, Failure] | None = None,
    route: str = DEFAULT_ROUTE,
    sparse: SparseEncoder | None = None,
) -> list[ChangeEvent]:
    """Apply ``events`` (in log order) to ``sink``; returns the winning events
    written, in the order their documents first appear (see the module docstring).

    ``failed``: the failures of earlier attempts at this same batch, by position;
    new ones are added. Leave it out when a batch is never retried. ``route``:
    the route label of the events counted. ``sparse``: the document sparse encoder,
    used when ``sink`` holds sparse vectors (its fingerprint, checked at open, names
    the same encoder)."""
    failed = {} if failed is None else failed
    encoder = sparse if sink.sparse else None
    if sink.sparse and encoder is None:
        raise ConfigError("the collection holds document sparse vectors but no sparse "
                          "encoder was given (retrieval.sparse)")
    by_doc = group_by_document(events)
    stored = call_sink(metrics, "read_state", lambda: sink.document_states(list(by_doc)))
    folded = {doc_id: fold(stored.get(doc_id), doc_events)
              for doc_id, doc_events in by_doc.items()}
    winners = [item for item in folded.values() if item.winner is not None]
    found, unembedded = vectors.for_winners(
        winners, stored,
        lambda doc_ids: call_sink(metrics, "read_vectors", lambda: sink.stored_vectors(doc_ids)))
    writing: list[Folded] = []
    outcomes: list[tuple[str, str]] = []  # (op, outcome), counted once the write is in
    for doc_id, doc_events in by_doc.items():
        item = folded[doc_id]
        keep = item.winner is not None and not _fails(item.winner, unembedded, failed, on_failure)
        if keep:
            writing.append(item)
        for prepared in doc_events:
            if prepared is not item.winner:
                outcomes.append((prepared.event.kind, "stale"))
            elif keep:
                outcomes.append((prepared.event.kind, "moved" if item.moved else "applied"))
    writes = [build_write(item, found, encoder) for item in writing]
    if writes:
        call_sink(metrics, "apply", lambda: sink.apply(writes))
    for op, outcome in outcomes:
        metrics.events.labels(op=op, outcome=outcome, route=route).inc()
    return [item.winner.event for item in writing if item.winner]


def _fails(winner: PreparedEvent, unembedded: Mapping[str, Failure],
           failed: MutableMapping[Position, Failure], on_failure: FailureCallback) -> bool:
    """Whether ``winner`` cannot be written; reports it unless an earlier attempt did."""
    position = winner.event.position
    failure = failure_of(winner.chunks, unembedded) or failed.get(position)
    if failure is None:
        return False
    if position not in failed:
        failed[position] = failure
        on_failure(winner, failure)
    return True
