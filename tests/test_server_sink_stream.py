"""The Qdrant server path end to end: the consumer writing through qdrant-client.

No Qdrant server binary can be had here, so the store is ``QdrantClient(":memory:")``,
whose behaviour qdrant-client keeps congruent with the server's.
"""

from __future__ import annotations

import json

import pytest

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique

LONG = "\n\n".join(
    f"Paragraph {i} is about topic number {i}. " + "It has several sentences of text. " * 30
    for i in range(8)
)


def native(doc_id: str, text: str | None, version: int) -> tuple[bytes, bytes | None]:
    if text is None:
        return doc_id.encode(), None  # a tombstone
    return doc_id.encode(), json.dumps({"id": doc_id, "text": text, "version": version}).encode()


@pytest.mark.slow
def test_consumer_applies_updates_and_deletes_through_the_server_sink(
    broker: LocalBroker,
) -> None:
    topic = unique("server")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    first = [
        native("long", LONG, 1),
        native("gone", "This document will be deleted by a tombstone.", 1),
        native("kept", "Penguins huddle together to keep warm in the Antarctic winter.", 1),
    ]
    then = [
        native("long", "Now a short text about glaciers.", 2),  # shrinks: old chunks must go
        native("gone", None, 0),
        native("long", LONG, 1),  # an older version arriving late: ignored
    ]
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        sink={"kind": "qdrant", "url": ":memory:", "collection": "docs"},
        metrics={"enabled": False},
    )
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, Metrics())
        produce(broker.bootstrap_servers, topic, first)
        run_until(stream, lambda: sum(stream.committed.values()) >= len(first), 60,
                  "the first documents to be committed")
        long_chunks = [p for p in pipeline.sink.points() if p.payload["doc_id"] == "long"]
        assert len(long_chunks) > 3
        produce(broker.bootstrap_servers, topic, then)
        run_until(stream, lambda: sum(stream.committed.values()) >= len(first) + len(then), 60,
                  "the updates and the delete to be committed")
        stream.close()
        points = list(pipeline.sink.points())
        by_doc: dict[str, list[dict[str, object]]] = {}
        for point in points:
            by_doc.setdefault(str(point.payload["doc_id"]), []).append(dict(point.payload))
        assert set(by_doc) == {"long", "kept"}
        assert [p["text"] for p in by_doc["long"]] == ["Now a short text about glaciers."]
        assert by_doc["long"][0]["version"] == 2
        [vector] = pipeline.embedder.embed(["cold birds in Antarctica"])
        assert pipeline.sink.search(vector.tolist(), limit=1)[0].payload["doc_id"] == "kept"
    finally:
        pipeline.close()
