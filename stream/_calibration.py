"""What makes choosing the backend cheap, and once per machine and model.

:mod:`embedstream.stream.backend_choice` measures the candidate backends on real
texts; this module holds what it measures with and where it keeps the outcome:

* :func:`calibration_sample`: a spread of at most :data:`SAMPLE_TEXTS` texts and
  one batch of tokens (as the engine batches: a backend's fixed cost per forward
  shows only at the real size), so a pass takes about a second;
* :func:`time_limit`: stops a torch forward from inside once it has run too long,
  so a precision that has already lost (emulated bf16 on a CPU without it runs
  ten and more times slower than fp32) costs a few seconds, not minutes;
* :class:`PrecisionCache`: the decision kept per machine and model, so the next
  start of the stream, ``rebuild`` or ``plan`` does not measure again.

The cache is one JSON file: ``$EMBEDSTREAM_PRECISION_CACHE`` if set (``off``
disables it), else ``backend.json`` in the cache directory (:func:`cache_dir`:
``embed.cache_dir``, else ``$EMBEDSTREAM_CACHE_DIR``, else
``$XDG_CACHE_HOME/embedstream``, ``~/.cache`` without XDG_CACHE_HOME). An entry's
key is what the decision depends on (:func:`decision_key`): the CPU's model name
and flags (or the GPU's name), the device, the versions of torch, ONNX Runtime
and OpenVINO, the model's weights digest, what was asked for and the quality
guard; a change in any of them measures again.

Guaranteed: the file is replaced atomically (a reader sees the old or the new
one, never half); a file that cannot be read or parsed is ignored with a
warning (the next decision rewrites it); a cache that cannot be written is a
warning, never a failed start. Not guaranteed: entries written by two
processes at once both survive (the last writer wins; the loser measures again
next time); a decision still right after a change the key does not hold (a BIOS
setting, another process now sharing the cores): delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CACHE_DIR_ENV", "CACHE_ENV", "SAMPLE_TEXTS", "SAMPLE_TOKENS", "Decision",
           "PrecisionCache", "TooSlow", "cache_dir", "cache_path", "calibration_sample",
           "decision_key", "library_versions", "now_utc", "time_limit"]

log = logging.getLogger("embedstream.embed")

CACHE_ENV = "EMBEDSTREAM_PRECISION_CACHE"
CACHE_DIR_ENV = "EMBEDSTREAM_CACHE_DIR"
SAMPLE_TEXTS = 64
SAMPLE_TOKENS = 16384  # at most; a CPU batch is 4096
_VERSION = 2  # of the file's layout and of the measuring method


def cache_dir(configured: Path | None = None) -> Path:
    """Where exported models and decisions live (see the module docstring)."""
    if configured is not None:
        return configured
    if env := os.environ.get(CACHE_DIR_ENV, "").strip():
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "embedstream"


def cache_path(configured_dir: Path | None = None) -> Path | None:
    """The decisions file (see the module docstring); None when disabled."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return None if configured.strip().lower() in ("", "off", "none") else Path(configured)
    return cache_dir(configured_dir) / "backend.json"


def _cpu() -> tuple[str, str]:
    """The CPU's model name and its flags (Linux: /proc/cpuinfo; elsewhere what
    the platform module says, without flags)."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip()
        if name in ("model name", "flags", "Features") and name not in fields:
            fields[name] = " ".join(value.split())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return model, fields.get("flags") or fields.get("Features", "")


def library_versions() -> dict[str, str]:
    """Versions of the inference libraries installed (a new one may change the choice)."""
    from importlib import metadata

    versions = {}
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def decision_key(*, device: str, model_digest: str, asked: str, guard: str,
                 gpu_name: str | None = None) -> dict[str, str]:
    """What a backend decision depends on (see the module docstring)."""
    cpu, flags = _cpu()
    return {"cpu": cpu, "cpu_flags": flags, "gpu": gpu_name or "", "device": device,
            **library_versions(), "model": model_digest, "asked": asked, "guard": guard,
            "method": str(_VERSION)}


@dataclass(frozen=True, slots=True)
class Decision:
    """A precision chosen on this machine, and the figures it was chosen on."""

    precision: str
    figures: dict[str, float]
    decided_at: str  # UTC, ISO 8601
    backend: str = "torch"
    variant: str = ""


class PrecisionCache:
    """The decisions in one JSON file (``path`` None: remembers nothing)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @staticmethod
    def _id(key: Mapping[str, str]) -> str:
        return hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:32]

    def _entries(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            log.warning("precision cache %s is unreadable (%s): ignoring it (the next "
                        "calibration rewrites it)", self.path, error)
            return {}
        entries = data.get("entries") if isinstance(data, dict) else None
        if not isinstance(entries, dict) or data.get("version") != _VERSION:
            log.warning("precision cache %s is not one this version writes: ignoring it "
                        "(the next calibration rewrites it)", self.path)
            return {}
        return entries

    def get(self, key: Mapping[str, str]) -> Decision | None:
        """The decision made under ``key``, if one is kept and well-formed."""
        entry: Any = self._entries().get(self._id(key))
        if not isinstance(entry, dict):
            return None
        try:
            if entry["key"] != dict(key):  # a hash collision, or an entry edited by hand
                return None
            figures = {str(k): float(v) for k, v in entry["figures"].items()}
            return Decision(str(entry["precision"]), figures, str(entry["decided_at"]),
                            str(entry.get("backend", "torch")), str(entry.get("variant", "")))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def put(self, key: Mapping[str, str], decision: Decision) -> None:
        """Keep ``decision`` under ``key`` (a warning, not an error, when it cannot)."""
        if self.path is None:
            return
        entries = self._entries()
        entries[self._id(key)] = {"key": dict(key), "precision": decision.precision,
                                  "backend": decision.backend, "variant": decision.variant,
                                  "figures": decision.figures,
                                  "decided_at": decision.decided_at}
        text = json.dumps({"version": _VERSION, "entries": entries}, indent=1, sort_keys=True)
        temporary: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=self.path.parent,
                                             prefix=f".{self.path.name}.", delete=False) as out:
                temporary = out.name
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except OSError as error:
            log.warning("cannot keep the precision decision in %s (%s): the next run "
                        "measures again (set %s to a writable file, or off)",
                        self.path, error, CACHE_ENV)
            if temporary is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)


def now_utc() -> str:
    """The time now, UTC, ISO 8601 (when a decision was made)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def calibration_sample(sample: Sequence[list[int]], texts: int = SAMPLE_TEXTS,
                       tokens: int = SAMPLE_TOKENS) -> list[list[int]]:
    """A spread of ``sample`` (every n-th text) of at most ``texts`` texts and
    ``tokens`` tokens (at least one text)."""
    spread = list(sample[::max(1, len(sample) // texts)])[:texts]
    chosen: list[list[int]] = []
    total = 0
    for ids in spread:
        if chosen and total + len(ids) > tokens:
            continue  # a shorter one further on may still fit
        chosen.append(ids)
        total += len(ids)
    return chosen


class TooSlow(Exception):
    """A forward ran past its :func:`time_limit`."""


@contextlib.contextmanager
def time_limit(module: Any, seconds: float) -> Iterator[None]:
    """Within the block, raise :class:`TooSlow` from inside ``module``'s forward
    (a ``torch.nn.Module``) once ``seconds`` have passed, checked as each of its
    submodules starts: within one layer's time of the limit."""
    deadline = time.perf_counter() + seconds

    def check(*_: Any) -> None:
        if time.perf_counter() > deadline:
            raise TooSlow

    handles = [sub.register_forward_pre_hook(check) for sub in module.modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
