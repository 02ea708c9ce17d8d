"""``sink.index``: the chunk vectors indexed and searched as configured, in both stores,
and kept optimized by the consumer without long stalls (the Qdrant Edge store).

What a user checks: the store on disk says the configured quantization; after the
consumer's maintenance the chunk segments are indexed (and the state shard never is:
its sparse IDF would count replaced documents); a quantized search still finds what an
exact one finds; a changed setting applies at the next start; a server collection is
created with the settings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as qe
from qdrant_client import QdrantClient, models

from embedstream.sinks import QdrantEdgeSink, QdrantServerSink
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import IndexSettings, Settings, load_settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.metrics import Metrics
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite

from .streamkit import create_topic, produce, run_until, unique

DIM = 64
FP = Fingerprint(model="test/model", revision="abc", dimension=DIM, normalized=True,
                 chunker="tokens:256")
# Small thresholds, so a few thousand 64-d points make several indexed segments.
SMALL = {"optimizer": {"indexing_threshold_kb": 100, "max_segment_size_kb": 300},
         "maintenance": {"every_points": 1000}}


def clustered(count: int, seed: int) -> np.ndarray:
    """Unit vectors around 40 centres: neighbourhoods as embeddings have them (a
    quantized scan on uniform random vectors says little)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(40, DIM))
    points = centres[rng.integers(0, 40, count)] + rng.normal(scale=0.35, size=(count, DIM))
    unit: np.ndarray = (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
    return unit


def writes(vectors: np.ndarray, start: int = 0) -> list[DocumentWrite]:
    """One document per two points."""
    return [DocumentWrite(f"d{d}", DocState(1, d, False), [
        ChunkPoint(i, vectors[2 * d + i], {"doc_id": f"d{d}", "chunk_index": i})
        for i in range(2)]) for d in range(start, len(vectors) // 2)]


def edge_sink(root: Path, **index: object) -> QdrantEdgeSink:
    sink = QdrantEdgeSink(root, "docs", index=IndexSettings.model_validate({**SMALL, **index}))
    sink.open(FP)
    return sink


def shard_on_disk(root: Path, name: str) -> tuple[qe.EdgeShard, dict[str, object]]:
    config = json.loads((root / name / "edge_config.json").read_text())
    return qe.EdgeShard.load(str(root / name)), config


def recall_at_10(sink: QdrantEdgeSink | QdrantServerSink, vectors: np.ndarray) -> float:
    queries = clustered(50, seed=9)
    ids = [f"d{i // 2}:{i % 2}" for i in range(len(vectors))]
    found = 0
    for query in queries:
        exact = {ids[i] for i in np.argsort(-(vectors @ query))[:10]}
        hits = sink.search(query, 10)
        found += len({f"{h.payload['doc_id']}:{h.payload['chunk_index']}" for h in hits} & exact)
    return found / (10 * len(queries))


def test_edge_maintenance_indexes_the_chunks_and_never_the_state(tmp_path: Path) -> None:
    vectors = clustered(6000, seed=1)
    sink = edge_sink(tmp_path)
    try:
        assert sink.maintenance_due()  # the first run after an open is due at once
        sink.maintain()
        assert not sink.maintenance_due()
        batch = writes(vectors)
        for start in range(0, len(batch), 250):
            sink.apply(batch[start:start + 250])
            if sink.maintenance_due():  # what the consumer does between batches
                sink.maintain()
                assert not sink.maintenance_due()
        sink.maintain()
        assert recall_at_10(sink, vectors) >= 0.9
        chunks, state = sink.collection, f"{sink.collection}_state"
    finally:
        sink.close()
    shard, config = shard_on_disk(tmp_path, chunks)
    info = shard.info()
    shard.close()
    assert config["vectors"][""]["quantization_config"] == {"binary": {  # type: ignore[index]
        "always_ram": True, "encoding": "one_bit", "query_encoding": "default"}}
    assert config["hnsw_config"]["m"] == 0  # type: ignore[index]
    assert info.points_count == 6000
    assert info.segments_count > 1 and info.indexed_vectors_count >= 5000
    shard, _ = shard_on_disk(tmp_path, state)
    assert shard.info().indexed_vectors_count == 0
    shard.close()


def test_a_changed_index_setting_applies_at_the_next_start(tmp_path: Path) -> None:
    vectors = clustered(3000, seed=2)
    sink = edge_sink(tmp_path, quantization={"kind": "none"})
    sink.apply(writes(vectors))
    sink.maintain()
    name = sink.collection
    sink.close()
    assert "quantization_config" not in json.loads(
        (tmp_path / name / "edge_config.json").read_text())["vectors"][""]
    sink = edge_sink(tmp_path, quantization={"kind": "scalar", "oversampling": 2.0})
    try:
        sink.maintain()
        assert recall_at_10(sink, vectors) >= 0.9
    finally:
        sink.close()
    shard, config = shard_on_disk(tmp_path, name)
    shard.close()
    assert "scalar" in config["vectors"][""]["quantization_config"]  # type: ignore[index]


def test_quantization_turned_off_is_not_used_by_searches(tmp_path: Path) -> None:
    # Segments built quantized keep their quantized copy (only a rebuild drops it):
    # with kind none, searches skip it and score every vector in full.
    vectors = clustered(3000, seed=5)
    sink = edge_sink(tmp_path)
    sink.apply(writes(vectors))
    sink.maintain()
    sink.close()
    sink = edge_sink(tmp_path, quantization={"kind": "none"})
    try:
        assert recall_at_10(sink, vectors) == 1.0
    finally:
        sink.close()


def test_a_store_grown_unindexed_is_left_to_a_rebuild(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    vectors = clustered(8000, seed=6)
    sink = edge_sink(tmp_path, maintenance={"every_points": 0})  # as before sink.index
    sink.apply(writes(vectors[:6000]))
    sink.close()
    sink = edge_sink(tmp_path)  # every_points 1000: 6000 unindexed is more than twice that
    try:
        assert "not indexed" in caplog.text
        sink.apply(writes(vectors, start=3000))  # 2000 more chunk points
        assert not sink.maintenance_due()  # one run would index all 8000 at once
    finally:
        sink.close()
    sink = edge_sink(tmp_path, maintenance={"every_points": 5000})  # 8000 <= 2 x 5000
    try:
        assert sink.maintenance_due()  # the points left unindexed count towards the next run
        sink.maintain()
        assert not sink.maintenance_due()
    finally:
        sink.close()


def test_exact_search_matches_numpy(tmp_path: Path) -> None:
    vectors = clustered(3000, seed=3)
    sink = edge_sink(tmp_path, exact=True)
    try:
        sink.apply(writes(vectors))
        sink.maintain()
        assert recall_at_10(sink, vectors) == 1.0
    finally:
        sink.close()


class RecordingClient(QdrantClient):
    """qdrant-client's in-process store, which accepts index settings and keeps none of
    them (it always scans exactly): what the sink asks a server for is read here."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.created: dict[str, dict[str, Any]] = {}

    def create_collection(self, collection_name: str, **kwargs: Any) -> bool:
        self.created[collection_name] = kwargs
        return bool(super().create_collection(collection_name, **kwargs))


@pytest.fixture
def client() -> Iterator[RecordingClient]:
    made = RecordingClient()
    yield made
    made.close()


def test_a_server_collection_is_created_with_the_index_settings(client: RecordingClient) -> None:
    index = IndexSettings.model_validate({"hnsw": {"m": 8}, "quantization": {"kind": "scalar"},
                                          "optimizer": {"indexing_threshold_kb": 5000},
                                          "on_disk_vectors": True})
    sink = QdrantServerSink(":memory:", "docs", client=client, index=index)
    sink.open(FP)
    try:
        vectors = clustered(600, seed=4)
        sink.apply(writes(vectors))
        assert recall_at_10(sink, vectors) == 1.0
        chunks = client.created[sink.collection]
        state = client.created[f"{sink.collection}_state"]
    finally:
        sink.close()
    assert chunks["quantization_config"] == models.ScalarQuantization(
        scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99,
                                               always_ram=True))
    assert chunks["hnsw_config"] == models.HnswConfigDiff(m=8)
    assert chunks["optimizers_config"] == models.OptimizersConfigDiff(indexing_threshold=5000)
    assert chunks["vectors_config"].on_disk is True
    assert "quantization_config" not in state and state["vectors_config"].on_disk is None


def test_a_server_keeps_its_own_graph_and_optimizer_defaults(client: RecordingClient) -> None:
    # The Edge-sized defaults (no graph, 20 MB segments) are not imposed on a server.
    sink = QdrantServerSink(":memory:", "docs", client=client)
    sink.open(FP)
    try:
        chunks = client.created[sink.collection]
        assert not sink.maintenance_due()  # the server indexes by itself
        sink.maintain()  # a rebuild's wait for the server's index: green here at once
    finally:
        sink.close()
    assert chunks["hnsw_config"] is None and chunks["optimizers_config"] is None
    binary = chunks["quantization_config"]
    assert isinstance(binary, models.BinaryQuantization)
    assert binary.binary.encoding == models.BinaryQuantizationEncoding.ONE_BIT


def test_search_parameters_sent_to_a_server() -> None:
    from embedstream.sinks._server_index import search_params

    sent = search_params(IndexSettings.model_validate({"hnsw": {"ef": 128}}))
    assert sent == models.SearchParams(hnsw_ef=128, quantization=models.QuantizationSearchParams(
        rescore=True, oversampling=4.0))
    assert search_params(IndexSettings(exact=True)) == models.SearchParams(exact=True)
    assert search_params(IndexSettings.model_validate({"quantization": {"kind": "none"}})) == \
        models.SearchParams(quantization=models.QuantizationSearchParams(ignore=True))


def test_index_settings_from_yaml_and_environment(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("sink:\n  index:\n    hnsw: {m: 16}\n    quantization: {kind: scalar}\n")
    monkeypatch.setenv("EMBEDSTREAM_SINK__INDEX__QUANTIZATION__OVERSAMPLING", "2.5")
    monkeypatch.setenv("EMBEDSTREAM_SINK__INDEX__MAINTENANCE__EVERY_POINTS", "0")
    index = load_settings(file).sink.index
    assert (index.hnsw.m, index.quantization.kind, index.quantization.oversampling,
            index.maintenance.every_points) == (16, "scalar", 2.5, 0)
    monkeypatch.setenv("EMBEDSTREAM_SINK__INDEX__QUANTIZATION__OVERSAMPLING", "0.5")
    with pytest.raises(ConfigError, match="oversampling"):
        load_settings(file)
    file.write_text("sink:\n  index:\n    quantization: {kind: product}\n")
    monkeypatch.delenv("EMBEDSTREAM_SINK__INDEX__QUANTIZATION__OVERSAMPLING")
    with pytest.raises(ConfigError, match="kind"):
        load_settings(file)


@pytest.mark.slow  # the real broker
def test_the_consumer_keeps_the_store_indexed(broker: LocalBroker, tmp_path: Path,
                                              tiny_model_dir: Path) -> None:
    topic, count = unique("index"), 400
    create_topic(broker.bootstrap_servers, topic, partitions=1)

    def wave(first: int) -> None:
        produce(broker.bootstrap_servers, topic, [(f"d{i}".encode(), json.dumps(
            {"id": f"d{i}", "text": f"Document {i} tells of subject {i * 7 % 31}. " * 3,
             "version": 1}).encode()) for i in range(first, first + count // 4)])

    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        embed={"model": str(tiny_model_dir), "backend": "torch", "precision": "fp32"},
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 100,
              "index": {"optimizer": {"indexing_threshold_kb": 1, "max_segment_size_kb": 64},
                        "maintenance": {"every_points": 50}}},
        metrics={"enabled": False})
    pipeline = build_pipeline(settings)
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)

    def runs() -> float:
        return metrics.registry.get_sample_value(
            "embedstream_sink_operation_duration_seconds_count", {"op": "optimize"}) or 0

    try:
        stream.start()  # the first run after the store's open: before joining the group
        assert runs() == 1
        for first in range(0, count, count // 4):  # four waves, as a stream brings them
            wave(first)
            run_until(stream, lambda end=first + count // 4: stream.committed.get(
                (topic, 0), 0) >= end, 90)
        collection = pipeline.sink.collection
    finally:
        stream.close()
        pipeline.close()
    assert runs() >= 3
    started = time.perf_counter()
    shard = qe.EdgeShard.load(str(tmp_path / "store" / collection))
    info = shard.info()
    shard.close()
    assert time.perf_counter() - started < 30
    assert info.points_count >= count and info.indexed_vectors_count >= count // 2


def test_a_rebuild_indexes_its_collection_before_the_swap(tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    from embedstream.bulk.rebuild import RebuildOptions, rebuild

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i} is about "
                                          f"subject {i * 7 % 31} and more. " * 4}) + "\n"
                              for i in range(600)))
    settings = Settings(
        source={"format": "native"},
        embed={"model": str(tiny_model_dir), "backend": "torch", "precision": "fp32"},
        sink={"path": str(tmp_path / "store"), "collection": "docs",
              # No maintenance by the stream: the indexed segments are the rebuild's.
              "index": {"optimizer": {"indexing_threshold_kb": 1, "max_segment_size_kb": 64},
                        "maintenance": {"every_points": 0}}},
        metrics={"enabled": False})
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    assert report.documents == 600
    shard = qe.EdgeShard.load(str(tmp_path / "store" / str(report.target)))
    info = shard.info()
    shard.close()
    assert info.points_count == report.chunks
    assert info.indexed_vectors_count == report.chunks  # every chunk quantized, none left plain
