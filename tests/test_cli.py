"""The ``embedstream`` commands as a user runs them, against the real broker and store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, produce, run_until, unique

DOCS = {
    "otters": "Sea otters hold hands while they sleep so that they do not drift apart.",
    "volcano": "A volcano erupts when pressure from gases and molten rock becomes too great.",
    "bread": "Sourdough bread rises because wild yeast and lactic acid bacteria ferment the dough.",
}

STALE = 'embedstream_events_total{op="native",outcome="stale",route="default"}'
APPLIED = 'embedstream_events_total{op="native",outcome="applied",route="default"}'


def native(doc_id: str, text: str, version: int) -> tuple[bytes, bytes]:
    return doc_id.encode(), json.dumps({"id": doc_id, "text": text, "version": version,
                                        "metadata": {"lang": "en"}}).encode()


@pytest.fixture(scope="module")
def store(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three native-format documents consumed into a Qdrant Edge store."""
    topic = unique("native")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    produce(broker.bootstrap_servers, topic, [native(k, v, 1) for k, v in DOCS.items()])
    path = tmp_path_factory.mktemp("cli") / "store"
    config = {
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
                  "group_id": unique("cli"), "options": {"session.timeout.ms": 6000}},
        "source": {"format": "native"},
        "sink": {"kind": "qdrant-edge", "path": str(path), "collection": "docs"},
        "metrics": {"enabled": False},
    }
    pipeline = build_pipeline(Settings(**config))
    try:
        stream = build_consumer(pipeline, Metrics())
        run_until(stream, lambda: sum(stream.committed.values()) >= len(DOCS), 60,
                  "the documents to be committed")
        stream.close()
    finally:
        pipeline.close()
    config_file = path.parent / "embedstream.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return {"config": config, "file": config_file}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedstream.stream.app.cli", *args], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120,
    )


@pytest.mark.slow
def test_search_returns_the_relevant_document_first(store: dict[str, Any]) -> None:
    result = cli("search", "why do otters hold hands?", "-k", "2", "--json",
                 "--config", str(store["file"]))
    assert result.returncode == 0, result.stderr
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(hits) == 2
    assert hits[0]["doc_id"] == "otters" and hits[0]["text"] == DOCS["otters"]
    assert hits[0]["score"] > hits[1]["score"]


@pytest.mark.slow
def test_export_writes_every_point_as_a_json_line(store: dict[str, Any]) -> None:
    result = cli("export", "--format", "jsonl", "--config", str(store["file"]))
    assert result.returncode == 0, result.stderr
    points = [json.loads(line) for line in result.stdout.splitlines()]
    assert {p["payload"]["doc_id"] for p in points} == set(DOCS)
    for point in points:
        assert set(point) == {"id", "vector", "payload"}
        assert len(point["vector"]) == 384
        assert abs(np.linalg.norm(point["vector"]) - 1.0) < 1e-3
        assert point["payload"]["lang"] == "en" and point["payload"]["version"] == 1
        assert point["payload"]["text"] == DOCS[point["payload"]["doc_id"]]


@pytest.mark.slow
def test_a_consumer_with_another_fingerprint_refuses_to_start(store: dict[str, Any]) -> None:
    result = cli("consume", "--config", str(store["file"]),
                 env={"EMBEDSTREAM_CHUNK__MAX_TOKENS": "64"})
    assert result.returncode == 2
    assert "fingerprint" in result.stderr and "chunker" in result.stderr


def test_invalid_config_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sink:\n  kind: pinecone\n")
    result = cli("consume", "--config", str(bad))
    assert result.returncode == 2
    assert "sink.kind" in result.stderr


@pytest.mark.slow
def test_consume_serves_metrics_and_stops_cleanly_on_sigterm(store: dict[str, Any]) -> None:
    """A second group replays the topic through the service: every event is stale
    (the store already has it), offsets are committed, and SIGTERM exits 0."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDSTREAM_METRICS__ENABLED": "true",
           "EMBEDSTREAM_METRICS__HOST": "127.0.0.1", "EMBEDSTREAM_METRICS__PORT": str(port),
           "EMBEDSTREAM_KAFKA__GROUP_ID": unique("replay")}
    process = subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "consume",
         "--config", str(store["file"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )

    def scrape() -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as reply:
                return str(reply.read().decode())
        except OSError:
            return ""

    def sample(text: str, line_start: str) -> float:
        values = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(line_start)]
        return values[0] if values else 0.0

    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline:
            text = scrape()
            # The checkpoint (flush, then commit) follows within sink.flush_interval_ms.
            if (sample(text, STALE) >= 3
                    and sample(text, "embedstream_commits_total") >= 1):
                break
            time.sleep(0.5)
        assert sample(text, STALE) == 3
        assert sample(text, APPLIED) == 0
        assert sample(text, "embedstream_commits_total") >= 1
        assert 'embedstream_build_info{' in text and "all-MiniLM-L6-v2" in text
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output[-2000:]
    assert '"level": "info"' in output and "stopped cleanly" in output
