"""Checkpoints of a rebuild: how far it got, so a killed run resumes instead of restarting.

One JSON file per rebuild target (``<state dir>/<alias>.json``), replaced
atomically (temporary file, fsync, rename, directory fsync), so a reader finds
the previous checkpoint or the new one, never a torn one. A checkpoint is only
saved after the writes it counts are durable (the rebuild flushes first).

A checkpoint belongs to one rebuild: the same source (and, for files, the same
paths, sizes and modification times), fingerprint and output. A rebuild that
finds one of another rebuild refuses to start rather than mixing the two;
``restart`` discards it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedstream.stream.errors import ConfigError
from embedstream.stream.names import name_error

__all__ = ["Checkpoint", "CheckpointStore"]

Partition = tuple[str, int]
_FORMAT = 1


@dataclass(slots=True)
class Checkpoint:
    name: str
    source: str
    files: list[list[Any]]
    fingerprint: str
    output: str | None
    target: str | None
    done: int = 0                                        # source records written
    offsets: dict[Partition, int] = field(default_factory=dict)  # kafka: next offset read
    covered: dict[Partition, int] = field(default_factory=dict)  # handover start offsets
    writer: dict[str, Any] | None = None                 # the vector file writer's token
    embedded: bool = False                               # the bulk pass is complete

    def to_json(self) -> str:
        return json.dumps({
            "format": _FORMAT, "name": self.name, "source": self.source, "files": self.files,
            "fingerprint": self.fingerprint, "output": self.output, "target": self.target,
            "done": self.done, "writer": self.writer, "embedded": self.embedded,
            "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
            "covered": [[t, p, o] for (t, p), o in sorted(self.covered.items())],
        })

    @classmethod
    def from_json(cls, raw: str) -> Checkpoint:
        """Raises ValueError (or KeyError, TypeError) for anything but a
        checkpoint this version wrote; its names pass the one name rule, as
        they become file names and collection names."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, not {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise ValueError(f"checkpoint format {data.get('format')!r}")
        problem = name_error(data["name"], "name", alias=True) or (
            data["target"] is not None and name_error(data["target"], "target"))
        if problem:
            raise ValueError(problem)
        return cls(
            name=data["name"], source=data["source"], files=data["files"],
            fingerprint=data["fingerprint"], output=data["output"], target=data["target"],
            done=int(data["done"]), writer=data["writer"], embedded=bool(data["embedded"]),
            offsets={(t, int(p)): int(o) for t, p, o in data["offsets"]},
            covered={(t, int(p)): int(o) for t, p, o in data["covered"]},
        )


class CheckpointStore:
    """The checkpoint files of one state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, name: str) -> Path:
        return self.directory / f"{_checked(name)}.json"

    def failures_path(self, name: str) -> Path:
        return self.directory / f"{_checked(name)}.failures.jsonl"

    def load_or_new(self, name: str, *, restart: bool, source: str, files: list[list[Any]],
                    fingerprint: str, output: str | None, target: str | None) -> Checkpoint:
        """The interrupted rebuild of ``name`` to resume, or a fresh checkpoint."""
        path = self.path(name)
        self.directory.mkdir(parents=True, exist_ok=True)
        if path.exists() and not restart:
            try:
                found = Checkpoint.from_json(path.read_text(encoding="utf-8"))
                if found.name != name:
                    raise ValueError(f"it names {found.name!r}")
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise ConfigError(f"rebuild checkpoint {path} is unreadable ({error}); "
                                  "pass --restart to discard it") from None
            mismatch = [what for what, ours, theirs in (
                ("source", source, found.source), ("files", files, found.files),
                ("fingerprint", fingerprint, found.fingerprint),
                ("output", output, found.output)) if ours != theirs]
            if mismatch:
                raise ConfigError(
                    f"an interrupted rebuild of {name!r} with another {', '.join(mismatch)} "
                    f"left {path}; rerun it as it was to resume, or pass --restart to discard "
                    f"it (its partial collection {found.target!r} stays until dropped)")
            return found
        self.failures_path(name).unlink(missing_ok=True)
        fresh = Checkpoint(name, source, files, fingerprint, output, target)
        self.save(fresh)
        return fresh

    def save(self, checkpoint: Checkpoint) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(checkpoint.name)
        temporary = path.with_suffix(".json.tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(checkpoint.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def remove(self, name: str) -> None:
        """Forget a finished rebuild (its failure list stays for the user)."""
        self.path(name).unlink(missing_ok=True)


def _checked(name: str) -> str:
    """``name``, once the one name rule lets it become a file name here (a
    name with a path in it would read and replace files elsewhere)."""
    problem = name_error(name, "rebuild checkpoint name", alias=True)
    if problem:
        raise ConfigError(problem)
    return name
