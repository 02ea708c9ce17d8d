"""A nearly full disk under a Qdrant Edge store: writes wait (the consumer pauses,
reports not ready, commits nothing) instead of the process dying with SIGBUS, and
resume when space returns; and a new collection reserves megabytes, not hundreds."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embedstream.sinks import QdrantEdgeSink, build_sink
from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings, SinkSettings
from embedstream.stream.errors import SinkUnavailable, StoreDiskFull
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.health import Health, serve_http
from embedstream.stream.metrics import Metrics
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Sink

from .streamkit import create_topic, produce, run_until, unique

MiB = 2**20
FP = Fingerprint(model="test/model", revision="abc123", dimension=384, normalized=True,
                 chunker="tokens:256")


class Disk:
    """The free space a sink is told its filesystem has."""

    def __init__(self) -> None:
        self.free_bytes = 10_000 * MiB
        self.asked = 0

    def __call__(self, path: Path) -> int:
        self.asked += 1
        return self.free_bytes


def docs_written(ids: range, dim: int = 384) -> list[DocumentWrite]:
    vectors = np.random.default_rng(ids.start).standard_normal((len(ids), dim))
    return [DocumentWrite(f"d{i}", DocState(1, i, False), [ChunkPoint(
        0, vectors[n].astype(np.float32),
        {"doc_id": f"d{i}", "chunk_index": 0, "text": f"Document {i}.", "version": 1})])
        for n, i in enumerate(ids)]


def stored(sink: Sink, n: int) -> set[str]:
    return {d for d, s in sink.document_states([f"d{i}" for i in range(n)]).items()
            if not s.deleted}


# -- the sink ---------------------------------------------------------------------------


def test_open_below_min_free_bytes_refuses_naming_the_setting_and_creates_nothing(
        tmp_path: Path) -> None:
    # The real free space of tmp_path, below an impossible minimum: no fake needed.
    sink = build_sink(SinkSettings(path=tmp_path / "store", min_free_bytes=2**62))
    with pytest.raises(StoreDiskFull) as refused:
        sink.open(FP)
    error = refused.value
    assert isinstance(error, SinkUnavailable)  # the consumer's backpressure takes it
    assert "sink.min_free_bytes" in str(error) and str(tmp_path / "store") in str(error)
    assert f"{error.free_bytes:,} bytes" in str(error) and error.free_bytes > 0
    assert not (tmp_path / "store").exists()


def test_writes_wait_while_free_space_is_low_and_resume_when_it_returns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embedstream.sinks")
    disk = Disk()
    sink = QdrantEdgeSink(tmp_path / "store", "docs", min_free_bytes=64 * MiB, free=disk)
    sink.open(FP)
    try:
        sink.apply(docs_written(range(0, 5)))
        sink.flush()

        disk.free_bytes = 10 * MiB
        attempts: list[Callable[[], None]] = [
            lambda: sink.apply(docs_written(range(5, 10))), sink.flush,
            lambda: sink.write_handover({("t", 0): 5})]
        for attempt in attempts:
            with pytest.raises(StoreDiskFull, match=r"10,485,760 bytes .* below "
                               r"sink\.min_free_bytes \(67,108,864 bytes"):
                attempt()
        assert stored(sink, 10) == {f"d{i}" for i in range(5)}  # nothing was written
        assert sink.read_handover() is None
        refusals = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(refusals) == 1, "one log line when writes start waiting, not one per try"
        assert "sink.min_free_bytes" in refusals[0].getMessage()

        disk.free_bytes = 65 * MiB
        sink.apply(docs_written(range(5, 10)))
        sink.flush()
        resumed = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert len(resumed) == 1 and "writing resumes" in resumed[0]
    finally:
        sink.close()
    again = QdrantEdgeSink(tmp_path / "store", "docs", min_free_bytes=64 * MiB, free=disk)
    again.open(FP)
    try:
        assert stored(again, 10) == {f"d{i}" for i in range(10)}
    finally:
        again.close()


def apparent_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def test_a_new_collection_reserves_megabytes_of_wal_and_takes_larger_writes(
        tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path / "store", "docs")
    sink.open(FP)
    try:
        shards = [d for d in (tmp_path / "store").iterdir() if (d / "wal").is_dir()]
        assert len(shards) == 2  # the chunks and their state companion
        # Edge's default: two 32 MiB WAL segments per shard, 128 MiB a collection.
        for shard in shards:
            assert apparent_bytes(shard / "wal") <= 2 * 4 * MiB + 4096, shard.name
        assert apparent_bytes(tmp_path / "store") < 200 * MiB
        # One write larger than a WAL segment (about 6 MiB of vectors and payload).
        sink.apply(docs_written(range(4000)))
    finally:
        sink.close()
    again = QdrantEdgeSink(tmp_path / "store", "docs")
    again.open(FP)
    try:
        assert len(stored(again, 4000)) == 4000
        assert len(list(again.points())) == 4000
    finally:
        again.close()


def test_a_creation_cut_short_after_writing_the_wal_options_is_adopted(
        tmp_path: Path) -> None:
    # A crash between writing a new shard's edge_config.json and loading it.
    leftover = tmp_path / "store" / "docs_v2"
    leftover.mkdir(parents=True)
    (leftover / "edge_config.json").write_text(json.dumps(
        {"wal_options": {"segment_capacity": 4 * MiB, "segment_queue_len": 0,
                         "retain_closed": 1}}))
    sink = QdrantEdgeSink(tmp_path / "store", "docs", physical="docs_v2")
    sink.open(FP)
    try:
        sink.apply(docs_written(range(3)))
        assert stored(sink, 3) == {"d0", "d1", "d2"}
    finally:
        sink.close()


# -- a real full disk (tmpfs in a private mount namespace) ------------------------------

_FULL_DISK_CHILD = textwrap.dedent('''
    """Fill the tmpfs under a store, write, restart on the full disk, free it, write."""
    import json, os, sys
    from pathlib import Path
    import numpy as np
    from embedstream.sinks import build_sink
    from embedstream.stream.config import SinkSettings
    from embedstream.stream.errors import SinkUnavailable
    from embedstream.stream.fingerprint import Fingerprint
    from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite

    disk = Path(sys.argv[1])
    fp = Fingerprint(model="m", revision="r", dimension=384, normalized=True, chunker="t:256")
    settings = SinkSettings(path=disk / "store")  # sink.min_free_bytes at its default
    rng = np.random.default_rng(0)

    def batch(b):
        return [DocumentWrite(f"d{b}_{i}", DocState(1, i, False), [ChunkPoint(
            0, rng.standard_normal(384).astype(np.float32),
            {"doc_id": f"d{b}_{i}", "chunk_index": 0, "text": "x" * 500, "version": 1})])
            for i in range(50)]

    def free():
        stat = os.statvfs(disk)
        return stat.f_bavail * stat.f_frsize

    out = {}
    sink = build_sink(settings)
    sink.open(fp)
    with open(disk / "filler", "wb") as filler:  # leave 1 MiB
        while (left := free() - 2**20) > 0:
            filler.write(bytes(min(left, 2**22)))
    out["free_when_full"] = free()
    batches = 0
    try:
        for b in range(400):  # several times the free space
            sink.apply(batch(b))
            batches += 1
    except SinkUnavailable as error:
        out["refused"] = str(error)
    out["written_when_full"] = batches
    sink.close()
    try:  # a restart on the still-full disk
        build_sink(settings).open(fp)
    except SinkUnavailable as error:
        out["restart_refused"] = str(error)
    os.unlink(disk / "filler")
    sink = build_sink(settings)
    sink.open(fp)
    for b in range(batches, batches + 3):
        sink.apply(batch(b))
    sink.close()
    sink = build_sink(settings)
    sink.open(fp)
    out["points"] = len(list(sink.points()))
    sink.close()
    print(json.dumps(out))
''')


def _private_tmpfs_works(directory: Path) -> bool:
    probe = subprocess.run(["unshare", "--mount", "sh", "-c",
                            'mount -t tmpfs -o size=1m tmpfs "$0"', str(directory)],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.timeout(180)
def test_a_full_disk_refuses_writes_and_restarts_instead_of_killing_the_process(
        tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("unshare") is None or not _private_tmpfs_works(disk):
        pytest.skip("needs unshare and mount (root) for a small private tmpfs")
    script = tmp_path / "child.py"
    script.write_text(_FULL_DISK_CHILD)
    # The tmpfs exists in the child's mount namespace only: nothing leaks if it dies.
    child = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         'mount -t tmpfs -o size=192m tmpfs "$0" && exec "$1" "$2" "$0"',
         str(disk), sys.executable, str(script)],
        capture_output=True, text=True, timeout=150)
    died = (f" (killed by {signal.Signals(-child.returncode).name})"
            if child.returncode < 0 else "")
    assert child.returncode == 0, (f"the store process exited {child.returncode}{died}:\n"
                                   f"{child.stdout[-2000:]}\n{child.stderr[-3000:]}")
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["free_when_full"] <= 2 * MiB
    assert out["written_when_full"] == 0
    assert "sink.min_free_bytes" in out["refused"] and "SIGBUS" in out["refused"]
    assert "sink.min_free_bytes" in out["restart_refused"]
    assert out["points"] == 3 * 50


# -- the consumer -------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return int(reply.status), reply.read().decode()
    except urllib.error.HTTPError as error:
        return int(error.code), error.read().decode()


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_consumer_pauses_on_a_nearly_full_disk_and_resumes_when_space_returns(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embedstream.sinks")
    topic, group = unique("disk"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=2)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": group, "options": {"session.timeout.ms": 6000}},
        source={"format": "native"}, embed={"model": str(tiny_model_dir), "max_wait_ms": 20},
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 200,
              "min_free_bytes": 64 * MiB},
        metrics={"enabled": False},
    )
    disk = Disk()
    sink = QdrantEdgeSink(settings.sink.path, "docs", min_free_bytes=64 * MiB, free=disk)
    pipeline = build_pipeline(settings, sink=sink)
    metrics, port = Metrics(), free_port()
    health = Health(60, ready_gauge=metrics.ready)
    server = serve_http(metrics, health, "127.0.0.1", port)
    stream = build_consumer(pipeline, metrics, health=health)

    def messages(ids: range) -> list[tuple[bytes, bytes]]:
        return [(f"d{i}".encode(), json.dumps({"id": f"d{i}", "text": f"Document {i}.",
                                                "version": 1}).encode()) for i in ids]

    try:
        produce(broker.bootstrap_servers, topic, messages(range(10)))
        run_until(stream, lambda: sum(stream.committed.values()) >= 10, 60, "the first docs")
        assert http_get(port, "/readyz")[0] == 200
        # The free space of the store's real filesystem, and the threshold, exported.
        assert (sample(metrics, "embedstream_store_free_bytes") or 0) > 0
        assert sample(metrics, "embedstream_store_min_free_bytes") == 64 * MiB

        disk.free_bytes = 10 * MiB
        produce(broker.bootstrap_servers, topic, messages(range(10, 30)))
        asked = disk.asked
        low_since: list[float] = []
        seen: list[tuple[int, str, float]] = []

        def low_for_five_seconds_then_freed() -> bool:
            if disk.free_bytes < 64 * MiB:
                assert sum(stream.committed.values()) == 10, "committed past refused writes"
                if disk.asked > asked + 1:  # the consumer has met the full disk
                    low_since[:1] = low_since[:1] or [time.monotonic()]
                    status, body = http_get(port, "/readyz")
                    seen.append((status, body,
                                 sample(metrics, "embedstream_paused_partitions") or 0))
                if low_since and time.monotonic() - low_since[0] > 5:
                    assert stored(stream.sink, 30) == {f"d{i}" for i in range(10)}
                    disk.free_bytes = 100 * MiB  # space freed
                return False
            return sum(stream.committed.values()) >= 30

        run_until(stream, low_for_five_seconds_then_freed, 90,
                  "a pause on the nearly full disk, then the recovery once space returned")
        assert seen, "the consumer never tried to write while the disk was full"
        assert all(status == 503 and "sink.min_free_bytes" in body for status, body, _ in seen)
        assert max(paused for _, _, paused in seen) >= 1
        assert http_get(port, "/readyz")[0] == 200
        assert sample(metrics, "embedstream_paused_partitions") == 0
        assert stored(stream.sink, 30) == {f"d{i}" for i in range(30)}
        logged = [(r.levelname, r.getMessage()) for r in caplog.records
                  if r.name == "embedstream.sinks"]
        assert [level for level, _ in logged] == ["ERROR", "INFO"], logged
    finally:
        stream.close()
        pipeline.close()
        server.close()


def test_a_store_short_of_space_at_the_start_is_waited_for_not_exited_on(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    """A restart onto a nearly full disk: the pipeline waits (the service reports
    not ready meanwhile) and opens once space returns, instead of exiting."""
    settings = Settings(source={"format": "native"}, embed={"model": str(tiny_model_dir)},
                        sink={"path": str(tmp_path / "store"), "collection": "docs",
                              "min_free_bytes": 64 * MiB},
                        metrics={"enabled": False})
    disk = Disk()
    disk.free_bytes = 10 * MiB
    sink = QdrantEdgeSink(settings.sink.path, "docs", min_free_bytes=64 * MiB, free=disk)
    told: list[SinkUnavailable] = []

    def wait(error: SinkUnavailable) -> bool:
        told.append(error)
        if len(told) == 3:
            disk.free_bytes = 10_000 * MiB  # space freed
        return True

    pipeline = build_pipeline(settings, sink=sink, wait=wait)
    try:
        assert len(told) == 3 and all(isinstance(e, StoreDiskFull) for e in told)
        assert "sink.min_free_bytes" in str(told[0])
        pipeline.sink.apply(docs_written(range(3), dim=pipeline.embedder.dimension))
        assert stored(pipeline.sink, 3) == {"d0", "d1", "d2"}
    finally:
        pipeline.close()

    gave_up = QdrantEdgeSink(settings.sink.path, "docs", min_free_bytes=64 * MiB, free=disk)
    disk.free_bytes = 10 * MiB
    with pytest.raises(StoreDiskFull):
        build_pipeline(settings, sink=gave_up, wait=lambda error: False)
