"""A micro-batch: the events read since the last flush and the offsets they cover."""

from __future__ import annotations

from dataclasses import dataclass, field

from confluent_kafka import Message

from embedstream.stream.events import Position
from embedstream.stream.plan import PreparedEvent

__all__ = ["MicroBatch"]


@dataclass
class MicroBatch:
    """Closes at ``max_tokens`` or ``max_wait_s`` after its first message.

    ``next_offsets`` covers every message read into the batch, including ones
    that were skipped or dead-lettered, so committing it moves past them too.
    """

    max_tokens: int
    max_wait_s: float
    events: list[PreparedEvent] = field(default_factory=list)
    # The message of each event, kept to dead-letter it if it fails later (in embedding).
    raw: dict[Position, Message] = field(default_factory=dict)
    # Events already dead-lettered by a failed attempt at this batch, and why (not sent twice).
    dead_lettered: dict[Position, tuple[str, str]] = field(default_factory=dict)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    tokens: int = 0
    messages: int = 0
    opened_at: float | None = None

    def track(self, position: Position, now: float) -> None:
        if self.opened_at is None:
            self.opened_at = now
        self.messages += 1
        key = (position.topic, position.partition)
        self.next_offsets[key] = max(self.next_offsets.get(key, 0), position.offset + 1)

    def add(self, prepared: PreparedEvent, message: Message | None = None) -> None:
        self.events.append(prepared)
        if message is not None:
            self.raw[prepared.event.position] = message
        self.tokens += prepared.n_tokens

    @property
    def empty(self) -> bool:
        return self.messages == 0

    @property
    def full(self) -> bool:
        return self.tokens >= self.max_tokens

    def due(self, now: float) -> bool:
        return self.opened_at is not None and (
            self.full or now - self.opened_at >= self.max_wait_s
        )

    def time_left(self, now: float) -> float | None:
        """Seconds until the batch is due, or None while it is empty."""
        if self.opened_at is None:
            return None
        return max(0.0, self.opened_at + self.max_wait_s - now)

    def drop_partitions(self, lost: set[tuple[str, int]]) -> None:
        """Forget messages of partitions this consumer no longer owns."""
        self.events = [
            p for p in self.events
            if (p.event.position.topic, p.event.position.partition) not in lost
        ]
        self.tokens = sum(p.n_tokens for p in self.events)
        self.raw = {k: m for k, m in self.raw.items() if (k.topic, k.partition) not in lost}
        for key in lost:
            self.next_offsets.pop(key, None)
        if not self.next_offsets:
            self.messages, self.opened_at = 0, None
