"""Each document's winning state during a Kafka snapshot's fold, on disk.

A snapshot of N documents needs the version guard's state of every one of them
until the fold has read everything. Held as Python objects that is about 270
bytes per document (0.3 GB per million, growing with the corpus); here it is a
SQLite table in a scratch file, so the rebuild's memory does not depend on the
corpus size: Python holds one batch of events at a time, SQLite a bounded page
cache (:data:`_CACHE_KIB`), and the rest is on disk (about 60-90 bytes per
document, deleted on :meth:`Winners.close`).

Events are folded in batches, in log order: the batch's stored states are read
in one query, the stream's own guard (:func:`embedstream.stream.plan.fold`)
applied to each event in turn, and the states that changed written back in one
statement. The outcome is the same as folding one event at a time.

Guaranteed: the same winners as a dict folded event by event; the scratch file
is removed on close (also after an error). Not guaranteed: surviving a crash
(the file is scratch: a resumed rebuild folds again, as it always did).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from embedstream.stream.plan import PreparedEvent, fold
from embedstream.stream.store import DocState

__all__ = ["Winners"]

_CACHE_KIB = 32 * 1024  # SQLite's page cache: the fold's memory beyond one batch
_QUERY_IDS = 500  # ids per SELECT (SQLite's variable limit is far above)
_COLUMNS = ("version", "offset", "deleted", "versioned", "topic", "partition", "topic_id",
            "timestamp_ms", "tombstone")


class Winners:
    """doc_id -> the :class:`DocState` the guard leaves standing (see the module docstring)."""

    def __init__(self, directory: Path | None = None) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="snapshot-fold-", suffix=".sqlite",
                                        dir=directory)
        os.close(handle)
        self.path = Path(name)
        try:
            self._db = _scratch_db(name)
        except BaseException:
            self.path.unlink(missing_ok=True)  # no scratch file outlives a failed start
            raise
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def fold(self, events: Sequence[PreparedEvent]) -> None:
        """Apply the guard to ``events`` (in log order) against the stored winners."""
        if not events:
            return
        states = self.get_many({p.event.doc_id for p in events})
        known = set(states)
        changed: dict[str, DocState] = {}
        for prepared in events:
            doc_id = prepared.event.doc_id
            state = fold(states.get(doc_id), [prepared]).state
            if state is not None:
                states[doc_id] = changed[doc_id] = state
        self._count += len(changed.keys() - known)
        self._db.execute("BEGIN")
        self._db.executemany(
            f"INSERT OR REPLACE INTO winners VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})",
            ((doc_id, s.version, s.offset, int(s.deleted), int(s.versioned), s.topic,
              s.partition, s.topic_id, s.timestamp_ms, int(s.tombstone))
             for doc_id, s in changed.items()))
        self._db.execute("COMMIT")

    def get_many(self, doc_ids: Iterable[str]) -> dict[str, DocState]:
        """The stored winners of ``doc_ids`` (those that have one)."""
        ids = list(doc_ids)
        found: dict[str, DocState] = {}
        topics: dict[str, str] = {}  # one string per topic, not one per state
        for start in range(0, len(ids), _QUERY_IDS):
            part = ids[start:start + _QUERY_IDS]
            rows = self._db.execute(
                f"SELECT doc_id, {', '.join(_COLUMNS)} FROM winners WHERE doc_id IN "
                f"({', '.join('?' * len(part))})", part)
            for doc_id, version, offset, deleted, versioned, topic, partition, topic_id, \
                    timestamp_ms, tombstone in rows:
                if topic is not None:
                    topic = topics.setdefault(topic, topic)
                found[doc_id] = DocState(version, offset, bool(deleted), bool(versioned), topic,
                                         partition, topic_id, timestamp_ms, bool(tombstone))
        return found

    def close(self) -> None:
        """Close and delete the scratch file (twice is harmless)."""
        with contextlib.suppress(sqlite3.ProgrammingError):
            self._db.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _scratch_db(name: str) -> sqlite3.Connection:
    db = sqlite3.connect(name, isolation_level=None)
    try:
        # Scratch data: no journal and no fsync (a crash folds again from Kafka).
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{_CACHE_KIB}",
                       "temp_store=FILE", "locking_mode=EXCLUSIVE"):
            db.execute(f"PRAGMA {pragma}")
        db.execute(
            "CREATE TABLE winners (doc_id TEXT PRIMARY KEY, version INTEGER, offset INTEGER, "
            "deleted INTEGER, versioned INTEGER, topic TEXT, partition INTEGER, "
            "topic_id TEXT, timestamp_ms INTEGER, tombstone INTEGER) WITHOUT ROWID")
    except BaseException:
        db.close()
        raise
    return db
