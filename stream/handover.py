"""The consumer's side of a rebuild's handover: follow the alias, start at the handover offsets.

A rebuild fills a new collection, catches it up to some offset per partition,
stores those offsets in it (the handover record) and then points the alias at
it. :class:`AliasFollower` is how the live consumer takes over from there:

* about once a second (and only between checkpoints, so every write made so
  far is applied and committed) it resolves the alias; when it points at
  another collection, the consumer opens that one and closes the old one;
* each partition this consumer owns that the record names, and that its group
  has not acknowledged yet, is moved to the record's offset: seek, commit that
  offset, then acknowledge it in the record. Messages of such a partition read
  before the move are ignored. The same happens when a partition is assigned
  later (a restart, a rebalance), so a crash at any point repeats the move
  rather than skipping it;
* a newly assigned partition is held (its messages ignored, then read again)
  until the alias has been checked after the assignment, so with several
  consumers none writes a partition into a collection the alias has left.

Together with the rebuild this applies every event to the new collection
once: the rebuild applied everything below the handover offset, the stream
applies everything from it. A consumer whose fingerprint differs from the new
collection's (a model change) stops with :class:`~embedstream.stream.errors.FingerprintMismatch`
when it tries to follow; restarted with the new model it resumes at the
handover offsets, so nothing is lost in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from confluent_kafka import Consumer, KafkaException, TopicPartition

from embedstream.stream.errors import FingerprintMismatch, SinkError
from embedstream.stream.store import Sink, SinkAdmin

__all__ = ["AliasFollower"]

log = logging.getLogger("embedstream.consumer")

Partition = tuple[str, int]


class AliasFollower:
    """Follows ``alias`` for one consumer (see the module docstring)."""

    def __init__(self, consumer: Consumer, admin: SinkAdmin, alias: str, group_id: str,
                 open_sink: Callable[[str], Sink], clock: Callable[[], float],
                 interval_s: float = 1.0) -> None:
        self._consumer = consumer
        self._admin = admin
        self._alias = alias
        self._group = group_id
        self._open_sink = open_sink
        self._clock = clock
        self._interval_s = interval_s
        self._next_check = 0.0
        self._target: str | None = None           # the alias's target at the last check
        # Assigned since the last check: held (nothing written) until the alias is
        # checked, so a partition never goes into a collection the alias has left.
        # Value: the first offset read (and ignored) meanwhile, to read again from.
        self._unchecked: dict[Partition, int | None] = {}
        self._pending: dict[Partition, int] = {}  # owned, to move to the handover offset
        self._floor: dict[Partition, int] = {}    # moved: ignore anything read below this

    def close(self) -> None:
        self._admin.close()

    def ignores(self, partition: Partition, offset: int) -> bool:
        """True for a message not to apply now: its partition is held or about to
        move (it is read again from the right offset), or it lies below a move."""
        if partition in self._unchecked:
            if self._unchecked[partition] is None:
                self._unchecked[partition] = offset
            return True
        return partition in self._pending or offset < self._floor.get(partition, 0)

    def on_assign(self, partitions: Collection[Partition]) -> None:
        """Hold newly assigned partitions until the next alias check (no store
        call here: this runs inside the rebalance callback)."""
        for partition in partitions:
            self._unchecked.setdefault(partition, None)

    def forget(self, partitions: Collection[Partition]) -> None:
        for partition in partitions:
            self._unchecked.pop(partition, None)
            self._pending.pop(partition, None)
            self._floor.pop(partition, None)

    def needs_drain(self, sink: Sink, now: float) -> bool:
        """Checks the alias when due (at once while partitions are held); True when
        the consumer must apply and checkpoint what it holds, then call :meth:`follow`."""
        if self._unchecked or now >= self._next_check:
            self._next_check = now + self._interval_s
            try:
                self._target = self._admin.resolve(self._alias)
            except SinkError as error:
                log.warning("cannot resolve alias %s (retrying): %s", self._alias, error)
                return False  # held partitions stay held until a check succeeds
        moved = self._target is not None and self._target != sink.collection
        return moved or bool(self._pending) or bool(self._unchecked)

    def follow(self, sink: Sink,
               assigned: Collection[Partition]) -> tuple[Sink, dict[Partition, int]]:
        """After :meth:`needs_drain` and a checkpoint (nothing batched or
        uncommitted): the sink to use from now on, and the offsets committed by
        moving partitions to a handover."""
        review = set(self._unchecked) & set(assigned)
        if self._target is not None and self._target != sink.collection:
            new = self._switch(sink, self._target)
            if new is None:
                return sink, {}
            sink = new
            review = set(assigned)  # every owned partition, under the new record
        if review:
            try:
                self._review(sink, review)
            except SinkError as error:  # store trouble: keep holding, retry next step
                log.warning("cannot read the handover record (retrying): %s", error)
                return sink, {}
        try:
            return sink, self._move(sink, assigned)
        except SinkError as error:
            log.warning("cannot acknowledge the handover (retrying): %s", error)
            return sink, {}

    def _switch(self, sink: Sink, target: str) -> Sink | None:
        try:
            new = self._open_sink(target)
        except FingerprintMismatch:
            raise
        except SinkError as error:  # e.g. the rebuild still holds it: retry shortly
            log.warning("alias %s moved to %s, which cannot be opened yet: %s",
                        self._alias, target, error)
            return None
        log.info("alias %s moved from %s to %s: following it", self._alias,
                 sink.collection, target)
        self._pending.clear()  # offsets of the old collection's record mean nothing here
        try:
            sink.close()
        except SinkError as error:  # flushed at the checkpoint before; only a release failed
            log.warning("closing %s: %s", sink.collection, error)
        return new

    def _review(self, sink: Sink, partitions: set[Partition]) -> None:
        """Queue the moves the record asks for; release the other held partitions,
        reading again what was ignored while they were held."""
        record = sink.read_handover()
        done = record.acknowledged.get(self._group, frozenset()) if record else frozenset()
        for partition in partitions:
            if record is not None and partition in record.offsets and partition not in done:
                self._pending[partition] = record.offsets[partition]
                self._unchecked.pop(partition, None)
        for partition in [p for p in partitions if p in self._unchecked]:
            first = self._unchecked[partition]
            if first is not None:
                try:
                    self._consumer.seek(TopicPartition(*partition, first))
                except KafkaException as error:  # not fetching yet: try again next step
                    log.info("re-reading %s later: %s", partition, error)
                    continue
            del self._unchecked[partition]

    def _move(self, sink: Sink, assigned: Collection[Partition]) -> dict[Partition, int]:
        moving = {tp: o for tp, o in self._pending.items() if tp in assigned}
        if not moving:
            return {}
        targets = [TopicPartition(t, p, o) for (t, p), o in sorted(moving.items())]
        try:
            for target in targets:
                self._consumer.seek(target)
            # Committed before it is acknowledged: a crash in between moves it again.
            self._consumer.commit(offsets=targets, asynchronous=False)
        except KafkaException as error:  # e.g. the assignment is not active yet
            log.info("moving %s to the handover offsets later: %s", sorted(moving), error)
            return {}
        sink.acknowledge_handover(self._group, list(moving))
        for partition, offset in moving.items():
            self._floor[partition] = offset
            del self._pending[partition]
        log.info("took over at the handover offsets %s",
                 {f"{t}[{p}]": o for (t, p), o in sorted(moving.items())})
        return moving
