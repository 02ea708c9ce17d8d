"""Closing a Kafka snapshot while another thread reads it (the rebuild's reader thread,
on Ctrl-C or a failure elsewhere): the reader stops at its next poll and closes its own
consumer, rather than having it closed under a running ``consume`` (which can crash
librdkafka), and the fold's scratch file is gone. Real broker (Tansu)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from embedstream.bulk import kafka_source
from embedstream.bulk.kafka_source import KafkaSnapshot, SnapshotClosed
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.config import Settings

from .streamkit import create_topic, produce, unique

pytestmark = pytest.mark.slow

DOCS = 20_000


@pytest.fixture
def snapshot(broker: LocalBroker, tmp_path: Path) -> KafkaSnapshot:
    topic = unique("snapshot-close")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    produce(broker.bootstrap_servers, topic, (
        (f"doc-{i}".encode(), json.dumps({"id": f"doc-{i}", "version": 1,
                                          "text": f"document {i}"}).encode())
        for i in range(DOCS)))
    settings = Settings.model_validate({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
                  "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        "source": {"format": "native", "text_fields": ["text"]}})
    opened = KafkaSnapshot(settings, scratch=tmp_path / "scratch")
    opened.open()
    return opened


def scratch_files(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "scratch").glob("snapshot-fold-*"))


def test_closing_a_snapshot_stops_a_reader_inside_its_fold(
        snapshot: KafkaSnapshot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folding = threading.Event()
    decode = kafka_source.take_in_patiently

    def slow_decode(*args: Any) -> Any:  # a fold of minutes, as on a large topic
        folding.set()
        time.sleep(0.001)
        return decode(*args)

    monkeypatch.setattr(kafka_source, "take_in_patiently", slow_decode)
    errors: list[BaseException] = []
    reached: list[object] = []

    def reader() -> None:
        try:
            reached.extend(snapshot.items())
        except BaseException as error:  # checked below
            errors.append(error)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert folding.wait(30), "the fold did not start"
    assert scratch_files(tmp_path)
    started = time.monotonic()
    snapshot.close()
    closing_s = time.monotonic() - started
    thread.join(10)
    assert not thread.is_alive()
    assert closing_s < 3, f"close() took {closing_s:.1f} s"
    assert [type(e) for e in errors] == [SnapshotClosed], errors
    assert not reached, "nothing is yielded from a fold cut short"
    assert snapshot._consumer is None, "the reader closed its consumer"
    assert not scratch_files(tmp_path)


def test_closing_a_snapshot_between_items_ends_it(
        snapshot: KafkaSnapshot, tmp_path: Path) -> None:
    items = snapshot.items()
    first = next(items)
    assert first is not None and snapshot._consumer is not None
    started = time.monotonic()
    snapshot.close()
    assert time.monotonic() - started < 1
    assert snapshot._consumer is None, "the consumer was closed with the items"
    assert not scratch_files(tmp_path)
    assert list(items) == [], "a closed snapshot yields nothing more"
