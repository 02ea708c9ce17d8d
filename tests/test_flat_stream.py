"""Rows flattened by Debezium's ExtractNewRecordState through the real broker and
store, in both delete handling modes, with and without ``add.fields``: the
store ends as an oracle built from the same rows says."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique

pytestmark = pytest.mark.slow

Message = tuple[bytes | None, bytes | None]


def flattened(rng: random.Random, delete_mode: str, add_fields: bool,
              n_docs: int = 12, n_events: int = 80) -> tuple[list[Message], dict[str, str]]:
    """Creates, updates and deletes of ``n_docs`` rows as ExtractNewRecordState emits
    them; the texts the store must hold at the end (deleted rows absent)."""
    messages: list[Message] = []
    live: dict[str, str] = {}
    lsn = 1_000
    for n in range(n_events):
        doc = f"row{rng.randrange(n_docs)}"
        key = json.dumps({"id": doc}).encode()
        lsn += rng.randrange(1, 5)
        extra: dict[str, Any] = ({"__lsn": lsn, "__source_ts_ms": 1_700_000_000_000 + n,
                                  "__table": "articles"} if add_fields else {})
        if doc in live and rng.random() < 0.25:
            del live[doc]
            if delete_mode == "rewrite":  # the row with __deleted, then a tombstone
                row = {"id": doc, "title": "gone", "__deleted": "true", **extra}
                if add_fields:
                    row["__op"] = "d"
                messages.append((key, json.dumps(row).encode()))
            messages.append((key, None))
            continue
        op = "u" if doc in live else "c"
        text = f"Row {doc}, revision {n}. " + " ".join(rng.sample(WORDS, 8))
        live[doc] = f"Title {n}\n\n{text}"
        row = {"id": doc, "title": f"Title {n}", "body": text, **extra}
        if delete_mode == "rewrite":
            row["__deleted"] = "false"
        if add_fields:
            row["__op"] = op
        messages.append((key, json.dumps(row).encode()))
    return messages, live


WORDS = ["tide", "moon", "orbit", "salt", "harbour", "river", "delta", "glacier", "basalt",
         "fjord", "coral", "reef", "lagoon", "estuary", "current", "wave", "swell", "dune"]


@pytest.mark.parametrize(("delete_mode", "add_fields"),
                         [("rewrite", True), ("rewrite", False), ("drop", True), ("drop", False)])
def test_flattened_rows_are_indexed_as_the_oracle_says(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path,
        delete_mode: str, add_fields: bool) -> None:
    rng = random.Random(f"{delete_mode}-{add_fields}")
    messages, live = flattened(rng, delete_mode, add_fields)
    topic = unique("flat")
    create_topic(broker.bootstrap_servers, topic, partitions=2)
    produce(broker.bootstrap_servers, topic, messages)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "debezium-flat", "id_fields": ["id"],
                "text_fields": ["title", "body"],
                "version": "lsn" if add_fields else "auto"},
        embed={"model": str(tiny_model_dir)},
        sink={"path": str(tmp_path / "store"), "collection": "rows"},
        metrics={"enabled": False},
    )
    metrics = Metrics()
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, metrics)
        try:
            run_until(stream, lambda: sum(stream.committed.values()) >= len(messages), 90,
                      f"all {len(messages)} rows to be committed")
        finally:
            stream.close()
        stored: dict[str, list[tuple[int, str]]] = {}
        for point in pipeline.sink.points():
            stored.setdefault(str(point.payload["doc_id"]), []).append(
                (int(point.payload["chunk_index"]), str(point.payload["text"])))
    finally:
        pipeline.close()

    assert set(stored) == set(live), "exactly the rows that were not deleted"
    for doc, text in live.items():
        assert stored[doc] == [(0, text)], f"{doc}: the last revision's text, one chunk"
    assert metrics.registry.get_sample_value("embedstream_dlq_records_total",
                                             {"reason": "missing_id", "route": "default"}) is None
    assert metrics.registry.get_sample_value("embedstream_source_only_skipped",
                                             {"route": "default"}) == 0
