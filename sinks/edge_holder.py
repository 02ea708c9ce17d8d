"""Who holds a Qdrant Edge collection, and where that process answers queries.

A Qdrant Edge collection is open in one process at a time (its lock file names the
holder's pid, see :mod:`embedstream.sinks.qdrant_edge`). A running consumer records in
the store directory where it answers queries (:func:`announce`); a command that finds
the collection held (:func:`holder`) asks that process (:func:`served_at`) instead of
failing. The record is a hint, not a promise: a consumer killed leaves it behind (it
counts only while that pid holds a lock), and one that serves no queries has none.
"""

from __future__ import annotations

from pathlib import Path

from embedstream.sinks._edge_files import (
    AliasRegistry,
    ProcessLock,
    lock_path,
    query_address,
    remove_query_address,
    write_query_address,
)

__all__ = ["announce", "holder", "served_at", "withdraw"]


def holder(path: Path, alias: str) -> str | None:
    """The pid (as text) of the process holding the collection that ``alias`` points
    at in the store at ``path`` (the collection named ``alias`` when no alias does);
    ``None`` when no process holds it. Reads only; a damaged ``aliases.json`` counts
    as no alias (opening the store reports it)."""
    target = AliasRegistry(path).readable().get(alias, alias)
    return ProcessLock.holder(lock_path(path, target))


def served_at(path: Path, pid: str) -> str | None:
    """The URL where the process ``pid`` said it answers queries on the store at
    ``path``; ``None`` when it said nothing."""
    return query_address(path, pid)


def announce(path: Path, url: str) -> Path:
    """Record that this process answers queries on the store at ``path`` at ``url``;
    the file written."""
    return write_query_address(path, url)


def withdraw(path: Path) -> None:
    """Remove this process's record from the store at ``path`` (none is fine)."""
    remove_query_address(path)
