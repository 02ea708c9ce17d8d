"""Free space on the filesystem of a local store, checked before the store writes.

Qdrant Edge writes through memory maps. On a full filesystem the kernel cannot
back a page the store writes to and kills the process with SIGBUS: no
exception, no log line, and again at every restart, as opening a store writes
too. :class:`DiskGuard` refuses a write instead, with
:class:`~embedstream.stream.errors.StoreDiskFull`, while the filesystem has less
than ``sink.min_free_bytes`` free; the consumer pauses on it as on a store
outage and resumes once space is freed.

Guaranteed: a refused write wrote nothing; the guard logs once when it starts
refusing and once when it stops. Not guaranteed: that ``min_free_bytes`` is
enough. The check runs before each write; a write larger than the margin, or
another process filling the disk meanwhile, can still fill it. Each check is
one ``statvfs`` call (microseconds).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from embedstream.stream.errors import StoreDiskFull

__all__ = ["DiskGuard", "FreeBytes", "free_bytes"]

log = logging.getLogger("embedstream.sinks")

# How a guard learns the free space of the filesystem holding a path.
FreeBytes = Callable[[Path], int]


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding
    ``path`` (or its nearest existing parent, before the store creates it)."""
    for candidate in (path, *path.absolute().parents):
        try:
            stat = os.statvfs(candidate)
        except FileNotFoundError:
            continue
        return stat.f_bavail * stat.f_frsize
    raise FileNotFoundError(f"no existing directory above {path}")


class DiskGuard:
    """Refuses writes to the store at ``path`` while its filesystem has less than
    ``min_free_bytes`` free (0: never). ``where`` names the store in messages."""

    def __init__(self, path: Path, min_free_bytes: int, where: Callable[[], str],
                 free: FreeBytes = free_bytes) -> None:
        self._path = path
        self._min = min_free_bytes
        self._where = where
        self._free = free
        self._low = False

    def has_room(self) -> bool:
        """:meth:`check` as a yes or no."""
        try:
            self.check()
        except StoreDiskFull:
            return False
        return True

    def check(self) -> None:
        """Raise :class:`StoreDiskFull` when a write now could fill the filesystem."""
        if self._min <= 0:
            return
        try:
            free = self._free(self._path)
        except OSError as error:  # cannot tell: the store's own errors will say more
            log.debug("free space of %s unknown: %s", self._path, error)
            return
        if free >= self._min:
            if self._low:
                self._low = False
                log.info("%s: %s free on the filesystem of %s again; writing resumes",
                         self._where(), _size(free), self._path)
            return
        message = (f"{self._where()}: only {_size(free)} free on the filesystem of "
                   f"{self._path}, below sink.min_free_bytes ({_size(self._min)}); "
                   "nothing is written until space is freed (Qdrant Edge dies with SIGBUS "
                   "on a full disk)")
        if not self._low:
            self._low = True
            log.error("%s", message)
        raise StoreDiskFull(message, str(self._path), free, self._min)


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB)"
