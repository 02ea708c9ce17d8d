"""The scale bench (``bench/scale.py``, issue 24) at a small size: it runs end to end on
the real Qdrant Edge sink and its last line holds every figure the issue asks for, with
values that make sense. The full growth (to 1M points) is not part of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ("points", "apply_p99_ms", "apply_growth", "search_p99_ms",
            "filtered_search_p99_ms", "recall_at_10", "reopen_s", "rss_bytes_per_point",
            "disk_bytes_per_point", "max_sink_block_ms", "index")
VECTOR_BYTES = 384 * 4  # one all-MiniLM-L6-v2 vector in fp32: a floor for disk per point


# Embeds the MS MARCO sample with the real model when its cache is cold (about a minute
# on 2 cores); about 25 s once cached.
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_small_growth_reports_every_figure(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "bench/scale.py", "--max", "20000", "--steps", "5000,20000",
         "--sinks", "edge", "--samples", "100", "--store-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=560,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    steps, summary = lines[:-1], lines[-1]

    # One line per step, each a little over its target (whole documents of 1-3 chunks).
    assert [s["sink"] for s in steps] == ["edge", "edge"]
    assert 5000 <= steps[0]["points"] < 5003
    assert 20000 <= steps[1]["points"] < 20003
    assert all(s["killed_after_points"] > 0 for s in steps)  # a writer was killed each step

    assert summary["summary"] == "edge"
    assert [k for k in REQUIRED if summary.get(k) is None] == []
    assert summary["points"] == steps[1]["points"]
    assert 0 < summary["apply_p99_ms"] < 1000
    assert summary["apply_growth"] == pytest.approx(
        steps[1]["apply_ms"]["p99"] / steps[0]["apply_ms"]["p99"], rel=0.01)
    assert 0 < summary["search_p99_ms"] < 1000
    assert 0 < summary["filtered_search_p99_ms"] < 1000
    # 500 searches of each kind (the sample's 100 queries and perturbed copies), so
    # a p99 is not just the slowest one.
    assert steps[1]["search_ms"]["n"] == steps[1]["filtered_search_ms"]["n"] == 500
    # The first maintenance after the reopen is made as the consumer's start makes it.
    assert all(s["open_maintain_ms"] > 0 for s in steps)
    # The sink's own index (binary quantization with rescoring, kept up by the
    # consumer's maintenance policy): the recall goal holds at this size too.
    assert summary["index"]["kind"] == "sink"
    assert summary["index"]["segments"] > 1 and summary["index"]["indexed_vectors"] > 0
    assert summary["recall_at_10"] >= 0.95
    assert summary["filtered_recall_at_10"] >= 0.95
    assert steps[1]["optimize_ms"]["n"] >= 1  # maintain() ran while it grew
    assert 0 < summary["reopen_s"] < 60
    assert summary["disk_bytes_per_point"] > VECTOR_BYTES
    assert summary["rss_bytes_per_point"] > 0
    assert summary["max_sink_block_ms"] >= max(s["apply_ms"]["max"] for s in steps)
    assert {"apply_ms.p99", "search_ms.p99", "reopen_s", "disk_bytes_per_point"} <= set(
        summary["growth"])
    assert summary["growth_from_points"] == steps[0]["points"]
    assert "N(0, 0.02^2)" in summary["vectors"]["perturbation"]
    assert summary["machine"]["cores"] >= 1
