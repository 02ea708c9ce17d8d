"""The asyncio side of one remote ``embed`` call: its shared state, retry waits,
and the helpers that run it on the embedder's own loop without a thread.

:mod:`embedstream.stream.remote_embedding` drives the loop from the calling thread
(``run_until_complete``); what asyncio would hand to its default thread pool (host
name resolution) runs inline instead (:class:`InlineExecutor`), and nothing of a
call is left running on the loop when it returns (:func:`all_or_none`,
:func:`close_loop`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
import numpy.typing as npt

from embedstream.stream.config import EmbedSettings

__all__ = ["Call", "InlineExecutor", "all_or_none", "close_loop", "new_loop", "retry_wait"]

Matrix = npt.NDArray[np.float32]
T = TypeVar("T")


class InlineExecutor(ThreadPoolExecutor):
    """Runs what asyncio would hand to its default thread pool (``getaddrinfo``)
    right away, on the loop's thread: no thread is ever started (a pool starts its
    threads in ``submit``, replaced here; asyncio insists on a ThreadPoolExecutor)."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


@dataclass(slots=True)
class Call:
    """What the requests of one ``embed`` call share."""

    texts: list[str]
    tokens: list[int]
    rows: list[Matrix | None]
    failed: dict[int, tuple[str, str]]
    deadline: float  # clock time; inf without a call budget
    input_type: str | None = None  # sent as embed.input_type.key, when set


def retry_wait(settings: EmbedSettings, attempt: int, retry_after: float | None,
               jitter: Callable[[], float]) -> float:
    """Seconds before retry number ``attempt`` (from 0): the server's ``Retry-After``
    when it gave one, else an exponential backoff (``embed.backoff_*``)."""
    if retry_after is not None:
        # Never earlier than asked; a little later, so waiters do not return at once
        # (and not at once after a "Retry-After: 0").
        return max(retry_after, 0.01) * (1.0 + 0.1 * jitter())
    # Exponential with "equal jitter": half fixed (the wait grows), half random.
    cap = min(settings.backoff_max_s, settings.backoff_initial_s * 2.0 ** attempt)
    return cap / 2 * (1.0 + jitter())


async def all_or_none(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``coroutines`` concurrently; when one raises, cancel the others and wait
    for them before re-raising, so nothing is left running on the loop."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def new_loop() -> asyncio.AbstractEventLoop:
    """A new event loop, to drive from the calling thread, that starts no thread."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(InlineExecutor())
    return loop


def close_loop(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient) -> None:
    """Cancel and wait out what is left on ``loop``, close ``client`` on it, then
    ``loop`` itself; nothing if ``loop`` is closed already."""
    if not loop.is_closed():
        # Requests of a call interrupted from outside (KeyboardInterrupt) never resume.
        leftovers = asyncio.all_tasks(loop)
        if leftovers:
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(client.aclose())
        loop.close()
