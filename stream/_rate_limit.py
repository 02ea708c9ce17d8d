"""Client-side rate limits for a remote embedder: requests/min and tokens/min.

Each limit is a token bucket holding one second's worth (at least one request,
so a limit of 30/min sends one request every two seconds rather than a burst of
30). A request larger than the bucket waits for a full bucket and then drives
it negative, so the long-run rate stays within the limit without refusing big
requests. A 429's ``Retry-After`` blocks every request until it has passed
(:meth:`RateLimiter.block`): hammering a provider that said "wait" only earns
more 429s.

How many requests are in flight adapts too (:class:`ConcurrencyWindow`): halved
on each 429, grown back slowly with successes, as TCP does, so a client
sharing a provider's limit with others settles just under it instead of sending
``max_concurrency`` requests that all but one get refused again.

All of this runs on one asyncio loop (the embedder's), so nothing here locks
across threads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from embedstream.stream.errors import EmbedderUnavailable

__all__ = ["ConcurrencyWindow", "RateLimiter", "TokenBucket"]


class TokenBucket:
    """``per_minute`` units a minute, at most one second's worth (>= 1) at once."""

    def __init__(self, per_minute: float, clock: Callable[[], float]) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self._level = self.capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._updated) * self.rate)
        self._updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` may be taken (a request over the capacity
        needs a full bucket)."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self._level >= need else (need - self._level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self._level -= amount

    def correct(self, delta: float) -> None:
        """Take ``delta`` more (or give back, if negative): the provider counted
        the tokens differently than our estimate."""
        self._refill()
        self._level = min(self.capacity, self._level - delta)


class RateLimiter:
    """Both buckets (either may be absent) and the provider's own "wait until"."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None,
                 clock: Callable[[], float], sleep: Callable[[float], Awaitable[None]]) -> None:
        self._requests = TokenBucket(requests_per_minute, clock) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, clock) if tokens_per_minute else None
        self._clock = clock
        self._sleep = sleep
        self._blocked_until = 0.0
        self._turn = asyncio.Lock()

    def block(self, seconds: float) -> None:
        """The provider asked every request to wait ``seconds`` (Retry-After)."""
        self._blocked_until = max(self._blocked_until, self._clock() + seconds)

    def _wait(self, tokens: int) -> float:
        waits = [self._blocked_until - self._clock()]
        if self._requests is not None:
            waits.append(self._requests.wait_for(1))
        if self.tokens is not None:
            waits.append(self.tokens.wait_for(tokens))
        return max(0.0, *waits)

    async def acquire(self, tokens: int, deadline: float) -> tuple[float, float]:
        """Wait until one request of ``tokens`` tokens may go, then count it.

        Requests are admitted in the order they ask. Returns the seconds waited on
        the buckets and on the provider's Retry-After. Raises
        :class:`EmbedderUnavailable` (nothing taken) when the wait would end after
        ``deadline`` (a clock time; ``math.inf`` for none)."""
        limited = blocked = 0.0
        # In turn: a large request waiting for its tokens is not overtaken by small ones.
        async with self._turn:
            while (wait := self._wait(tokens)) > 0:
                if self._clock() + wait > deadline:
                    raise EmbedderUnavailable(
                        f"the embedding rate limits need a {wait:.1f}s wait, past this "
                        "call's budget (embed.give_up_after_s)", retry_after=wait)
                if self._blocked_until > self._clock():
                    blocked += wait
                else:
                    limited += wait
                await self._sleep(wait)
            if self._requests is not None:
                self._requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)
        return limited, blocked


class ConcurrencyWindow:
    """At most ``limit`` requests in flight; ``limit`` is halved by :meth:`throttled`
    and grows by ``1/(4 * limit)`` per :meth:`succeeded` (additive increase,
    multiplicative decrease; a quarter of TCP's growth, so a full window of
    successes is needed before probing for one more slot), between 1 and ``maximum``.

    Slots go in arrival order."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.in_flight < int(self.limit) and not self._waiters:
            self.in_flight += 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # granted just as it was cancelled: pass the slot on
            elif granted in self._waiters:
                self._waiters.remove(granted)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._grant()

    def throttled(self) -> None:
        self.limit = max(1.0, self.limit / 2)

    def succeeded(self) -> None:
        self.limit = min(float(self.maximum), self.limit + 0.25 / self.limit)
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            granted = self._waiters.popleft()
            if not granted.done():
                self.in_flight += 1
                granted.set_result(None)
