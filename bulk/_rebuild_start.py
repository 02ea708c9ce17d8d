"""What :mod:`embedstream.bulk.rebuild` settles before it embeds: what it rebuilds,
where it resumes from, and what it reads.

* :func:`alias_to_rebuild`: the alias, checked by the one name rule;
* :func:`state_dir`: where checkpoints and scratch files live;
* :func:`checkpoint_identity` and :func:`files_signature`: what a checkpoint keeps
  so that a resume under another model, other source settings, other topics or
  changed files starts over instead of mixing two corpora;
* :func:`already_done`: whether an interrupted run had already swapped the alias;
* :func:`topic_ends`: the covered offsets, where the handover starts;
* :func:`open_records`: the records to embed, from files or a Kafka snapshot,
  after what the checkpoint says is already written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedstream.bulk._run import RebuildRun, Record
from embedstream.bulk.catch_up import handover_ends
from embedstream.bulk.checkpoint import Checkpoint
from embedstream.bulk.kafka_source import KafkaSnapshot, Partition
from embedstream.bulk.sources import expand_files, read_rows
from embedstream.stream.config import Settings
from embedstream.stream.errors import ConfigError, KafkaUnavailable
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.names import name_error
from embedstream.stream.store import SinkAdmin

if TYPE_CHECKING:
    from embedstream.bulk.rebuild import RebuildOptions

__all__ = ["alias_to_rebuild", "already_done", "checkpoint_identity", "files_signature",
           "open_records", "state_dir", "topic_ends"]


def alias_to_rebuild(settings: Settings, options: RebuildOptions) -> str:
    """The alias to rebuild, once the one name rule lets it name the
    checkpoint, the failure list and the new collection (``--collection``
    comes from a command line or a Helm value: it may hold a path)."""
    alias = options.collection or settings.sink.collection
    problem = name_error(alias, "--collection" if options.collection else "sink.collection",
                         alias=True)
    if problem:
        raise ConfigError(problem)
    return alias


def state_dir(settings: Settings) -> Path:
    """Where the rebuild keeps its checkpoints and scratch files."""
    return settings.bulk.state_dir or settings.sink.path / ".rebuild"


def checkpoint_identity(settings: Settings, fingerprint: Fingerprint) -> str:
    """What decides the vectors and what is read: a resume under other source
    settings or topics would mix two corpora, so the checkpoint keeps this."""
    return " ".join((fingerprint.to_json(), settings.source.model_dump_json(),
                     ",".join(settings.kafka.topics)))


def files_signature(source: str) -> list[list[Any]]:
    if source == "kafka":
        return []
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in expand_files(source)]


def already_done(admin: SinkAdmin, alias: str, checkpoint: Checkpoint,
                 taken: set[str]) -> bool:
    """True when an interrupted run of this rebuild had already moved the alias;
    raises when its partial collection is gone (a resume would skip what it held)."""
    resuming = checkpoint.done > 0 or checkpoint.embedded
    if resuming and checkpoint.target not in taken:
        raise ConfigError(
            f"the interrupted rebuild of {alias!r} wrote into {checkpoint.target!r}, which "
            "no longer exists; pass --restart to rebuild from the start")
    return resuming and admin.resolve(alias) == checkpoint.target


def topic_ends(settings: Settings) -> dict[Partition, int]:
    """Where the handover starts: the ends served now, checked against the live group.
    No partition at all is refused: the handover would silently be skipped, and the
    events a live stream applies meanwhile would be missing from the new collection."""
    try:
        ends = handover_ends(settings)
    except KafkaUnavailable as error:
        raise KafkaUnavailable(
            f"{error}. The handover needs the topics' ends; without a live stream to hand "
            "over to, pass --no-handover") from None
    if not ends:
        raise ConfigError(
            f"no partition of {list(settings.kafka.topics) or settings.kafka.topic_pattern!r} "
            "to hand over from (kafka.topics, or the route's topics): without a live stream "
            "to hand over to, pass --no-handover")
    return ends


def open_records(settings: Settings, options: RebuildOptions, checkpoint: Checkpoint,
                 run: RebuildRun) -> tuple[Iterator[Record], KafkaSnapshot | None]:
    if options.source == "kafka":
        snapshot = KafkaSnapshot(settings, start=checkpoint.offsets,
                                 covered=checkpoint.covered or None,
                                 on_folded=run.expect, scratch=state_dir(settings))
        snapshot.open()
        checkpoint.covered = dict(snapshot.covered)
        return snapshot.items(), snapshot
    return read_rows(options.source, settings, skip=checkpoint.done), None
