"""Collections and aliases of a Qdrant Edge store (files described in
:mod:`embedstream.sinks._edge_files`).

What is read and when: an Edge shard can be open in one process only, and
loading one that another sink holds fails, so the admin takes a collection's
lock (non-blocking) before loading its shards. A collection open in another
process is listed as ``in_use`` without counts, cannot be a switch target
(its fingerprint cannot be read) and cannot be dropped. One open by a sink of
this process is known by its fingerprint (a rebuild can switch to the
collection it has just filled without closing it first). While the admin
reads a collection it holds that lock, so a sink opening the collection at
that instant is refused as "in use" (listing takes milliseconds to seconds
per collection; opening again then succeeds).

Unlike a Qdrant server, an alias may share its name with a physical collection
(a store made before aliases): the alias wins when a sink opens that name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import qdrant_edge as qe

from embedstream.sinks._admin_rules import (
    aliases_by_target,
    aliases_to_drop,
    check_names,
    not_found,
    refuse_part,
)
from embedstream.sinks._edge_files import (
    AliasRegistry,
    ProcessLock,
    holder_text,
    is_shard,
    lock_path,
)
from embedstream.sinks._layout import (
    FINGERPRINT_POINT_ID,
    STATE_SUFFIX,
    alias_missing_message,
    listed_names,
    looks_physical,
    made_for,
    orphan_owner,
    parse_fingerprint,
)
from embedstream.sinks.qdrant_edge import open_fingerprint
from embedstream.stream.errors import FingerprintMismatch, NeedsOperator, SinkError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import CollectionInfo

__all__ = ["QdrantEdgeAdmin"]

_TRASH = ".dropped"  # suffix of a directory renamed away to be deleted


@dataclass(frozen=True, slots=True)
class _Look:
    """What could be read of one collection. Counts are None when it is held."""

    fingerprint: Fingerprint | None
    points: int | None
    state_points: int | None
    holder: str | None  # pid of the process holding its lock, if any


class QdrantEdgeAdmin:
    """:class:`~embedstream.stream.store.SinkAdmin` of the Edge store at ``path`` (see the
    module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._aliases = AliasRegistry(self._path)

    def resolve(self, alias: str) -> str | None:
        return self._aliases.read().get(alias)

    def probe(self, alias: str) -> None:
        """Creates nothing. The store directory must be writable (or creatable),
        and the collection ``alias`` opens, if it exists, held by no other process."""
        resolved = self.resolve(alias)
        target = resolved or alias
        if resolved is None and not (self._path / alias).is_dir() and self._path.is_dir():
            # As opening would: collections made for a missing alias mean it was lost,
            # unless the only one is empty (a first creation cut short, adopted then).
            found = made_for(alias, self._names())
            if len(found) > 1 or (found and self._look(found[0])[0].points != 0):
                raise NeedsOperator(alias_missing_message(alias, str(self._path), found))
        if (self._path / target).is_dir() and lock_path(self._path, target).is_file():
            lock = ProcessLock.attempt(lock_path(self._path, target))
            if isinstance(lock, str):
                raise SinkError(
                    f"collection {target!r} at {self._path} is in use by {holder_text(lock)}; "
                    "a Qdrant Edge store can be opened by one process at a time")
            lock.release()
        existing = next(p for p in (self._path, *self._path.parents) if p.exists())
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise SinkError(f"cannot write the store at {self._path} (sink.path): "
                            f"{existing} is not a writable directory")

    def switch(self, alias: str, target: str) -> str | None:
        check_names(target, alias=alias)
        # The repair a damaged aliases.json asks for (see AliasRegistry.read).
        with self._aliases.changing(repair=True) as aliases:
            self._require_collection(target, aliases)
            if not is_shard(self._path / target):
                raise SinkError(f"collection {target!r} at {self._path} has lost its chunks "
                                "(an interrupted drop?); drop it instead")
            look, _ = self._look(target)
            if look.fingerprint is None:
                if look.holder is not None:
                    raise SinkError(
                        f"collection {target!r} at {self._path} is open in "
                        f"{holder_text(look.holder)}, so its fingerprint cannot be read; "
                        "close it and switch again")
                raise SinkError(f"collection {target!r} at {self._path} holds no embedstream "
                                "fingerprint; refusing to point an alias at it")
            previous = aliases.get(alias)
            aliases[alias] = target  # written, atomically, when the block ends
        return previous

    def collections(self) -> list[CollectionInfo]:
        # What a damaged aliases.json still says: the listing is where the
        # operator looks for the collection to switch the alias back to.
        pointing = aliases_by_target(self._aliases.readable())
        names = self._names()
        infos = []
        for name in listed_names(names):
            shown, look = self._listed(name, names)
            infos.append(CollectionInfo(shown, look.points, pointing(shown), look.fingerprint,
                                        in_use=look.holder is not None))
        return infos

    def drop(self, name: str, force: bool = False) -> None:
        check_names(name)
        self._require_collection(name, self._aliases.read())
        look, lock = self._look(name, keep_lock=True)
        if lock is None:
            raise SinkError(f"collection {name!r} at {self._path} is open in "
                            f"{holder_text(look.holder or 'unknown')}; stop it (e.g. the "
                            "consumer) before dropping the collection")
        try:
            interrupted = (looks_physical(name) and look.points == 0
                           and not look.state_points)  # a creation that never finished
            if look.fingerprint is None and not interrupted:
                raise SinkError(f"collection {name!r} at {self._path} holds no embedstream "
                                "fingerprint: it was not made by embedstream; refusing to "
                                "delete it")
            with self._aliases.changing() as aliases:
                for alias in aliases_to_drop(name, aliases, force):
                    del aliases[alias]
            # Aliases first (written when the block ended), so none leads to a
            # half-deleted collection; chunks before state, so an interrupted
            # drop leaves the fingerprint that lets the next drop finish it
            # (`list` shows that state as the collection). Each directory is
            # renamed away before it is deleted: a drop interrupted inside a
            # delete leaves no half-deleted shard under a collection's name.
            self._sweep()
            for directory in (self._path / name, self._path / f"{name}{STATE_SUFFIX}"):
                if directory.exists():
                    trash = self._path / f".{directory.name}{_TRASH}"
                    os.rename(directory, trash)
                    shutil.rmtree(trash)
        except OSError as exc:
            raise SinkError(f"dropping {name!r} at {self._path} failed: {exc}") from exc
        finally:
            lock.release()

    def close(self) -> None:
        """Nothing to release: every call opens and closes what it reads."""

    # -- helpers -----------------------------------------------------------

    def _names(self) -> set[str]:
        """The shards in the store (each a collection or a state companion)."""
        try:
            return {d.name for d in self._path.iterdir()
                    if not d.name.startswith(".") and is_shard(d)}
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise SinkError(f"cannot list {self._path}: {exc}") from exc

    def _listed(self, name: str, names: set[str]) -> tuple[str, _Look]:
        """How ``name`` is listed: the state of a half-dropped collection (its
        fingerprint says so) as that collection; anything else as itself."""
        owner = orphan_owner(name, names)
        if owner is not None:
            look, _ = self._look(owner)
            if look.fingerprint is not None:
                return owner, look
        return name, self._look(name)[0]

    def _require_collection(self, name: str, aliases: dict[str, str]) -> None:
        if not (is_shard(self._path / name) or is_shard(self._path / f"{name}{STATE_SUFFIX}")):
            raise not_found(name, aliases, f"no collection named {name!r} at {self._path}")
        # <x>_state belongs to <x> while <x>'s chunks are there, and also after
        # an interrupted drop removed them: then its fingerprint says so.
        orphaned = orphan_owner(name, self._names())
        refuse_part(name, lambda owner: is_shard(self._path / owner) or (
            owner == orphaned and self._look(owner)[0].fingerprint is not None))

    def _sweep(self) -> None:
        """Delete what interrupted drops left renamed away (see ``drop``)."""
        for trash in self._path.glob(f".*{_TRASH}"):
            shutil.rmtree(trash, ignore_errors=True)  # a concurrent drop may be at it too

    def _look(self, name: str, keep_lock: bool = False) -> tuple[_Look, ProcessLock | None]:
        """Read ``name`` under its lock; the lock too with ``keep_lock``. When
        another open file holds the lock: no counts, and the fingerprint only if
        a sink of this process has it open."""
        file = lock_path(self._path, name)
        try:
            lock = ProcessLock.attempt(file)
        except OSError as exc:
            raise SinkError(f"cannot lock {file}: {exc}") from exc
        if isinstance(lock, str):
            return _Look(open_fingerprint(file), None, None, holder=lock), None
        try:
            fingerprint, state_points, points = None, 0, 0
            state_dir, chunk_dir = self._path / f"{name}{STATE_SUFFIX}", self._path / name
            if is_shard(state_dir):
                with self._shard(state_dir) as state:
                    found = state.retrieve([FINGERPRINT_POINT_ID], with_payload=True,
                                           with_vector=False)
                    state_points = state.count(qe.CountRequest(exact=True))
                with contextlib.suppress(FingerprintMismatch):  # one this version cannot read
                    fingerprint = parse_fingerprint(found[0].payload if found else None, name)
            if is_shard(chunk_dir):
                with self._shard(chunk_dir) as chunks:
                    points = chunks.count(qe.CountRequest(exact=True))
        except BaseException:
            lock.release()
            raise
        if not keep_lock:
            lock.release()
        return _Look(fingerprint, points, state_points, None), (lock if keep_lock else None)

    @contextlib.contextmanager
    def _shard(self, directory: Path) -> Iterator[qe.EdgeShard]:
        try:
            shard = qe.EdgeShard.load(str(directory), None)
        except Exception as exc:
            raise SinkError(f"cannot open {directory}: {exc}") from exc
        try:
            yield shard
        except SinkError:
            raise
        except Exception as exc:
            raise SinkError(f"cannot read {directory}: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                shard.close()
