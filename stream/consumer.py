"""The streaming consumer: Kafka change events in, vectors in the store, offsets out.

One thread runs the loop; nothing here starts another. What is guaranteed:

* Offsets are committed only after the sink has applied every event at or
  before them and made it durable (``Sink.flush``), and dead-letter records for
  any undecodable ones are acknowledged. A crash at any moment therefore
  replays, never skips. Writes are searchable as soon as they are applied; the
  flush and commit (a checkpoint) follow at most ``sink.flush_interval_ms``
  later, so a crash replays at most that much work.
* Replays are harmless: the version guard in :mod:`embedstream.stream.plan` makes an
  already-applied event a no-op, so a restart reaches the same final state as
  an uninterrupted run.
* While the store is unavailable, the consumer pauses its partitions and keeps
  polling (so the group does not evict it), reports not ready, and retries the
  batch with exponential backoff; nothing past the failed batch is committed.
  While the Schema Registry is, the same, and the messages not yet read are
  sought back to be read again: none is dead-lettered for an outage.
* One group serves every route (:mod:`embedstream.stream.route_sides`): each
  message is read by its topic's route, into that route's collection; a
  checkpoint flushes every route's store before it commits.
* Bad records never stop the loop: an undecodable message, one over
  ``source.max_message_bytes``, a document over ``source.max_document_chars``,
  one the chunker fails on, or one whose text cannot be embedded even alone
  (out of memory, or refused by a remote provider; a batch is split in halves
  and retried first) goes to the dead-letter topic with its reason. A remote
  provider that keeps throttling or failing is backpressure, like the store.

Not guaranteed: ordering across documents, or that every intermediate version
of a document is ever written (a batch writes only each document's latest).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from confluent_kafka import Consumer, Message

from embedstream.stream._reading import Reading
from embedstream.stream._rebalance import Rebalancing
from embedstream.stream.apply import apply_batch, call_sink
from embedstream.stream.backpressure import Backpressure
from embedstream.stream.batch import MicroBatch
from embedstream.stream.chunking import Chunker
from embedstream.stream.config import Settings
from embedstream.stream.dead_letters import DeadLetters
from embedstream.stream.embedding import Embedder
from embedstream.stream.errors import (
    EmbedderUnavailable,
    RegistryUnavailable,
    SinkError,
    SinkUnavailable,
)
from embedstream.stream.events import ChangeEvent
from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics
from embedstream.stream.offsets import commit_offsets, report_lag
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.route_sides import Route, RouteSides
from embedstream.stream.sparse import SparseEncoder
from embedstream.stream.store import Sink
from embedstream.stream.topic_ids import TopicIds
from embedstream.stream.vectors import ChunkVectors, Failure

__all__ = ["AppliedCallback", "Route", "StreamConsumer"]

log = logging.getLogger("embedstream.consumer")
# After a failed store maintenance run (e.g. the disk nearly full), the next try waits this.
_MAINTAIN_RETRY_S = 60.0

# Called after each flush with the events the store now holds and the time it acknowledged.
AppliedCallback = Callable[[Sequence[ChangeEvent], float], None]

_IDLE_POLL_S = 0.5
_LAG_REPORT_EVERY_S = 5.0


class StreamConsumer(Reading, Rebalancing):
    """Runs the consume, plan, embed, apply, commit loop (reading a message:
    :mod:`embedstream.stream._reading`; rebalances: :mod:`embedstream.stream._rebalance`)."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        dead_letters: DeadLetters,
        chunker: Chunker,
        embedder: Embedder,
        routes: Sequence[Route],
        metrics: Metrics,
        on_applied: AppliedCallback | None = None,
        health: Health | None = None,
        clock: Callable[[], float] = time.monotonic,
        topic_ids: TopicIds | None = None,
        ensure_dlq: Callable[[set[str]], None] | None = None,
        sparse: SparseEncoder | None = None,
    ) -> None:
        self._settings = settings
        self._sparse = sparse  # document sparse vectors (retrieval.sparse), or None
        self._consumer = consumer
        self._dead_letters = dead_letters
        self._chunker = chunker
        self._embedder = embedder
        # Makes the dead-letter topics of topics assigned (a pattern's topic may be new).
        self._routes = RouteSides(routes, settings, metrics, ensure_dlq)
        self._metrics = metrics
        self._on_applied = on_applied
        self._health = health or Health(settings.metrics.liveness_timeout_s)
        self._chunk_vectors = ChunkVectors(embedder, metrics)
        self._clock = clock
        self._topic_ids = topic_ids
        self._batch = self._new_batch()
        self._adaptive = settings.embed.batching == "adaptive"
        self._subscribed = False
        self._pressure = Backpressure(consumer, metrics, self._health, clock)
        self._failed = False
        # Offsets of applied batches, committed at the next checkpoint.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._checkpoint_at: float | None = None
        self._next_lag_report = 0.0
        # A route whose maintenance run failed waits until then before the next try.
        self._maintain_after: dict[str, float] = {}
        self.assigned: set[tuple[str, int]] = set()
        # Next offset committed per partition by this process (for callers waiting to catch up).
        self.committed: dict[tuple[str, int], int] = {}

    @property
    def sink(self) -> Sink:
        """The first route's store, written now (another one after following a
        rebuild's alias); with one route, the store."""
        return next(iter(self._routes)).sink

    @property
    def sinks(self) -> dict[str, Sink]:
        """Each route's store, by route name."""
        return {route.name: route.sink for route in self._routes}

    # -- lifecycle ---------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Consume until ``until()`` is true (checked between polls; safe to flip
        from a signal handler), then flush and commit. May be called again;
        :meth:`close` leaves the group."""
        self.start()
        try:
            while not (until and until()):
                self.step()
        except BaseException:
            # The batch may hold messages neither applied nor dead-lettered:
            # leaving the group (close) must not commit past them.
            self._failed = True
            raise
        self._finish()

    def start(self) -> None:
        """Join the group (once); :meth:`step` then drives the loop."""
        if not self._subscribed:
            # The first store maintenance after an open can be long (it tidies what a
            # crash left): made now, it holds up no partition and no poll.
            self._maintain(self._clock())
            self._consumer.subscribe(
                self._routes.subscription(),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._subscribed = True
            self._health.set_partitions(0)  # none until the group assigns some
            self._health.started()

    def close(self) -> None:
        """Leave the group and release the DLQ producer. Leaving revokes the
        partitions, which applies and checkpoints what is batched if the store answers."""
        self._consumer.close()
        self._dead_letters.close()
        self._routes.close()

    def step(self) -> None:
        """One poll of the loop: read what is there, apply the batch when it is
        due, checkpoint when that is due."""
        self._health.beat()
        messages = self._poll()
        # Adaptive batching: nothing more fetched and waiting means the batch goes now
        # (a quiet stream pays no deadline; under load the queue refills while a batch
        # is embedded, so batches grow with the load).
        # (A full poll says nothing of what is left: the next poll, made without waiting
        # while a batch is open (_poll_timeout), comes back empty if nothing was fetched.)
        drained = self._adaptive and len(messages) < self._settings.kafka.poll_max_messages
        for index, message in enumerate(messages):
            try:
                self._take(message)
                if message.error() is None:
                    self._pressure.took(*_where(message))
            except RegistryUnavailable as error:
                # Read again once the registry answers: nothing of these is batched,
                # dead-lettered or committed meanwhile.
                self._pressure.rewind(messages[index:], self.assigned)
                self._pressure.back_off(error)
                break
            if self._batch.full and not self._pressure.waiting:
                self._flush()
        else:
            self._pressure.quiet(self._clock())
        now = self._clock()
        self._dead_letters.poll()
        if self._topic_ids is not None:
            self._topic_ids.poll()
        if self._pressure.waiting:
            if self._pressure.due(now) and self._flush() and self._checkpoint():
                self._pressure.resume()  # also when there was nothing left to write
        elif self._batch.due(now) or (drained and not self._batch.empty):
            self._flush()
        if not self._pressure.waiting and self._checkpoint_due(now):
            self._checkpoint()
        for route in self._routes:
            if route.follower and not self._pressure.waiting \
                    and route.follower.needs_drain(route.sink, now) \
                    and self._flush() and self._checkpoint():
                # Between checkpoints only: all applied so far is in the old collection.
                route.sink, moved = route.follower.follow(
                    route.sink, self._routes.owned_by(route, self.assigned))
                self.committed.update(moved)
        if not self._pressure.waiting and not self._uncommitted:
            self._maintain(now)  # all applied is committed: a pause now delays no offset
        if now >= self._next_lag_report:
            report_lag(self._consumer, self.assigned, self._metrics)
            self._next_lag_report = now + _LAG_REPORT_EVERY_S

    def _poll(self) -> list[Message]:
        """Wait (at most until the batch is due) for the first message, then take
        what has already been fetched without waiting.

        ``consume(n, timeout)`` alone would block until it has ``n`` messages or
        the timeout passes, holding every quiet-topic event back for the timeout.
        """
        first = self._consumer.poll(self._poll_timeout())
        if first is None:
            return []
        rest = self._settings.kafka.poll_max_messages - 1
        return [first, *(self._consumer.consume(rest, timeout=0) if rest else [])]

    def _poll_timeout(self) -> float:
        now = self._clock()
        if self._pressure.retry_at is not None:
            return min(_IDLE_POLL_S, max(0.0, self._pressure.retry_at - now))
        if self._adaptive and not self._batch.empty:
            return 0.0  # adaptive: what is already fetched joins the batch; if none, it goes
        waits = [_IDLE_POLL_S]
        if (left := self._batch.time_left(now)) is not None:
            waits.append(left)
        if self._checkpoint_at is not None:
            waits.append(max(0.0, self._checkpoint_at - now))
        return min(waits)

    def _new_batch(self) -> MicroBatch:
        embed = self._settings.embed
        return MicroBatch(max_tokens=embed.max_batch_tokens, max_wait_s=embed.max_wait_ms / 1000)

    # -- writing -----------------------------------------------------------------

    def _flush(self) -> bool:
        """Apply the batch; its offsets wait for the next checkpoint. False
        when the store is unavailable (retried later)."""
        batch = self._batch
        if batch.empty:
            return True
        try:
            acknowledged_at, applied = self._apply(batch)
        except (SinkUnavailable, EmbedderUnavailable) as error:
            self._pressure.back_off(error)
            return False
        self._pressure.resume()
        self._uncommitted.update(batch.next_offsets)
        self._observe(batch, applied, acknowledged_at)
        self._batch = self._new_batch()
        now = self._clock()
        if self._checkpoint_at is None:
            self._checkpoint_at = now + self._settings.sink.flush_interval_ms / 1000
        # Checked here too: one poll may bring many batches' worth of messages.
        return self._checkpoint() if self._checkpoint_due(now) else True

    def _checkpoint_due(self, now: float) -> bool:
        return self._checkpoint_at is not None and now >= self._checkpoint_at

    def _checkpoint(self) -> bool:
        """Make the applied writes durable, then commit their offsets (and
        acknowledge their dead letters first). False when the store is
        unavailable (retried later; nothing is committed)."""
        if not self._uncommitted:
            self._checkpoint_at = None
            return True
        try:
            for route in self._routes:  # every store first, then the commit
                call_sink(self._metrics, "flush", route.sink.flush)
        except SinkUnavailable as error:
            self._pressure.back_off(error)
            return False
        self._pressure.resume()
        self._dead_letters.flush()
        if commit_offsets(self._consumer, self._uncommitted, self._metrics):
            self.committed.update(self._uncommitted)
        self._uncommitted, self._checkpoint_at = {}, None
        return True

    def _maintain(self, now: float) -> None:
        """The stores' index upkeep, in the loop (never in a rebalance callback or at
        shutdown), when everything applied is committed. Each run is bounded by what was
        written since the last (``sink.index.maintenance``); one that fails is logged
        and tried again later: the writes it would index are safe either way."""
        for route in self._routes:
            if now >= self._maintain_after.get(route.name, 0.0) \
                    and route.sink.maintenance_due():
                self._health.beat()
                try:
                    call_sink(self._metrics, "optimize", route.sink.maintain)
                except SinkError as error:
                    log.warning("store maintenance of route %s failed (tried again in "
                                "%.0f s): %s", route.name, _MAINTAIN_RETRY_S, error)
                    self._maintain_after[route.name] = self._clock() + _MAINTAIN_RETRY_S

    def _apply(self, batch: MicroBatch) -> tuple[float, list[ChangeEvent]]:
        """Apply the batch; returns when the store acknowledged it and what it applied."""

        by_route: dict[str, list[PreparedEvent]] = {}
        for prepared in batch.events:
            route = self._routes.of(prepared.event.position.topic)
            assert route is not None  # only routed messages are batched
            by_route.setdefault(route.name, []).append(prepared)
        applied: list[ChangeEvent] = []
        for name, events in by_route.items():
            def dead_letter(winner: PreparedEvent, failure: Failure, route: str = name) -> None:
                self._dead_letter(batch.raw[winner.event.position], *failure,
                                  kind=winner.event.kind, route=route)

            # Kept on the batch, so a retry of it neither dead-letters nor writes them
            # again; a retry after one route's store failed re-applies the others' as
            # no-ops (the version guard).
            applied += apply_batch(events, self._routes[name].sink, self._chunk_vectors,
                                   self._metrics, dead_letter, batch.dead_lettered, route=name,
                                   sparse=self._sparse)
        return time.time(), applied

    def _observe(self, batch: MicroBatch, applied: list[ChangeEvent], acked_at: float) -> None:
        self._metrics.batch_events.observe(batch.messages)
        self._metrics.batch_token_fill.observe(batch.tokens / batch.max_tokens)
        for event in applied:
            if event.source_ts_ms is not None and (route := self._routes.of(event.position.topic)):
                self._metrics.freshness.labels(route=route.name).observe(
                    max(0.0, acked_at - event.source_ts_ms / 1000))
        if self._on_applied is not None:
            self._on_applied(applied, acked_at)

    # -- backpressure ------------------------------------------------------------

    def _finish(self) -> None:
        """Apply what is batched and checkpoint, retrying a while if the store is down."""
        deadline = self._clock() + 20.0
        while not (self._flush() and self._checkpoint()):
            if self._clock() >= deadline:
                log.error("store or embedding API still unavailable at shutdown; "
                          "uncommitted events will replay")
                return
            time.sleep(min(self._pressure.backoff_s, 2.0))


def _where(message: Message) -> tuple[str, int, int]:
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
