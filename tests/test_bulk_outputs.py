"""embedstream.bulk.outputs (vector files from a rebuild) and embedstream.bulk.progress
(progress reports)."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow.parquet as pq
import pytest

import embedstream.bulk.outputs as outputs
from embedstream.bulk.outputs import VectorFileWriter, VectorRow
from embedstream.bulk.progress import Progress, format_duration
from embedstream.stream.errors import ConfigError
from embedstream.stream.store import chunk_point_id

DIM = 384
N = 3000


def make_rows(n: int, seed: int = 7) -> tuple[list[VectorRow], npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        doc, chunk = f"doc-{i // 3}-é", i % 3
        rows.append(VectorRow(chunk_point_id(doc, chunk), doc, chunk, chunk * 100,
                              chunk * 100 + 99, f"h{i:08x}", f"text {i} ✓ " * (i % 5)))
    return rows, rng.standard_normal((n, DIM)).astype(np.float32)


ROWS, VECTORS = make_rows(N)


def feed(writer: VectorFileWriter, lo: int, hi: int, step: int = 250) -> None:
    for i in range(lo, hi, step):
        j = min(hi, i + step)
        writer.add(ROWS[i:j], VECTORS[i:j])


def read_back(path: Path) -> tuple[list[dict[str, Any]], npt.NDArray[np.float32]]:
    """The rows (as dicts, no text for .npy) and vectors of a finished output."""
    if path.suffix == ".npy":
        vectors = np.load(path)
        assert np.array_equal(np.load(path, mmap_mode="r"), vectors)
        lines = path.with_suffix(".ids.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines], vectors
    table = pq.read_table(path)
    vectors = table.column("vector").combine_chunks().flatten().to_numpy()
    return table.drop_columns(["vector"]).to_pylist(), vectors.reshape(-1, DIM)


def expected(n: int, text: bool) -> list[dict[str, Any]]:
    out = []
    for r in ROWS[:n]:
        d = {"id": r.point_id, "doc_id": r.doc_id, "chunk_index": r.chunk_index,
             "start": r.start, "end": r.end, "content_hash": r.content_hash}
        if text:
            d["text"] = r.text
        out.append(d)
    return out


def assert_output(path: Path, n: int = N) -> None:
    rows, vectors = read_back(path)
    assert vectors.dtype == np.float32
    assert vectors.shape == (n, DIM)
    assert np.array_equal(vectors, VECTORS[:n])
    assert rows == expected(n, text=path.suffix == ".parquet")
    # Nothing partial is left beside the output.
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        [path.name] + ([path.with_suffix(".ids.jsonl").name] if path.suffix == ".npy" else []))


@pytest.fixture(params=[".npy", ".parquet"])
def out_path(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return tmp_path / f"vectors{request.param}"


@pytest.fixture
def small_row_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    # Parquet parts then get row groups written mid-part, as with real sizes.
    monkeypatch.setattr(outputs, "_ROW_GROUP_BYTES", 200_000)


@pytest.mark.usefixtures("small_row_groups")
def test_round_trip_with_checkpoints(out_path: Path) -> None:
    writer = VectorFileWriter(out_path, DIM)
    for lo in range(0, N, 1000):
        feed(writer, lo, lo + 1000)
        token = writer.checkpoint()
        json.dumps(token)  # must be JSON-serialisable
        assert token["rows"] == writer.rows_written == lo + 1000
        assert not out_path.exists()
    writer.close()
    assert_output(out_path)
    with pytest.raises(ValueError, match="closed"):
        writer.add(ROWS[:1], VECTORS[:1])


def test_round_trip_without_checkpoint(out_path: Path) -> None:
    with VectorFileWriter(out_path, DIM) as writer:
        feed(writer, 0, N, step=333)
        assert not out_path.exists()
    assert_output(out_path)


def test_empty_output(out_path: Path) -> None:
    VectorFileWriter(out_path, DIM).close()
    assert_output(out_path, 0)


@pytest.mark.usefixtures("small_row_groups")
def test_resume_after_abandon_gives_each_row_once(out_path: Path) -> None:
    first = VectorFileWriter(out_path, DIM)
    feed(first, 0, 900)
    token = json.loads(json.dumps(first.checkpoint()))
    feed(first, 900, 1700)  # past the checkpoint, then "killed": never closed
    first.abort()
    assert not out_path.exists()

    second = VectorFileWriter(out_path, DIM, resume=token)
    assert second.rows_written == 900
    feed(second, 900, 2000)
    token = second.checkpoint()
    feed(second, 2000, 2400)
    second.abort()

    third = VectorFileWriter(out_path, DIM, resume=token)
    feed(third, 2000, N)
    third.close()
    assert_output(out_path)


_KILLED = """
import json, os, signal, sys
sys.path[:0] = {paths!r}
import embedstream.bulk.outputs as outputs
from tests.test_bulk_outputs import ROWS, VECTORS, DIM, feed
outputs._ROW_GROUP_BYTES = 200_000
writer = outputs.VectorFileWriter(outputs.Path({path!r}), DIM)
feed(writer, 0, 1100)
print(json.dumps(writer.checkpoint()), flush=True)
feed(writer, 1100, 2200)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill(out_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])
    script = textwrap.dedent(_KILLED).format(paths=[root], path=str(out_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == -9, proc.stderr
    token = json.loads(proc.stdout)
    assert not out_path.exists()
    # The killed run did leave rows past its checkpoint on disk, for the resume to drop.
    if out_path.suffix == ".npy":
        assert Path(f"{out_path}.part").stat().st_size > token["vector_bytes"]
    else:
        assert len(list(Path(f"{out_path}.parts").iterdir())) > len(token["parts"])
    writer = VectorFileWriter(out_path, DIM, resume=token)
    feed(writer, 1100, N)
    writer.close()
    assert_output(out_path)


def test_fresh_start_discards_leftovers_and_replaces_output_at_close(out_path: Path) -> None:
    out_path.write_bytes(b"old output")
    stale = VectorFileWriter(out_path, DIM)
    feed(stale, 0, 500)
    stale.checkpoint()
    stale.abort()
    writer = VectorFileWriter(out_path, DIM)
    feed(writer, 0, 100)
    assert out_path.read_bytes() == b"old output"  # the old file stays until close
    writer.close()
    assert_output(out_path, 100)


@pytest.mark.parametrize("name", ["vectors.csv", "vectors", "vectors.npz", "vectors.parquet.gz"])
def test_bad_suffix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"\.parquet.*\.npy"):
        VectorFileWriter(tmp_path / name, DIM)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing"):
        VectorFileWriter(tmp_path / "nope" / "vectors.npy", DIM)


def test_unusable_tokens(out_path: Path, tmp_path: Path) -> None:
    writer = VectorFileWriter(out_path, DIM)
    feed(writer, 0, 300)
    token = writer.checkpoint()
    writer.abort()
    with pytest.raises(ConfigError, match="dimension"):
        VectorFileWriter(out_path, DIM + 1, resume=token)
    other = tmp_path / ("x.parquet" if out_path.suffix == ".npy" else "x.npy")
    with pytest.raises(ConfigError, match="cannot resume"):
        VectorFileWriter(other, DIM, resume=token)
    with pytest.raises(ConfigError, match="cannot resume"):  # no partial files there
        VectorFileWriter(out_path.with_name("moved" + out_path.suffix), DIM, resume=token)


def test_vectors_must_match(out_path: Path) -> None:
    writer = VectorFileWriter(out_path, DIM)
    with pytest.raises(ValueError, match="shape"):
        writer.add(ROWS[:2], VECTORS[:3])
    with pytest.raises(ValueError, match="float32"):
        writer.add(ROWS[:2], VECTORS[:2].astype(np.float64))
    writer.abort()


@pytest.mark.parametrize("shape", [(0, DIM), (10**9, DIM), (10**12, 4096),
                                   (2**63 - 1, 2**63 - 1)])
def test_npy_header_parses_for_large_shapes(shape: tuple[int, int]) -> None:
    header = outputs._npy_header(*shape)
    assert len(header) == 128 and len(header) % 64 == 0
    fp = io.BytesIO(header)
    assert np.lib.format.read_magic(fp) == (1, 0)
    assert np.lib.format.read_array_header_1_0(fp) == (shape, False, np.dtype("<f4"))
    assert fp.tell() == 128


# ---------------------------------------------------------------------- progress


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_format_duration() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3 * 3600 + 62) == "3:01:02"
    assert format_duration(100 * 3600) == "100:00:00"


def test_terminal_line_shows_rate_and_eta() -> None:
    clock, stream = FakeClock(), FakeStream(tty=True)
    progress = Progress(10_000, stream=stream, clock=clock)
    clock.now += 10
    progress.update(1000, chunks=3000, tokens=1.5e6)
    line = stream.getvalue()
    assert line.startswith("\r[##") and "\n" not in line
    assert "1,000/10,000 docs" in line and "10.0%" in line
    assert "100.0 docs/s" in line and "ETA 0:01:30" in line
    assert "chunks=3,000" in line and "tokens=1.5e+06" in line
    clock.now += 0.1
    progress.update(1100)  # within the redraw interval: not drawn
    assert stream.getvalue() == line
    clock.now += 0.2
    progress.update(1200)
    assert stream.getvalue().count("\r") == 2
    progress.close()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\r") == 3


def test_terminal_recent_rate_follows_a_slowdown() -> None:
    clock, stream = FakeClock(), FakeStream(tty=True)
    progress = Progress(None, stream=stream, clock=clock, unit="rows")
    for _ in range(60):  # 100 rows/s for a minute, then 10 rows/s
        clock.now += 1
        progress.update(progress.snapshot()["done"] + 100)
    for _ in range(60):
        clock.now += 1
        progress.update(progress.snapshot()["done"] + 10)
    snap = progress.snapshot()
    assert snap["rate"] == pytest.approx(55.0)
    assert snap["recent_rate"] == pytest.approx(10.0)
    assert snap["eta_s"] is None and snap["percent"] is None
    last = stream.getvalue().rsplit("\r", 1)[1]
    assert "6,600 rows" in last and "55.0 rows/s" in last and "(recent 10.0/s)" in last
    assert "ETA" not in last and "[" not in last


def progress_of(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra={"progress": ...}`` a report carries."""
    value: dict[str, Any] = record.__dict__["progress"]
    return value


def test_log_mode_reports_at_the_interval_only(caplog: pytest.LogCaptureFixture) -> None:
    clock, stream = FakeClock(), FakeStream(tty=False)
    caplog.set_level(logging.INFO, logger="embedstream.bulk")
    progress = Progress(4000, interval_s=10, stream=stream, clock=clock, start=500)
    for step in range(1, 36):
        clock.now += 1
        progress.update(500 + 100 * step, chunks=300 * step)
    assert [progress_of(r)["done"] for r in caplog.records] == [1500, 2500, 3500]
    progress.close()
    assert stream.getvalue() == ""
    records = caplog.records
    assert len(records) == 4 and all(r.name == "embedstream.bulk" for r in records)
    first = records[0]
    assert first.levelno == logging.INFO
    assert "1,500/4,000 docs" in first.getMessage() and "ETA 0:00:25" in first.getMessage()
    assert progress_of(first)["rate"] == pytest.approx(100.0)  # `start` does not count
    assert progress_of(first)["figures"] == {"chunks": 3000}
    assert progress_of(first)["final"] is False
    assert progress_of(records[-1])["final"] is True and progress_of(records[-1])["done"] == 4000
    assert progress_of(records[-1])["eta_s"] == 0.0
    json.dumps(progress_of(records[-1]))
