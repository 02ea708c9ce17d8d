"""Progress reporting for long rebuilds, without third-party dependencies.

:class:`Progress` is told how far the work is (:meth:`~Progress.update`, called
often) and reports it in one of two ways, chosen once from ``stream.isatty()``:

* a terminal gets one self-overwriting line (``\\r``), redrawn at most four times
  a second: a bar and percentage when the total is known, done/total, the rate
  over the whole run and over the last 30 seconds, the ETA (``h:mm:ss``) and the
  caller's figures (``chunks=``, ``tokens=``, ...);
* anything else (a log file, a pipe, a service's stderr) gets an INFO record on
  the ``embedstream.bulk`` logger every ``interval_s`` seconds with the same
  information, also as ``extra={"progress": {...}}`` for structured log handlers.

:meth:`~Progress.close` always reports a final line. Everything depends only on
the injected ``clock``, so output is deterministic under test.

Not guaranteed: that ``update`` reports at all (it is throttled); that the ETA is
right (it assumes the recent rate holds); anything about other writers to the
same terminal, whose output the line can overwrite or be split by.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["Progress", "format_duration"]

log = logging.getLogger("embedstream.bulk")

_REDRAW_S = 0.25  # terminal redraws at most this often: drawing costs, flicker annoys
_WINDOW_S = 30.0  # the "recent" rate looks back this far
_SAMPLE_S = 0.5  # keep a rate sample at most this often: bounds the window's memory
_BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (hours unbounded), rounded to whole seconds."""
    total = max(0, round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _number(value: float | int) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.4g}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream: TextIO) -> int | None:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # not a real terminal (or a fake one)
        return None


class Progress:
    """Reports ``done`` out of ``total`` (``None``: unknown) in ``unit``.

    ``start`` is what was already done when this run began (a resumed rebuild):
    it counts towards done/total but not towards the rates.
    """

    def __init__(self, total: int | None, *, interval_s: float = 10.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 unit: str = "docs", start: int = 0) -> None:
        self._total, self._interval_s, self._unit = total, interval_s, unit
        # Looked up now, not at import: sys.stderr may have been replaced since.
        self._stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._terminal = _is_terminal(self._stream)
        self._t0 = clock()
        self._start = start
        self._done = start
        self._figures: dict[str, float | int] = {}
        self._samples: deque[tuple[float, int]] = deque([(self._t0, start)])
        self._last_report = self._t0
        self._reported = False
        self._line_len = 0
        self._closed = False

    def set_total(self, total: int | None) -> None:
        """The total, once known (a Kafka snapshot knows it after its fold); the
        next report shows it. Safe to call from another thread than ``update``'s:
        one attribute is replaced, and reports only read it."""
        self._total = total

    def update(self, done: int, **figures: float | int) -> None:
        """Record progress; reports if the redraw (terminal) or log interval is due."""
        if self._closed:
            return
        now = self._clock()
        self._done = done
        self._figures.update(figures)
        if now - self._samples[-1][0] >= _SAMPLE_S:
            self._samples.append((now, done))
            # Keep one sample at or before the window's start, so the window is full.
            while len(self._samples) > 2 and self._samples[1][0] <= now - _WINDOW_S:
                self._samples.popleft()
        if self._terminal:  # the first update draws at once: a terminal user is waiting
            due = not self._reported or now - self._last_report >= _REDRAW_S
        else:
            due = now - self._last_report >= self._interval_s
        if due:
            self._report(now, final=False)

    def close(self) -> None:
        """Report the final state (a terminal line is ended with a newline)."""
        if self._closed:
            return
        self._closed = True
        self._report(self._clock(), final=True)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The figures a report shows, as plain values (``None`` where unknown)."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        rate = (self._done - self._start) / elapsed if elapsed > 0 else None
        t_old, done_old = self._samples[0]
        recent = (self._done - done_old) / (now - t_old) if now - t_old > 0 else None
        eta = None
        total = self._total  # read once: set_total may replace it meanwhile
        if total is not None:
            speed = recent if recent else rate
            if self._done >= total:
                eta = 0.0
            elif speed and speed > 0:
                eta = (total - self._done) / speed
        return {
            "done": self._done, "total": total, "unit": self._unit,
            "percent": (100.0 * self._done / total) if total else None,
            "elapsed_s": elapsed, "rate": rate, "recent_rate": recent, "eta_s": eta,
            "figures": dict(self._figures),
        }

    def _report(self, now: float, *, final: bool) -> None:
        self._last_report, self._reported = now, True
        snap = self.snapshot(now)
        if self._terminal:
            self._draw(self._text(snap), final)
        else:
            # The figures go in the message too: not every log formatter shows `extra`.
            log.info("%s: %s", "done" if final else "progress", self._text(snap),
                     extra={"progress": {**snap, "final": final}})

    def _text(self, snap: dict[str, Any]) -> str:
        parts = []
        done = _number(snap["done"])
        if snap["total"] is not None:
            parts.append(f"{done}/{_number(snap['total'])} {self._unit}")
            if snap["percent"] is not None:
                parts.append(f"{snap['percent']:.1f}%")
        else:
            parts.append(f"{done} {self._unit}")
        if snap["rate"] is not None:
            parts.append(f"{snap['rate']:,.1f} {self._unit}/s")
        if snap["recent_rate"] is not None:
            parts.append(f"(recent {snap['recent_rate']:,.1f}/s)")
        if snap["total"] is not None:
            eta = snap["eta_s"]
            parts.append("ETA " + (format_duration(eta) if eta is not None else "?"))
        parts.append(f"elapsed {format_duration(snap['elapsed_s'])}")
        parts.extend(f"{k}={_number(v)}" for k, v in snap["figures"].items())
        return "  ".join(parts)

    def _draw(self, text: str, final: bool) -> None:
        if self._total:
            filled = min(_BAR_WIDTH, int(_BAR_WIDTH * self._done / self._total))
            text = f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {text}"
        columns = _columns(self._stream)
        if columns is not None:
            # A line wider than the terminal wraps, and `\r` then redraws only its tail.
            text = text[: max(1, columns - 1)]
        # Spaces wipe what a longer previous line left behind.
        pad = " " * max(0, self._line_len - len(text))
        self._line_len = len(text)
        self._stream.write(f"\r{text}{pad}" + ("\n" if final else ""))
        self._stream.flush()
