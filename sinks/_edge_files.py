"""The files of a Qdrant Edge store besides its shards: process locks and aliases.

Under the store directory ``path``:

* ``.<collection>.lock``: held (``flock``, exclusive) by the process that has
  the physical collection open, and holding its pid.
* ``aliases.json``: ``{"<alias>": "<physical collection>", ...}``. Replaced as
  a whole (temporary file, fsync, ``os.replace``, fsync of the directory), so
  a reader without a lock sees the old mapping or the new one, whole, and a
  change survives a machine crash once made.
* ``.aliases.lock``: held (``flock``, exclusive, blocking) while the aliases
  change, so that read-modify-write changes from several processes do not
  lose one another.
* ``aliases.json.damaged``: a damaged ``aliases.json`` as it was when
  ``collections switch`` rewrote it.
* ``.<directory>.dropped``: a collection's directory being deleted (renamed
  first, so that a drop interrupted half-way leaves nothing half-deleted
  under a collection's name); the next drop removes what is left.
* ``.query-<pid>.json``: ``{"pid": <pid>, "url": "http://host:port"}``, where
  the process of that pid (a running consumer) answers queries on the
  collections it holds; written whole (temporary file, ``os.replace``) once it
  serves, removed when it stops. A process killed leaves it behind: it means
  something only while a lock file names the same pid and is held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embedstream.stream.errors import NeedsOperator, SinkError
from embedstream.stream.names import name_error, name_problem

__all__ = ["ALIASES_FILE", "AliasRegistry", "ProcessLock", "holder_text", "is_shard", "lock_path",
           "query_address", "remove_query_address", "write_query_address"]

ALIASES_FILE = "aliases.json"
DAMAGED_FILE = "aliases.json.damaged"  # a damaged aliases.json, kept by the repair

log = logging.getLogger("embedstream.sinks")


def lock_path(root: Path, collection: str) -> Path:
    return root / f".{collection}.lock"


def is_shard(directory: Path) -> bool:
    """Whether ``directory`` holds an Edge shard (its WAL and segments), judged
    without loading it: loading a directory that is not a shard writes into it."""
    return (directory / "wal").is_dir() and (directory / "segments").is_dir()


class ProcessLock:
    """An exclusive ``flock`` on a file holding the owner's pid.

    ``flock`` locks belong to the open file, so a second open in the same
    process is refused too, and the kernel drops the lock when its owner dies.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @classmethod
    def attempt(cls, file: Path) -> ProcessLock | str:
        """The lock, or (when another open file holds it) the holder's pid as text."""
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd)

    @classmethod
    def take(cls, file: Path, what: str) -> ProcessLock:
        """The lock, or :class:`SinkError` naming the holder."""
        lock = cls.attempt(file)
        if isinstance(lock, str):
            raise SinkError(f"{what} is in use by {holder_text(lock)}; a Qdrant Edge store "
                            "can be opened by one process at a time. Stop that process (e.g. "
                            "the running consumer) and try again.")
        return lock

    def release(self) -> None:
        # Closing the descriptor drops the lock; the file stays, as deleting it
        # would race with a process that has just opened it.
        os.close(self._fd)

    @staticmethod
    def holder(file: Path) -> str | None:
        """The pid (as text) in ``file`` while another open file holds its lock;
        ``None`` when nobody does, or there is no such file. Writes nothing; holds a
        shared lock for an instant when free (as ``attempt`` holds its lock)."""
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def holder_text(pid: str) -> str:
    """Who holds a lock, from the pid in its file: this process or another."""
    who = "this process" if pid == str(os.getpid()) else "another process"
    return f"{who} (pid {pid})"


def _query_file(root: Path, pid: int | str) -> Path:
    return root / f".query-{pid}.json"


def write_query_address(root: Path, url: str) -> Path:
    """Record that this process answers queries at ``url`` (see the module docstring)."""
    file = _query_file(root, os.getpid())
    data = json.dumps({"pid": os.getpid(), "url": url}).encode() + b"\n"
    fd, temp = tempfile.mkstemp(dir=root, prefix=".query.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return file


def query_address(root: Path, pid: str) -> str | None:
    """The URL the process ``pid`` recorded with :func:`write_query_address`, if any."""
    if not pid.isdigit():
        return None
    try:
        data = json.loads(_query_file(root, pid).read_bytes())
    except (OSError, ValueError):
        return None
    url = data.get("url") if isinstance(data, dict) and str(data.get("pid")) == pid else None
    return url if isinstance(url, str) else None


def remove_query_address(root: Path) -> None:
    """Remove this process's record, if any."""
    with contextlib.suppress(FileNotFoundError):
        _query_file(root, os.getpid()).unlink()


class AliasRegistry:
    """The aliases of one Edge store (see the module docstring).

    A damaged file (not JSON, not an object of names to names, or a name the
    rule of :mod:`embedstream.stream.names` refuses) raises
    :class:`~embedstream.stream.errors.NeedsOperator` on every read: guessing
    (an empty mapping) would have the consumer create an empty collection and
    hide the indexed one. ``collections switch`` repairs it (``changing(repair=True)``).
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._file = root / ALIASES_FILE

    def read(self) -> dict[str, str]:
        """The aliases now; no lock needed (the file is only ever replaced whole)."""
        aliases, problem = self._parse()
        if problem is not None:
            raise NeedsOperator(
                f"{self._file} is damaged ({problem}). Do not delete it: without it the "
                "alias is lost. See the collections with `embedstream collections list`, "
                "then point the alias at the right one with `embedstream collections switch "
                f"NAME`, which rewrites the file (keeping this one as {DAMAGED_FILE}).")
        return aliases

    def readable(self) -> dict[str, str]:
        """The valid entries, even of a damaged file: for showing, never for deciding."""
        return self._parse()[0]

    def _parse(self) -> tuple[dict[str, str], str | None]:
        """The valid aliases, and what is wrong with the file (None when nothing)."""
        try:
            raw = self._file.read_bytes()
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            raise SinkError(f"cannot read {self._file}: {exc}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return {}, f"not JSON: {exc}"
        if not isinstance(data, dict):
            return {}, f"expected an object of alias names to collection names, not {data!r:.60}"
        valid, problems = {}, []
        for alias, target in data.items():
            problem = name_error(alias, "alias", alias=True)
            if problem is None and (why := name_problem(target)):
                problem = (f"alias {alias!r} points at {target!r:.60}, which is not a valid "
                           f"collection name: {why}")
            if problem:
                problems.append(problem)
            else:
                valid[alias] = target
        return valid, "; ".join(problems) or None

    @contextlib.contextmanager
    def changing(self, *, repair: bool = False) -> Iterator[dict[str, str]]:
        """Hold the aliases lock and yield the current mapping; what the block
        leaves in it is written back when it exits normally (nothing is written
        when it raises). Blocks while another process changes the aliases.

        A damaged file raises, unless ``repair``: then the block gets its valid
        entries and the file is rewritten, the damaged one kept as
        ``aliases.json.damaged``."""
        self._root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._root / ".aliases.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if repair:
                aliases, damaged = self._parse()
            else:
                aliases, damaged = self.read(), None
            before = dict(aliases)
            yield aliases
            if aliases != before or damaged is not None:
                try:
                    if damaged is not None:
                        shutil.copyfile(self._file, self._root / DAMAGED_FILE)
                        log.warning("%s was damaged (%s); kept it as %s and rewrote it",
                                    self._file, damaged, DAMAGED_FILE)
                    self._replace(aliases)
                except OSError as exc:
                    raise SinkError(f"cannot write {self._file}: {exc}") from exc
        finally:
            os.close(fd)

    def _replace(self, aliases: dict[str, str]) -> None:
        data = json.dumps(aliases, indent=1, sort_keys=True).encode() + b"\n"
        fd, temp = tempfile.mkstemp(dir=self._root, prefix=".aliases.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self._file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        # The rename itself is durable only once the directory is synced.
        directory = os.open(self._root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
