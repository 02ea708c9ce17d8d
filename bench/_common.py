"""What the benchmarks share: progress lines, the shared data, the machine, the broker.

The scripts import it as ``from _common import ...`` (a script's own folder is on
``sys.path`` when it runs as ``python bench/NAME.py``); the package itself is
installed (``make setup``), so nothing here touches ``sys.path``.

* :func:`log`: a progress line on stderr (stdout is for the one JSON line, printed last);
* the shared data beside the checkout (``../shared/data``) and :func:`read_passages`;
* :func:`machine`: what ran the benchmark (CPU model, its vector flags as ``cpu_flags``,
  the threads, torch's CPU backend, the GPU), carried by every benchmark's JSON line as
  ``"machine"``; :func:`encoder_info`: the backend and precision an encoder runs on, which
  every benchmark that embeds adds to its line;
* :class:`OtherLoad`: the CPU other processes used meanwhile (the machine is shared);
* :func:`free_port` (the application's), :func:`local_broker` (the bundled Tansu broker
  with the benchmark's topics), :func:`stream_settings` (a Debezium stream into a Qdrant
  Edge store) and :func:`consume_process` (``embedstream consume`` as a subprocess);
* :func:`stock_model`: the reference, stock sentence-transformers all-MiniLM-L6-v2.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO, Any

from confluent_kafka.admin import AdminClient

from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.config import (
    ChunkSettings,
    EmbedSettings,
    KafkaSettings,
    MetricsSettings,
    RetrievalSettings,
    Settings,
    SinkSettings,
    SourceSettings,
)
from embedstream.stream.dead_letters import ensure_topics
from embedstream.stream.embedding import resolve_model_path

__all__ = [
    "MODEL", "MSMARCO", "PASSAGES", "REPO", "SHARED_DATA", "OtherLoad", "consume_process",
    "cpu_flags", "encoder_info", "free_port", "local_broker", "log", "machine",
    "read_passages", "stock_model", "stream_settings",
]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # beside the checkout, not in it
MSMARCO = SHARED_DATA / "msmarco-sample"
PASSAGES = MSMARCO / "passages.tsv"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# The CPU flags that decide which backend and precision pay (x86: fp32 width, int8 dot
# products, bf16; then Arm's), reported in this order when present.
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
          "amx_tile", "asimd", "sve", "sve2", "bf16", "i8mm")


def log(message: str) -> None:
    """A progress line on stderr, stamped with the script's name and the time."""
    script = Path(sys.argv[0]).stem.replace("_", "-") or "bench"
    print(f"[{script} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def read_passages(path: Path = PASSAGES, limit: int | None = None) -> list[str]:
    """The texts of an ``id<TAB>text`` file (blank ones left out), the first ``limit``."""
    rows = (line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines())
    texts = [row[1] for row in rows if len(row) == 2 and row[1].strip()]
    return texts[:limit] if limit else texts


@cache
def _cpu() -> tuple[str, set[str]]:
    """The CPU's model name and flags (the first CPU's, from /proc/cpuinfo)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_flags() -> str:
    """The flags of :data:`_FLAGS` this CPU has, comma-separated (``""``: none of them)."""
    flags = _cpu()[1]
    return ",".join(f for f in _FLAGS if f in flags)


@cache
def machine() -> dict[str, Any]:
    """What ran the benchmark: the CPU (model, ``cpu_flags``, the cores this process may
    use, which is also the thread count ONNX Runtime and OpenVINO are given), torch
    (version, CPU backend, ``threads``) and the GPU if any. A script that embeds adds
    :func:`encoder_info` beside this."""
    import torch

    return {
        "cpu": _cpu()[0],
        "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def encoder_info(encoder: Any) -> dict[str, Any]:
    """What an embedder runs on: ``backend``, ``precision``, ``variant`` (the int8 recipe),
    ``device``, the ``threads`` its backend uses, ``decided`` (``fixed``: asked for,
    ``cached``: kept from an earlier run, ``calibrated``: measured in this run,
    ``undecided``: still on torch fp32 before calibrating), ``effective_precision``
    (OpenVINO's, after its hint) and ``cpu_flags``. Takes a
    :class:`~embedstream.stream.local_encoder.LocalEncoder` or anything in its place (a
    remote embedder reports ``remote``)."""
    import torch

    from embedstream.stream.backends import cpu_threads

    backend = str(getattr(encoder, "backend", "remote"))
    calibration = getattr(encoder, "calibration", {}) or {}
    if not getattr(encoder, "decided", True):
        decided = "undecided"
    elif calibration.get("cached"):
        decided = "cached"
    elif calibration:
        decided = "calibrated"
    else:
        decided = "fixed"
    info: dict[str, Any] = {
        "backend": backend,
        "precision": str(getattr(encoder, "precision", "remote")),
        "variant": str(getattr(encoder, "variant", "")),
        "device": str(getattr(encoder, "device", "remote")),
        "threads": torch.get_num_threads() if backend == "torch"
        else cpu_threads() if backend in ("onnx", "openvino") else None,
        "decided": decided,
        "cpu_flags": cpu_flags(),
    }
    effective = getattr(getattr(encoder, "runner", None), "effective_precision", None)
    if effective is not None:  # OpenVINO's Type prints as "<Type: 'bfloat16'>"
        info["effective_precision"] = str(effective).removeprefix("<Type: '").rstrip("'>")
    return info


class OtherLoad:
    """Mean CPU cores used by other processes since creation: /proc/stat less
    this process and the children it has waited for (a consumer subprocess)."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float | None, float, float]:
        try:
            with open("/proc/stat") as stat:
                v = [int(x) for x in stat.readline().split()[1:9]]
            busy: float | None = sum(v[i] for i in (0, 1, 2, 5, 6, 7)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = None
        t = os.times()
        return busy, t.user + t.system + t.children_user + t.children_system, time.monotonic()

    def cores(self) -> float | None:
        (busy0, own0, t0), (busy, own, t) = self._start, self._sample()
        if busy is None or busy0 is None:
            return None
        return round(max(0.0, busy - busy0 - (own - own0)) / (t - t0), 2)


@contextmanager
def local_broker(topics: Iterable[str], *, partitions: int = 1,
                 log_file: Path | None = None) -> Iterator[LocalBroker]:
    """The bundled Tansu broker on a free loopback port with ``topics`` created
    (``partitions`` each); stopped on exit, also on failure."""
    with LocalBroker(log_file=log_file) as broker:
        ensure_topics(AdminClient({"bootstrap.servers": broker.bootstrap_servers}), topics,
                      partitions=partitions)
        log(f"broker on {broker.bootstrap_servers}")
        yield broker


def stream_settings(bootstrap: str, topic: str, store: Path, *, group: str, collection: str,
                    chunk: ChunkSettings | None = None, embed: EmbedSettings | None = None,
                    retrieval: RetrievalSettings | None = None, **sink: Any) -> Settings:
    """A consumer of Debezium events (``id`` the key field, ``text`` the text) on one topic,
    writing to a Qdrant Edge store at ``store``; no metrics endpoint. ``embed``: the
    model side (default: the defaults, backend and precision ``auto``)."""
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap, topics=(topic,), group_id=group,
                            options={"session.timeout.ms": 6000}),
        source=SourceSettings(format="debezium", id_fields=("id",), text_fields=("text",)),
        chunk=chunk or ChunkSettings(),
        embed=embed or EmbedSettings(),
        retrieval=retrieval or RetrievalSettings(),
        sink=SinkSettings(kind="qdrant-edge", path=store, collection=collection, **sink),
        metrics=MetricsSettings(enabled=False),
    )


def consume_process(config: Path, output: IO[bytes]) -> subprocess.Popen[bytes]:
    """``embedstream consume --config FILE`` with this interpreter, output to ``output``.
    Only the file configures it (``EMBEDSTREAM_*`` variables would override it), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSTREAM_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "consume", "--config", str(config)],
        cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=env,
    )


def stock_model(device: str = "cpu") -> Any:
    """The reference: stock ``SentenceTransformer`` all-MiniLM-L6-v2 (the bundled copy)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(MODEL), device=device)
