"""Rebuilds on the bundled broker (Tansu) with topics written in multi-record batches.

Tansu answers ListOffsets with the base offset of a partition's last record batch
plus one, so such a topic looks shorter than it is (each test first checks that it
does, or it would prove nothing). The rebuild must still read every record, hand
over at or above what the live group has committed (or refuse), and embed each
document's winning event only. Real broker, real Qdrant Edge store, the tiny model.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from embedstream.bulk.catch_up import HandoverRefused
from embedstream.bulk.kafka_source import topic_ends
from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.sinks.factory import build_admin, build_sink
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.cli import main
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.metrics import Metrics

from .streamkit import REVISIONS, create_topic, revision_stream, run_until, unique

pytestmark = pytest.mark.slow

PAGES = ("ROOT/pages/features.adoc", "ROOT/pages/architecture.adoc",
         "ROOT/pages/transformations/index.adoc")


def produce_batched(bootstrap: str, topic: str,
                    messages: list[tuple[bytes | None, bytes | None]]) -> dict[int, int]:
    """Produce in multi-record batches (a long linger); the end per partition, from
    the delivery reports."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 200,
                         "batch.num.messages": 10000})
    ends: dict[int, int] = {}

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)

    for key, value in messages:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(30) == 0
    return ends


def assert_listed_short(bootstrap: str, topic: str, ends: dict[int, int]) -> None:
    """The setup check: the broker's ListOffsets answer is below the true end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("probe")})
    try:
        listed = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10,
                                                    cached=False)[1] for p in ends}
    finally:
        consumer.close()
    assert any(listed[p] < end for p, end in ends.items()), (listed, ends)


def config_for(broker: LocalBroker, topic: str, store: Path, model: Path,
               **source: Any) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
                  "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        # text_fields: what a file rebuild reads (native events carry "text" anyway).
        "source": source or {"format": "native", "version": "auto", "text_fields": ["text"]},
        "embed": {"model": str(model), "backend": "torch", "precision": "fp32"},
        "sink": {"path": str(store), "collection": "docs", "flush_interval_ms": 200},
        "metrics": {"enabled": False}, "bulk": {"write_documents": 8}}


def settings_for(broker: LocalBroker, topic: str, store: Path, model: Path,
                 **source: Any) -> Settings:
    return Settings(**config_for(broker, topic, store, model, **source))


def points_by_doc(settings: Settings, physical: str) -> dict[str, list[dict[str, Any]]]:
    sink = build_sink(settings.sink, physical=physical)
    sink.open(None)
    try:
        by_doc: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for point in sink.points():
            by_doc[str(point.payload["doc_id"])].append(dict(point.payload))
    finally:
        sink.close()
    for chunks in by_doc.values():
        chunks.sort(key=lambda c: int(c["chunk_index"]))
    return by_doc


@pytest.mark.skipif(not REVISIONS.is_file(), reason="needs ../shared/data/revisions")
@pytest.mark.timeout(240)
def test_a_kafka_rebuild_reads_every_record_of_multi_record_batches(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path, cli_logging: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    data = revision_stream(PAGES)
    topic = unique("pages")
    create_topic(broker.bootstrap_servers, topic, partitions=2)
    ends = produce_batched(broker.bootstrap_servers, topic, data.messages)
    assert_listed_short(broker.bootstrap_servers, topic, ends)
    raw = config_for(broker, topic, tmp_path / "store", tiny_model_dir,
                     format="debezium", id_fields=["id"], text_fields=["text"])
    settings = Settings(**raw)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))

    assert main(["rebuild", "--config", str(config), "--source", "kafka"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    # Every record was read, and said what it became.
    assert report["records"] == len(data.messages) == sum(ends.values())
    assert report["failures"] == data.bad and report["skipped"] == 1  # one schema change
    assert (report["documents"], report["deleted"]) == (len(data.live), len(data.deleted))
    assert report["superseded"] == report["records"] - report["documents"] - report[
        "deleted"] - report["failures"] - report["skipped"]
    # The snapshot and the handover are at the true ends, not at the listed ones.
    true_ends = {f"{topic}[{p}]": end for p, end in sorted(ends.items())}
    assert report["covered"] == report["handover"] == true_ends

    # The collection is the oracle's: the live documents, each its latest text, whole.
    by_doc = points_by_doc(settings, report["target"])
    assert set(by_doc) == set(data.live)
    for doc_id, chunks in by_doc.items():
        text = data.live[doc_id]
        assert [c["chunk_index"] for c in chunks] == list(range(len(chunks)))
        assert all(c["text"] == text[c["start"]:c["end"]] for c in chunks)
        left = list(text)
        for c in chunks:
            left[c["start"]:c["end"]] = [" "] * (c["end"] - c["start"])
        assert "".join(left).strip() == "", f"the chunks of {doc_id} cover its text"
    # Only the winners' chunks were made: each one is in the collection.
    assert report["chunks"] == sum(len(c) for c in by_doc.values())


class CountingEncoder:
    """A real encoder that counts the texts it embeds."""

    def __init__(self, encoder: LocalEncoder) -> None:
        self.encoder, self.texts = encoder, 0
        self.lock = threading.Lock()

    def encode(self, batch: Any) -> Any:
        with self.lock:
            self.texts += len(batch)
        return self.encoder.encode(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.encoder, name)


@pytest.mark.timeout(180)
def test_a_kafka_rebuild_embeds_each_document_once(broker: LocalBroker, tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    topic = unique("revised")
    create_topic(broker.bootstrap_servers, topic, partitions=3)
    docs, revisions = 12, 8
    messages: list[tuple[bytes | None, bytes | None]] = []
    for version in range(1, revisions + 1):  # every document revised, in turn
        for d in range(docs):
            text = f"Document {d}, revision {version}. " + "It says something. " * 30
            deleted = d == 0 and version == revisions  # the last word on d0: deleted
            messages.append((f"d{d}".encode(), json.dumps(
                {"id": f"d{d}", "version": version, "deleted": deleted, "text": text}).encode()))
    ends = produce_batched(broker.bootstrap_servers, topic, messages)
    assert_listed_short(broker.bootstrap_servers, topic, ends)
    settings = settings_for(broker, topic, tmp_path / "store", tiny_model_dir)
    encoder = CountingEncoder(LocalEncoder(str(tiny_model_dir), device="cpu", precision="fp32"))

    report = rebuild(settings, RebuildOptions(source="kafka", handover=False),
                     encoders=[encoder])  # type: ignore[list-item]

    assert report.records == docs * revisions
    assert (report.documents, report.deleted) == (docs - 1, 1)
    assert report.superseded == docs * revisions - docs
    by_doc = points_by_doc(settings, report.target)
    assert set(by_doc) == {f"d{d}" for d in range(1, docs)}
    assert {c["version"] for chunks in by_doc.values() for c in chunks} == {revisions}
    # Each document's winner was embedded, and nothing else.
    assert encoder.texts == report.chunks == sum(len(c) for c in by_doc.values())


def product_events(n_products: int, revisions: int) -> list[tuple[bytes | None, bytes | None]]:
    return [(f"p{p}".encode(), json.dumps({
        "id": f"p{p}", "version": version,
        "text": f"Product p{p}: catalogue text of revision {version} (old)."}).encode())
        for version in range(1, revisions + 1) for p in range(n_products)]


@pytest.mark.timeout(240)
def test_a_file_rebuild_hands_over_at_the_groups_committed_offset(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The newcomer's case: a consumer has committed the whole topic; a file rebuild
    with handover must not start the stream below that, or old texts come back."""
    topic = unique("products")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    events = product_events(3, 15)  # 45 events of 3 products
    ends = produce_batched(broker.bootstrap_servers, topic, events)
    assert ends == {0: 45}
    assert_listed_short(broker.bootstrap_servers, topic, ends)
    settings = settings_for(broker, topic, tmp_path / "store", tiny_model_dir)
    tp = (topic, 0)

    def consume_until(done: Any) -> dict[tuple[str, int], int]:
        pipeline = build_pipeline(settings)
        try:
            stream = build_consumer(pipeline, Metrics())
            try:
                run_until(stream, lambda: done(stream), 90, "the consumer to catch up")
                return dict(stream.committed)
            finally:
                stream.close()
        finally:
            pipeline.close()

    assert consume_until(lambda s: s.committed.get(tp, 0) >= 45)[tp] == 45

    # The files: each product's current catalogue text, newer than every event.
    corpus = tmp_path / "products.jsonl"
    newer = {f"p{p}": f"Product p{p}: the catalogue's current text (new)." for p in range(3)}
    corpus.write_text("".join(json.dumps({"id": d, "text": t}) + "\n"
                              for d, t in newer.items()))
    report = rebuild(settings, RebuildOptions(source=str(corpus)))
    assert report.covered == report.handover == {f"{topic}[0]": 45}

    # One more change after the rebuild, then the consumer follows the alias.
    produce_batched(broker.bootstrap_servers, topic, [(b"p1", json.dumps(
        {"id": "p1", "version": 99, "text": "Product p1: changed after the rebuild."}).encode())])

    def followed(stream: Any) -> bool:
        record = stream.sink.read_handover()
        return (stream.sink.collection == report.target and record is not None
                and tp in record.acknowledged.get(settings.kafka.group_id, ())
                and stream.committed.get(tp, 0) >= 46)

    consume_until(followed)
    by_doc = points_by_doc(settings, report.target)
    texts = {d: " ".join(c["text"] for c in chunks) for d, chunks in by_doc.items()}
    assert texts == {**newer, "p1": "Product p1: changed after the rebuild."}


@pytest.mark.timeout(120)
def test_a_group_committed_beyond_what_the_broker_serves_is_refused(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    topic = unique("recreated")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    produce_batched(broker.bootstrap_servers, topic, product_events(2, 5))
    settings = settings_for(broker, topic, tmp_path / "store", tiny_model_dir)
    # As if the topic was recreated: the group's offset is from the old one.
    group = Consumer({"bootstrap.servers": broker.bootstrap_servers,
                      "group.id": settings.kafka.group_id})
    try:
        group.commit(offsets=[TopicPartition(topic, 0, 1000)], asynchronous=False)
    finally:
        group.close()
    corpus = tmp_path / "products.jsonl"
    corpus.write_text('{"id": "p0", "text": "Product p0."}\n')

    with pytest.raises(HandoverRefused, match=r"committed 1000, served up to 10.*--no-handover"):
        rebuild(settings, RebuildOptions(source=str(corpus)))
    admin = build_admin(settings.sink)
    try:
        assert admin.collections() == []  # refused before anything was built
    finally:
        admin.close()


@pytest.mark.timeout(120)
def test_ends_are_what_the_broker_serves_while_it_is_written(broker: LocalBroker) -> None:
    topic = unique("busy")
    create_topic(broker.bootstrap_servers, topic, partitions=2)
    before = produce_batched(broker.bootstrap_servers, topic,
                             [(f"k{i}".encode(), b"{}") for i in range(400)])
    assert_listed_short(broker.bootstrap_servers, topic, before)
    settings = Settings(kafka={"bootstrap_servers": broker.bootstrap_servers,
                               "topics": [topic], "group_id": unique("g")})
    assert topic_ends(settings) == {(topic, p): end for p, end in before.items()}

    # A writer that never pauses: the ends are still found, at or past what was
    # delivered before, and no further than what exists.
    delivered: dict[int, int] = dict(before)
    stop = threading.Event()

    def write() -> None:
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 20})

        def on_delivery(error: Any, message: Any) -> None:
            delivered[message.partition()] = max(delivered[message.partition()],
                                                 message.offset() + 1)

        i = 0
        while not stop.is_set():
            for _ in range(50):
                i += 1
                producer.produce(topic, key=f"k{i}".encode(), value=b"{}",
                                 on_delivery=on_delivery)
            producer.poll(0.005)
        producer.flush(30)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(1.0)
        floor = dict(delivered)
        began = time.monotonic()
        found = topic_ends(settings)
        took = time.monotonic() - began
    finally:
        stop.set()
        writer.join()
    assert took < 10, took
    for p in (0, 1):
        assert floor[p] <= found[(topic, p)] <= delivered[p], (p, floor, found, delivered)
