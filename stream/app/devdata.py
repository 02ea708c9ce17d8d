"""Real-looking change streams for the demo, the tests and the benchmarks.

:func:`revision_events` turns a page revision history (the format of
``shared/data/revisions/doc-revisions.jsonl``) into the Debezium events a
PostgreSQL connector would emit for a ``pages(id, text, commit)`` table:
``c`` for the first revision, ``u`` after, ``d`` plus a Kafka tombstone for a
deletion, with a growing ``source.lsn`` and ``source.ts_ms`` from the commit
time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_PAGES",
    "DevMessage",
    "debezium_value",
    "load_revisions",
    "revision_events",
]

# Used by `embedstream dev` when the shared revision history is not beside the checkout.
BUILTIN_PAGES: dict[str, str] = {
    "architecture.adoc": (
        "= Architecture\n\nChange data capture reads a database's transaction log and "
        "turns every committed insert, update and delete into an event. A connector "
        "publishes the events to Kafka, one topic per table, keyed by primary key.\n\n"
        "Consumers read the topics and keep other systems in step: caches, search "
        "indexes and analytics stores."
    ),
    "logging.adoc": (
        "= Logging\n\nThe connector logs through SLF4J. Set the log level of a package "
        "in the log4j configuration to DEBUG or TRACE to see each event as it is "
        "processed.\n\nAvoid TRACE in production: it logs row contents."
    ),
    "snapshots.adoc": (
        "= Snapshots\n\nWhen a connector starts for the first time it takes a consistent "
        "snapshot of the tables, emitting a read event for every row, and then streams "
        "changes from the position where the snapshot ended."
    ),
    "routing.adoc": (
        "= Topic routing\n\nThe topic routing transformation reroutes events from many "
        "tables to one topic, for example all shards of a partitioned table."
    ),
}


@dataclass(frozen=True, slots=True)
class DevMessage:
    """One Kafka message: key and value bytes (value None for a tombstone)."""

    doc_id: str
    key: bytes
    value: bytes | None
    text: str | None  # the document text after this event, None when deleted


def load_revisions(path: Path) -> list[dict[str, Any]]:
    """Revisions in commit order (stable for equal times)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda row: row["committed_at"])


def _epoch_ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def debezium_value(
    op: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    lsn: int,
    source_ts_ms: int,
    ts_ms: int | None = None,
) -> bytes:
    """A Debezium PostgreSQL change event (bare payload, schemas disabled)."""
    return json.dumps({
        "before": before,
        "after": after,
        "source": {
            "version": "2.7.0.Final", "connector": "postgresql", "name": "embedstream-dev",
            "ts_ms": source_ts_ms, "snapshot": "false", "db": "docs", "schema": "public",
            "table": "pages", "lsn": lsn,
        },
        "op": op,
        "ts_ms": ts_ms if ts_ms is not None else int(time.time() * 1000),
    }).encode()


def revision_events(
    rows: Iterable[Mapping[str, Any]], first_lsn: int = 1000
) -> Iterator[DevMessage]:
    """Debezium events for a revision history, in order."""
    live: dict[str, dict[str, Any]] = {}
    lsn = first_lsn
    for row in rows:
        doc_id = str(row["doc_id"])
        key = json.dumps({"id": doc_id}).encode()
        lsn += 8
        ts = _epoch_ms(row["committed_at"])
        before = live.get(doc_id)
        if row.get("deleted") or row.get("text") is None:
            if before is None:
                continue
            del live[doc_id]
            yield DevMessage(doc_id, key, debezium_value("d", before, None, lsn, ts), None)
            yield DevMessage(doc_id, key, None, None)
            continue
        after = {"id": doc_id, "text": row["text"], "commit": row.get("commit", "")}
        live[doc_id] = after
        op = "u" if before is not None else "c"
        yield DevMessage(doc_id, key, debezium_value(op, before, after, lsn, ts), row["text"])
