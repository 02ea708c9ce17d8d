"""The streaming consumer: Kafka change events in, vectors in the store, offsets out.

One thread runs the loop; nothing here starts another. What is guaranteed:

* Offsets are committed only after the sink has applied every event at or
  before them and made it durable (``Sink.flush``), and dead-letter records for
  any undecodable ones are acknowledged. A crash at any moment therefore
  replays, never skips. Writes are searchable as soon as they are applied; the
  flush and commit (a checkpoint) follow at most ``sink.flush_interval_ms``
  later, so a crash replays at most that much work.
* Replays are harmless: the version guard in :mod:`stream.plan` makes an
  already-applied event a no-op, so a restart reaches the same final state as
  an uninterrupted run.
* While the store is unavailable, the consumer pauses its partitions and keeps
  polling (so the group does not evict it), and retries the batch with
  exponential backoff; nothing past the failed batch is committed.

Not guaranteed: ordering across documents, or that every intermediate version
of a document is ever written (a batch writes only each document's latest).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from sinks.base import DocState, Sink

from .batch import MicroBatch
from .chunking import Chunker
from .config import Settings
from .dead_letters import DeadLetters
from .decode import decode_message
from .embedding import Embedder
from .errors import DecodeError, SinkError, SinkUnavailable
from .events import ChangeEvent, Op, Position, Skipped
from .metrics import Metrics
from .plan import Folded, PreparedEvent, build_write, fold, group_by_document

__all__ = ["AppliedCallback", "StreamConsumer"]

log = logging.getLogger("embedstream.consumer")

# Called after each flush with the events the store now holds and the time it acknowledged.
AppliedCallback = Callable[[Sequence[ChangeEvent], float], None]

_IDLE_POLL_S = 0.5
_LAG_REPORT_EVERY_S = 5.0
_MAX_BACKOFF_S = 30.0


class StreamConsumer:
    """Runs the consume, plan, embed, apply, commit loop."""

    def __init__(
        self,
        settings: Settings,
        consumer: Consumer,
        dead_letters: DeadLetters,
        chunker: Chunker,
        embedder: Embedder,
        sink: Sink,
        metrics: Metrics,
        on_applied: AppliedCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._consumer = consumer
        self._dead_letters = dead_letters
        self._chunker = chunker
        self._embedder = embedder
        self._sink = sink
        self._metrics = metrics
        self._on_applied = on_applied
        self._clock = clock
        self._batch = self._new_batch()
        self._subscribed = False
        self._retry_at: float | None = None
        self._backoff_s = 0.0
        self._paused: list[TopicPartition] = []
        # Offsets of applied batches, committed at the next checkpoint.
        self._uncommitted: dict[tuple[str, int], int] = {}
        self._checkpoint_at: float | None = None
        self._next_lag_report = 0.0
        self.assigned: set[tuple[str, int]] = set()
        # Next offset committed per partition by this process (for callers waiting to catch up).
        self.committed: dict[tuple[str, int], int] = {}

    # -- lifecycle ---------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Consume until ``until()`` is true (checked between polls; safe to flip
        from a signal handler), then flush and commit. May be called again;
        :meth:`close` leaves the group."""
        if not self._subscribed:
            self._consumer.subscribe(
                list(self._settings.kafka.topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._subscribed = True
        while not (until and until()):
            self.step()
        self._finish()

    def close(self) -> None:
        """Leave the group (committing nothing more) and release the DLQ producer."""
        self._consumer.close()
        self._dead_letters.close()

    def step(self) -> None:
        """One poll of the loop: read what is there, apply the batch when it is
        due, checkpoint when that is due."""
        for message in self._poll():
            self._take(message)
            if self._batch.full and self._retry_at is None:
                self._flush()
        now = self._clock()
        if self._retry_at is not None:
            if now >= self._retry_at:
                _ = self._flush() and self._checkpoint()
        elif self._batch.due(now):
            self._flush()
        if self._retry_at is None and self._checkpoint_due(now):
            self._checkpoint()
        if now >= self._next_lag_report:
            self._report_lag()
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
        if self._retry_at is not None:
            return min(_IDLE_POLL_S, max(0.0, self._retry_at - now))
        waits = [_IDLE_POLL_S]
        if (left := self._batch.time_left(now)) is not None:
            waits.append(left)
        if self._checkpoint_at is not None:
            waits.append(max(0.0, self._checkpoint_at - now))
        return min(waits)

    def _new_batch(self) -> MicroBatch:
        embed = self._settings.embed
        return MicroBatch(max_tokens=embed.max_batch_tokens, max_wait_s=embed.max_wait_ms / 1000)

    # -- reading -----------------------------------------------------------------

    def _take(self, message: Message) -> None:
        kafka_error = message.error()
        if kafka_error is not None:
            if kafka_error.code() == KafkaError._PARTITION_EOF:
                return
            if kafka_error.fatal():
                raise KafkaException(kafka_error)
            log.warning("kafka error: %s", kafka_error)
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        position = Position(topic, partition, offset)
        self._batch.track(position, self._clock())
        try:
            decoded = decode_message(
                message.key(), message.value(), position, self._settings.source
            )
        except DecodeError as error:
            self._dead_letter(message, error.reason, error.detail, kind="undecodable")
            return
        if isinstance(decoded, Skipped):
            self._metrics.events.labels(op="none", outcome="skipped").inc()
            return
        chunks = []
        if decoded.op is Op.UPSERT:
            try:
                chunks = self._chunker.chunk(decoded.text)
            except Exception as error:  # one bad document must not stop the stream
                self._dead_letter(message, "chunk_failed", repr(error), kind=decoded.kind)
                return
        self._batch.add(PreparedEvent(decoded, chunks))

    def _dead_letter(self, message: Message, reason: str, detail: str, kind: str) -> None:
        log.warning(
            "dead-lettering %s[%d]@%d: %s: %s",
            message.topic(), message.partition(), message.offset(), reason, detail[:200],
        )
        self._dead_letters.send(message, reason, detail)
        self._metrics.dlq_records.labels(reason=reason).inc()
        self._metrics.events.labels(op=kind, outcome="dead_lettered").inc()

    # -- writing -----------------------------------------------------------------

    def _flush(self) -> bool:
        """Apply the batch; its offsets wait for the next checkpoint. False
        when the store is unavailable (retried later)."""
        batch = self._batch
        if batch.empty:
            return True
        try:
            acknowledged_at, applied = self._apply(batch.events)
        except SinkUnavailable as error:
            self._back_off(error)
            return False
        self._resume()
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
            with self._metrics.sink_seconds.labels(op="flush").time():
                self._sink_call("flush", self._sink.flush)
        except SinkUnavailable as error:
            self._back_off(error)
            return False
        self._resume()
        self._dead_letters.flush()
        self._commit(self._uncommitted)
        self._uncommitted, self._checkpoint_at = {}, None
        return True

    def _apply(self, events: list[PreparedEvent]) -> tuple[float, list[ChangeEvent]]:
        by_doc = group_by_document(events)
        with self._metrics.sink_seconds.labels(op="read_state").time():
            stored = self._sink_call("read_state", self._sink.document_states, by_doc)
        folded: list[Folded] = []
        for doc_id, doc_events in by_doc.items():
            outcome = fold(stored.get(doc_id), doc_events)
            for prepared in doc_events:
                applied = outcome.winner is not None and prepared is outcome.winner
                self._metrics.events.labels(
                    op=prepared.event.kind, outcome="applied" if applied else "stale"
                ).inc()
            if outcome.winner is not None:
                folded.append(outcome)
        vectors = self._vectors(folded, stored)
        writes = [build_write(item, vectors) for item in folded]
        if writes:
            with self._metrics.sink_seconds.labels(op="apply").time():
                self._sink_call("apply", self._sink.apply, writes)
        return time.time(), [item.winner.event for item in folded if item.winner]

    def _sink_call(self, op: str, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except SinkError:
            self._metrics.sink_errors.labels(op=op).inc()
            raise

    def _vectors(
        self, folded: list[Folded], stored: dict[str, DocState]
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Vectors by content hash for every chunk to write.

        Only texts that are new are embedded: a chunk whose exact text the store
        already holds for the same document reuses that vector, and identical
        texts within the batch (boilerplate shared by documents) are embedded once.
        """
        chunks = [chunk for item in folded if item.winner for chunk in item.winner.chunks]
        if not chunks:
            return {}
        # Only documents the store holds live can have vectors worth reusing.
        updated = [item.winner.event.doc_id for item in folded
                   if item.winner and item.winner.chunks
                   and (state := stored.get(item.winner.event.doc_id)) and not state.deleted]
        vectors: dict[str, npt.NDArray[np.float32]] = {}
        if updated:
            with self._metrics.sink_seconds.labels(op="read_vectors").time():
                held = self._sink_call("read_vectors", self._sink.stored_vectors, updated)
            wanted = {chunk.content_hash for chunk in chunks}
            vectors = {h: np.asarray(v, np.float32) for h, v in held.items() if h in wanted}
        new_texts: dict[str, str] = {}
        embedded_tokens = 0
        for chunk in chunks:
            if chunk.content_hash not in vectors and chunk.content_hash not in new_texts:
                new_texts[chunk.content_hash] = chunk.text
                embedded_tokens += chunk.n_tokens
        if new_texts:
            with self._metrics.embed_seconds.time():
                matrix = self._embedder.embed(list(new_texts.values()))
            vectors.update(zip(new_texts.keys(), matrix, strict=True))
        total_tokens = sum(chunk.n_tokens for chunk in chunks)
        self._metrics.chunks.labels(outcome="embedded").inc(len(new_texts))
        self._metrics.chunks.labels(outcome="reused").inc(len(chunks) - len(new_texts))
        self._metrics.tokens.labels(outcome="embedded").inc(embedded_tokens)
        self._metrics.tokens.labels(outcome="reused").inc(total_tokens - embedded_tokens)
        return vectors

    def _commit(self, next_offsets: dict[tuple[str, int], int]) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
        if not offsets:  # librdkafka answers an empty list with _NO_OFFSET
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as error:
            # The writes are applied; a failed commit only means a harmless replay.
            log.warning("offset commit failed (events will be replayed): %s", error)
            return
        self.committed.update(next_offsets)
        self._metrics.commits.inc()
        self._metrics.last_commit.set(time.time())

    def _observe(self, batch: MicroBatch, applied: list[ChangeEvent], acked_at: float) -> None:
        self._metrics.batch_events.observe(batch.messages)
        self._metrics.batch_token_fill.observe(batch.tokens / batch.max_tokens)
        for event in applied:
            if event.source_ts_ms is not None:
                self._metrics.freshness.observe(max(0.0, acked_at - event.source_ts_ms / 1000))
        if self._on_applied is not None:
            self._on_applied(applied, acked_at)

    # -- backpressure ------------------------------------------------------------

    def _back_off(self, error: SinkUnavailable) -> None:
        self._backoff_s = min(_MAX_BACKOFF_S, max(error.retry_after, self._backoff_s * 2 or 0.5))
        self._retry_at = self._clock() + self._backoff_s
        log.warning("store unavailable, retrying in %.1fs: %s", self._backoff_s, error)
        if not self._paused:
            self._paused = self._consumer.assignment()
            self._consumer.pause(self._paused)
            self._metrics.paused_partitions.set(len(self._paused))

    def _resume(self) -> None:
        self._retry_at, self._backoff_s = None, 0.0
        if self._paused:
            self._consumer.resume(self._paused)
            self._paused = []
            self._metrics.paused_partitions.set(0)

    def _finish(self) -> None:
        """Apply what is batched and checkpoint, retrying a while if the store is down."""
        deadline = self._clock() + 20.0
        while not (self._flush() and self._checkpoint()):
            if self._clock() >= deadline:
                log.error("store still unavailable at shutdown; uncommitted events will replay")
                return
            time.sleep(min(self._backoff_s, 2.0))

    # -- rebalancing -------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("assigned %s", sorted(self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what we have applied while we still own the partitions.
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        if not (self._flush() and self._checkpoint()):
            self._drop(revoked)
        self.assigned -= revoked

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: committing would be wrong; drop and replay.
        lost = {(tp.topic, tp.partition) for tp in partitions}
        self._drop(lost)
        self.assigned -= lost

    def _drop(self, partitions: set[tuple[str, int]]) -> None:
        """Forget unapplied events and uncommitted offsets of partitions we no
        longer own; their next owner replays them."""
        self._batch.drop_partitions(partitions)
        for key in partitions:
            self._uncommitted.pop(key, None)

    def _report_lag(self) -> None:
        if not self.assigned:
            return
        partitions = [TopicPartition(t, p) for t, p in sorted(self.assigned)]
        for tp in self._consumer.position(partitions):
            try:
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue
            position = tp.offset if tp.offset >= 0 else low
            self._metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                max(0, high - max(position, 0))
            )
