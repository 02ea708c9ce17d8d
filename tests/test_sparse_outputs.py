"""Document sparse vectors where a user reads them back: ``rebuild --output`` files,
``export``, and ``search --mode`` from the command line (a tiny random model for the
dense side; BM25 makes the sparse side meaningful)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.config import RetrievalSettings, Settings
from embedstream.stream.sparse import Bm25Encoder

from .streamkit import DATA

SCIFACT = DATA / "beir" / "scifact" / "corpus.jsonl"
pytestmark = pytest.mark.skipif(not SCIFACT.is_file(), reason="needs ../shared/data")
ENCODER = Bm25Encoder(RetrievalSettings(sparse="bm25"))


def config(tmp: Path, model: Path) -> dict[str, Any]:
    return {"source": {"id_fields": ["_id"], "text_fields": ["title", "text"]},
            "embed": {"model": str(model), "backend": "torch", "precision": "fp32"},
            "sink": {"path": str(tmp / "store"), "collection": "docs"},
            "retrieval": {"sparse": "bm25"}, "metrics": {"enabled": False}}


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    with SCIFACT.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for _, line in zip(range(40), handle, strict=False)]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    return path, {str(r["_id"]): f"{r['title']}\n\n{r['text']}" for r in rows}


def test_parquet_output_holds_each_documents_vector_on_its_first_chunk(
        tmp_path: Path, tiny_model_dir: Path, corpus: tuple[Path, dict[str, str]]) -> None:
    source, texts = corpus
    settings = Settings(**config(tmp_path, tiny_model_dir))
    report = rebuild(settings, RebuildOptions(source=str(source), output=tmp_path / "v.parquet"))
    table = pq.read_table(tmp_path / "v.parquet").to_pylist()
    assert len(table) == report.chunks > len(texts)
    firsts = [r for r in table if r["chunk_index"] == 0]
    assert {r["doc_id"] for r in firsts} == set(texts)
    for row in firsts:
        expected = ENCODER.encode_document(texts[row["doc_id"]])
        assert tuple(row["sparse_indices"]) == expected.indices
        assert row["sparse_values"] == pytest.approx(expected.values)
    assert all(r["sparse_indices"] is None for r in table if r["chunk_index"] > 0)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "embedstream.stream.app.cli", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_export_and_search_modes_from_the_command_line(
        tmp_path: Path, tiny_model_dir: Path, corpus: tuple[Path, dict[str, str]]) -> None:
    source, texts = corpus
    raw = config(tmp_path, tiny_model_dir)
    report = rebuild(Settings(**raw), RebuildOptions(source=str(source), handover=False))
    config_file = tmp_path / "embedstream.yaml"
    config_file.write_text(yaml.safe_dump(raw))

    exported = cli("export", "--config", str(config_file))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    documents = {d["doc_id"]: d for d in lines if "sparse" in d}
    assert sum(1 for line in lines if "vector" in line) == report.chunks
    assert set(documents) == set(texts)
    some = next(iter(documents))
    assert tuple(documents[some]["sparse"]["indices"]) == ENCODER.encode_document(
        texts[some]).indices

    # A document's own title finds it first by its sparse vector, and in the fused
    # ranking the default gives this collection.
    doc_id, text = sorted(texts.items())[3]
    title = text.split("\n\n")[0]
    for mode in ("sparse", None):
        found = cli("search", title, "-k", "3", "--json", "--config", str(config_file),
                    *(["--mode", mode] if mode else []))
        assert found.returncode == 0, found.stderr
        hits = [json.loads(line) for line in found.stdout.splitlines()]
        assert hits[0]["doc_id"] == doc_id, mode
        assert len({h["doc_id"] for h in hits}) == len(hits)  # documents, not chunks
        assert hits[0]["text"] in text and hits[0]["chunk_index"] is not None
