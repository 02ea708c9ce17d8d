"""``embedstream rebuild`` from files: into a store behind the alias, into vector
files, resumed after a kill, with bad rows reported; and ``embedstream plan``."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedstream.bulk.checkpoint import Checkpoint
from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.sinks.factory import build_admin
from embedstream.stream.app.cli import main
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.store import chunk_point_id

SCIFACT = Path(__file__).resolve().parents[1].parent / "shared/data/beir/scifact/corpus.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def settings_for(tmp: Path, model: str, precision: str = "auto", **bulk: object) -> Settings:
    return Settings(source={"id_fields": ["_id"], "text_fields": ["title", "text"]},
                    embed={"model": model, "backend": "torch", "precision": precision},
                    sink={"path": str(tmp / "store"), "collection": "docs"},
                    metrics={"enabled": False}, bulk=bulk)


def scifact_subset(path: Path, n: int) -> list[dict[str, str]]:
    with SCIFACT.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(n), handle, strict=False)]
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


@pytest.mark.slow
def test_a_rebuilt_collection_serves_the_stream_and_finds_documents(
        tmp_path: Path, minilm: object) -> None:
    rows = scifact_subset(tmp_path / "corpus.jsonl.gz", 150)
    settings = settings_for(tmp_path, "sentence-transformers/all-MiniLM-L6-v2")
    report = rebuild(settings, RebuildOptions(source=str(tmp_path / "corpus.jsonl.gz"),
                                              handover=False))
    assert report.records == report.documents == 150 and report.failures == 0
    assert report.chunks > 150 and 0 <= report.padding_fraction < 0.2
    # The stream opens it through the alias: same fingerprint as the stream's own.
    pipeline = build_pipeline(settings)
    try:
        assert pipeline.sink.collection == report.target
        points = list(pipeline.sink.points())
        assert len(points) == report.chunks
        sample = points[:: max(1, len(points) // 40)]
        fresh = pipeline.embedder.embed([str(p.payload["text"]) for p in sample])
        stored = np.asarray([p.vector for p in sample], np.float32)
        assert (fresh * stored).sum(axis=1).min() >= 0.99
        # A user's check: a document's own title finds it first.
        for row in rows[:10]:
            top = pipeline.sink.search(pipeline.embedder.embed([row["title"]])[0].tolist(), 1)
            assert top[0].payload["doc_id"] == str(row["_id"])
    finally:
        pipeline.close()


def test_bad_rows_are_reported_and_the_rest_is_written(tmp_path: Path,
                                                       tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "a", "title": "Alpha", "text": "first"}\n'
                      "not json\n"
                      '{"title": "no id"}\n'
                      '{"_id": "b", "title": "Beta", "text": "second"}\n'
                      f'{json.dumps({"_id": "c", "text": "x" * 50})}\n')
    settings = settings_for(tmp_path, str(tiny_model_dir)).model_copy(update={
        "source": Settings().source.model_copy(update={
            "id_fields": ("_id",), "text_fields": ("title", "text"), "max_document_chars": 40})})
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    assert (report.records, report.documents, report.failures) == (5, 2, 3)
    assert report.failures_file is not None
    failures = [json.loads(line) for line in Path(report.failures_file).read_text().splitlines()]
    assert [(f["where"].rsplit(":", 1)[1], f["reason"]) for f in failures] == [
        ("2", "invalid_json"), ("3", "missing_id"), ("5", "document_too_large")]


def test_vector_files_hold_every_chunk_in_order(tmp_path: Path, tiny_model_dir: Path) -> None:
    scifact_subset(tmp_path / "corpus.jsonl.gz", 60)
    settings = settings_for(tmp_path, str(tiny_model_dir), precision="fp32")
    source = str(tmp_path / "corpus.jsonl.gz")
    parquet = rebuild(settings, RebuildOptions(source=source, output=tmp_path / "v.parquet"))
    npy = rebuild(settings, RebuildOptions(source=source, output=tmp_path / "v.npy"))
    table = pq.read_table(tmp_path / "v.parquet")
    assert table.num_rows == parquet.chunks == npy.chunks
    matrix = np.load(tmp_path / "v.npy")
    ids = [json.loads(line) for line in (tmp_path / "v.ids.jsonl").read_text().splitlines()]
    assert matrix.shape == (len(ids), 32) and len(ids) == table.num_rows
    assert [r["id"] for r in ids] == table.column("id").to_pylist()
    assert all(r["id"] == chunk_point_id(r["doc_id"], r["chunk_index"]) for r in ids)
    np.testing.assert_allclose(np.asarray(table.column("vector").to_pylist(), np.float32),
                               matrix, atol=1e-5)
    admin = build_admin(settings.sink)
    try:
        assert admin.collections() == []  # files only: no store was written
    finally:
        admin.close()


@pytest.mark.slow  # a rebuild of 4,000 documents, killed, then resumed: ~12 s
def test_a_killed_rebuild_resumes_without_embedding_again(tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc{i}", "title": f"Title {i}",
                                          "text": f"Body of document {i}. " * 20}) + "\n"
                              for i in range(4000)))
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "source": {"id_fields": ["_id"], "text_fields": ["title", "text"]},
        "embed": {"model": str(tiny_model_dir), "backend": "torch", "precision": "fp32"},
        "sink": {"path": str(tmp_path / "store"), "collection": "docs"},
        "bulk": {"checkpoint_interval_s": 0.2, "write_documents": 16}}))
    checkpoint = tmp_path / "store" / ".rebuild" / "docs.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "rebuild", "--config", str(config),
         "--source", str(corpus), "--no-handover"], cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done = 0
    while done < 800 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.1)
        if checkpoint.exists():
            done = Checkpoint.from_json(checkpoint.read_text()).done
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert 800 <= done < 4000, f"killed after {done} documents"
    killed_at = Checkpoint.from_json(checkpoint.read_text())

    settings = Settings(source={"id_fields": ["_id"], "text_fields": ["title", "text"]},
                        embed={"model": str(tiny_model_dir), "backend": "torch",
                               "precision": "fp32"},
                        sink={"path": str(tmp_path / "store"), "collection": "docs"},
                        bulk={"write_documents": 16},
                        metrics={"enabled": False})
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    assert report.resumed_from == killed_at.done
    assert report.target == killed_at.target
    assert report.records == 4000 - killed_at.done  # nothing written before was embedded again
    assert not checkpoint.exists()
    pipeline = build_pipeline(settings)
    try:
        points = list(pipeline.sink.points())
        per_doc: dict[str, int] = {}
        for p in points:
            per_doc[str(p.payload["doc_id"])] = per_doc.get(str(p.payload["doc_id"]), 0) + 1
        assert len(per_doc) == 4000
        assert len({p.id for p in points}) == len(points)
    finally:
        pipeline.close()


def test_a_checkpoint_of_another_rebuild_is_not_mixed_in(tmp_path: Path,
                                                          tiny_model_dir: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        path.write_text('{"_id": "x", "title": "t"}\n')
    settings = settings_for(tmp_path, str(tiny_model_dir))
    state = tmp_path / "store" / ".rebuild"
    state.mkdir(parents=True)
    (state / "docs.json").write_text(Checkpoint("docs", str(a), [], "{}", None,
                                                "docs_old").to_json())
    with pytest.raises(ConfigError, match="--restart"):
        rebuild(settings, RebuildOptions(source=str(b), handover=False))
    report = rebuild(settings, RebuildOptions(source=str(b), handover=False, restart=True))
    assert report.documents == 1 and report.resumed_from == 0


def test_plan_prints_fleet_sizes_from_a_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--docs", "1000000", "--chunks-per-doc", "3", "--rate", "1500",
                 "--gpus", "1,4", "--price", "2.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    one, four = result["fleet"]
    assert result["chunks"] == 3_000_000
    assert one["wall_s"] == pytest.approx(2000.0) and four["wall_s"] == pytest.approx(500.0)
    assert one["device_hours"] == pytest.approx(2000 / 3600)
    assert one["cost"] == pytest.approx(2.5 * 2000 / 3600)
    assert main(["plan", "--docs", "10", "--rate", "5", "--gpus", "0"]) == 2


def test_plan_calibrates_on_this_machine(tmp_path: Path, tiny_model_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sample = tmp_path / "sample.jsonl"
    with SCIFACT.open(encoding="utf-8") as handle:
        sample.write_text("".join(line for _, line in zip(range(60), handle, strict=False)))
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"embed": {"model": str(tiny_model_dir)},
                                  "source": {"text_fields": ["title", "text"]}}))
    assert main(["plan", "--config", str(config), "--docs", "5000", "--sample", str(sample),
                 "--gpus", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "calibration:" in out and "tokens/s on cpu" in out
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [line[0] for line in lines] == ["1", "2"]


def test_plan_calibrates_on_the_built_in_sample_without_a_file(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"embed": {"model": str(tiny_model_dir)}}))
    assert main(["plan", "--config", str(config), "--docs", "1000", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    calibration = result["calibration"]
    assert calibration["sample"] == "built-in"
    # 600 passages of about sixty words, a sixth of them warm-up: one chunk or a few each.
    assert calibration["docs"] == 500 and calibration["chunks"] >= 500
    assert 20 < calibration["tokens_per_chunk"] < 128
    assert result["fleet"][0]["wall_s"] > 0


@pytest.mark.slow
def test_the_ray_engine_rebuilds_the_same_collection(tmp_path: Path,
                                                     tiny_model_dir: Path) -> None:
    pytest.importorskip("ray.data")
    rows = scifact_subset(tmp_path / "corpus.jsonl.gz", 40)
    settings = settings_for(tmp_path, str(tiny_model_dir), precision="fp32")
    source = str(tmp_path / "corpus.jsonl.gz")
    local = rebuild(settings, RebuildOptions(source=source, handover=False, swap=False))
    on_ray = rebuild(settings, RebuildOptions(source=source, handover=False, engine="ray"))
    assert (on_ray.documents, on_ray.chunks) == (local.documents, local.chunks) == (
        len(rows), local.chunks)
    pipeline = build_pipeline(settings)  # the alias now names the Ray-built collection
    try:
        assert pipeline.sink.collection == on_ray.target
        ray_points = {p.id: np.asarray(p.vector) for p in pipeline.sink.points()}
    finally:
        pipeline.close()
    from embedstream.sinks.factory import build_sink

    other = build_sink(settings.sink, physical=local.target)
    other.open(None)
    try:
        local_points = {p.id: np.asarray(p.vector) for p in other.points()}
    finally:
        other.close()
    assert ray_points.keys() == local_points.keys()
    assert min(float(ray_points[k] @ local_points[k]) for k in ray_points) >= 0.999


def test_a_rerun_after_the_swap_only_tidies_up(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "x", "title": "t"}\n')
    settings = settings_for(tmp_path, str(tiny_model_dir))
    done = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    # As if killed after moving the alias, before removing its checkpoint.
    left = Checkpoint("docs", str(corpus), [], "", None, done.target, done=1, embedded=True)
    from embedstream.bulk._rebuild_start import checkpoint_identity, files_signature
    from embedstream.bulk.checkpoint import CheckpointStore
    from embedstream.stream.app.service import build_pipeline as pipeline_for

    pipeline = pipeline_for(settings)
    left.fingerprint = checkpoint_identity(settings, pipeline.fingerprint)
    pipeline.close()
    left.files = files_signature(str(corpus))
    store = CheckpointStore(tmp_path / "store" / ".rebuild")
    store.save(left)
    again = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    assert again.target == done.target and again.records == 0
    assert not store.path("docs").exists()


def test_resuming_into_a_dropped_collection_is_refused(tmp_path: Path,
                                                        tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"_id": "x", "title": "t"}\n')
    settings = settings_for(tmp_path, str(tiny_model_dir))
    from embedstream.bulk._rebuild_start import checkpoint_identity, files_signature
    from embedstream.bulk.checkpoint import CheckpointStore

    pipeline = build_pipeline(settings)
    fingerprint = checkpoint_identity(settings, pipeline.fingerprint)
    pipeline.close()
    CheckpointStore(tmp_path / "store" / ".rebuild").save(Checkpoint(
        "docs", str(corpus), files_signature(str(corpus)), fingerprint, None,
        "docs_gone", done=1))
    with pytest.raises(ConfigError, match="no longer exists"):
        rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
