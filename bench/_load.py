"""What other processes did to the machine while a benchmark ran."""

from __future__ import annotations

import os
import time

__all__ = ["OtherLoad"]


class OtherLoad:
    """Mean CPU cores used by other processes since creation: /proc/stat less
    this process and the children it has waited for (a consumer subprocess)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float | None, float, float]:
        try:
            with open("/proc/stat") as stat:
                v = [int(x) for x in stat.readline().split()[1:9]]
            busy: float | None = sum(v[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = None
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def cores(self) -> float | None:
        (busy0, own0, t0), (busy, own, t) = self._start, self._sample()
        if busy is None or busy0 is None:
            return None
        return round(max(0.0, busy - busy0 - (own - own0)) / (t - t0), 2)
