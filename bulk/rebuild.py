"""``embedstream rebuild``: re-embed a whole corpus into a fresh collection, then hand over.

Steps, each surviving a kill (a rerun resumes from the last checkpoint):

1. **Open the target**: a fresh physical collection ``<alias>_<UTC timestamp>``
   under the current fingerprint (so a model or chunking change is exactly a
   rebuild into a new collection), or vector files (``--output``).
2. **Record the covered offsets**: where each partition ends when the rebuild
   starts, as the broker serves it (:func:`~embedstream.bulk.catch_up.handover_ends`:
   read to the end, never a ListOffsets answer alone; with a handover, checked
   against the live group's committed offsets first). For ``--source kafka``
   the snapshot reads up to them; for files they are where the stream takes over
   (the files are taken to reflect the corpus as of then, which includes
   everything the live group has committed).
3. **Embed** with the bulk engine (:mod:`embedstream.bulk.engine`, or Ray Data), writing in
   source order. A Kafka snapshot folds each document's events first (the
   stream's version guard) and yields only the winner for embedding. Every
   ``bulk.checkpoint_interval_s`` the store is flushed and a checkpoint records
   how far the source is written, so a resumed run skips exactly that: only what
   was written after the last checkpoint is embedded again.
4. **Catch up** (:mod:`embedstream.bulk.catch_up`): apply what arrived after the covered
   offsets, store the offsets reached as the collection's handover record.
5. **Swap**: point the alias at the new collection in one atomic step. The live
   consumer follows the alias and moves each partition to the handover offset,
   so no event is lost or applied twice. The old collection stays until
   ``embedstream collections drop``.

Rows that give no document (undecodable, too large, chunker failure) go to a
failure list (``<state dir>/<name>.failures.jsonl``); they never stop the
rebuild. Of several file rows with one document id, the last one read wins; of
a Kafka snapshot's events, the version guard's winner. Each record read
(``records``) counts once in the report: ``documents`` (written with text),
``deleted`` (a deletion won: its state is kept, so no older event brings the
document back), ``superseded`` (never embedded), ``failures`` (the catch-up's
too) or ``skipped`` (schema changes, heartbeats; after a resume, writes the store
already holds newer).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from embedstream.bulk._rebuild_start import (
    alias_to_rebuild,
    already_done,
    checkpoint_identity,
    files_signature,
    open_records,
    state_dir,
    topic_ends,
)
from embedstream.bulk._run import Prepared, RebuildRun, Record
from embedstream.bulk.catch_up import catch_up
from embedstream.bulk.checkpoint import Checkpoint, CheckpointStore
from embedstream.bulk.encoder import AnyEncoder, RemoteEncoder
from embedstream.bulk.engine import BulkEngine, EngineStats
from embedstream.bulk.kafka_source import KafkaSnapshot, Partition
from embedstream.bulk.outputs import VectorFileWriter
from embedstream.bulk.progress import Progress
from embedstream.bulk.sources import count_rows
from embedstream.sinks.factory import build_admin, build_sink
from embedstream.stream.chunking import TokenChunker
from embedstream.stream.config import Settings
from embedstream.stream.embedding import chunk_max_tokens
from embedstream.stream.errors import ConfigError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.health import Health, serve_metrics
from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.metrics import Metrics
from embedstream.stream.remote_embedding import OpenAIEmbedder
from embedstream.stream.sparse import build_sparse_encoder, sparse_spec
from embedstream.stream.store import Sink, SinkAdmin

__all__ = ["RebuildOptions", "RebuildReport", "rebuild"]

log = logging.getLogger("embedstream.bulk")


@dataclass(frozen=True, slots=True)
class RebuildOptions:
    source: str                      # a path or glob of files, or "kafka"
    collection: str | None = None    # the alias; default sink.collection
    output: Path | None = None       # vector files instead of a store
    engine: str = "local"            # "local" or "ray"
    restart: bool = False            # discard an interrupted run instead of resuming it
    swap: bool = True                # move the alias when done
    handover: bool = True            # record offsets and catch up (needs Kafka)


@dataclass(slots=True)
class RebuildReport:
    target: str
    alias: str | None
    records: int = 0      # every record read (file rows, or Kafka messages)
    documents: int = 0    # documents written with their text
    deleted: int = 0      # documents written as deleted (a Kafka snapshot's deletions)
    superseded: int = 0   # Kafka events not their document's winner: read, never embedded
    chunks: int = 0
    failures: int = 0
    skipped: int = 0
    tokens: int = 0
    padding_fraction: float = 0.0
    elapsed_s: float = 0.0
    resumed_from: int = 0
    precision: str = ""
    backend: str = ""
    covered: dict[str, int] = field(default_factory=dict)
    handover: dict[str, int] = field(default_factory=dict)
    previous: str | None = None
    failures_file: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _tp_key(tp: Partition) -> str:
    return f"{tp[0]}[{tp[1]}]"


def fresh_name(alias: str, taken: Collection[str] = (), now: datetime | None = None) -> str:
    """``<alias>_<UTC timestamp>``, with ``_2``, ``_3``... if that is taken."""
    base = f"{alias}_{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def build_encoders(settings: Settings, metrics: Metrics | None = None) -> list[AnyEncoder]:
    """One encoder per GPU when there are several and ``embed.device`` is auto; the
    remote API (one client, its own concurrency) with ``embed.provider: openai``."""
    import torch

    bulk, embed = settings.bulk, settings.embed
    if embed.provider == "openai":
        return [RemoteEncoder(OpenAIEmbedder(embed, metrics=metrics))]
    devices = [embed.device]
    if embed.device == "auto" and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    on_choice = metrics.embed_backend_chosen if metrics is not None else None
    return [LocalEncoder.from_settings(embed, device=d, batch_tokens=bulk.batch_tokens,
                                       on_choice=on_choice)
            for d in devices]


def rebuild(settings: Settings, options: RebuildOptions, *,
            encoders: Sequence[AnyEncoder] | None = None,
            sink_factory: Callable[[str], Sink] | None = None,
            admin: SinkAdmin | None = None,
            progress_stream: TextIO | None = None,
            metrics: Metrics | None = None) -> RebuildReport:
    """Run a rebuild (see the module docstring) and return its report.

    ``encoders``, ``sink_factory`` (physical name -> unopened sink) and ``admin``
    replace the ones built from ``settings`` (tests share one in-memory store).

    Progress goes to the ``embedstream_rebuild_*`` metrics, updated after every
    written unit. Without ``metrics``, they are built here and, when
    ``settings.metrics.enabled``, served on ``metrics.host:metrics.port`` (``/metrics``;
    ``/healthz`` says only that the process is up, ``/readyz`` that the rebuild has
    started) from a daemon thread that lives as long as the process, so a Job can be
    scraped. A port that cannot be bound is logged and the rebuild goes on. A caller
    passing ``metrics`` serves them itself, if at all."""
    alias_to_rebuild(settings, options)  # before anything is served, loaded or built from it
    if metrics is None:
        metrics = Metrics()
        health = _serve(settings, metrics)
    else:
        health = None
    if options.engine == "ray" and settings.embed.provider != "local":
        raise ConfigError("--engine ray runs local models; with embed.provider "
                          f"{settings.embed.provider!r} use --engine local (the API is the limit)")
    if encoders:
        return _rebuild(settings, options, list(encoders), sink_factory, admin,
                        progress_stream, metrics, health)
    built = build_encoders(settings, metrics)
    try:
        return _rebuild(settings, options, built, sink_factory, admin, progress_stream,
                        metrics, health)
    finally:
        for encoder in built:
            encoder.close()


def _rebuild(settings: Settings, options: RebuildOptions, encoders: list[AnyEncoder],
             sink_factory: Callable[[str], Sink] | None, admin: SinkAdmin | None,
             progress_stream: TextIO | None, metrics: Metrics,
             health: Health | None) -> RebuildReport:
    alias = alias_to_rebuild(settings, options)
    to_files = options.output is not None
    encoder = encoders[0]
    chunk_spec = TokenChunker(encoder.tokenizer, max_tokens=chunk_max_tokens(
        settings.chunk.max_tokens, encoder)).spec
    fingerprint = Fingerprint(model=settings.embed.model, revision=encoder.revision,
                              dimension=encoder.dimension, normalized=True, chunker=chunk_spec,
                              provider=settings.embed.provider,
                              prompt=encoder.document_prompt,
                              sparse=sparse_spec(settings.retrieval))
    name = (f"output-{hashlib.sha256(str(options.output).encode()).hexdigest()[:12]}"
            if to_files else alias)
    owned_admin = admin is None and not to_files
    admin = admin or (None if to_files else build_admin(settings.sink))
    try:
        taken = {c.name for c in admin.collections()} if admin is not None else set()
        checkpoints = CheckpointStore(state_dir(settings))
        checkpoint = checkpoints.load_or_new(
            name, restart=options.restart, source=options.source,
            files=files_signature(options.source),
            fingerprint=checkpoint_identity(settings, fingerprint),
            output=str(options.output) if to_files else None,
            target=None if to_files else fresh_name(alias, taken))
        report = RebuildReport(
            target=str(options.output) if to_files else str(checkpoint.target),
            alias=None if to_files else alias, resumed_from=checkpoint.done)
        if admin is not None and already_done(admin, alias, checkpoint, taken):
            checkpoints.remove(checkpoint.name)  # killed after the swap: nothing left to do
            log.info("the interrupted rebuild had already moved %s to %s; done", alias,
                     checkpoint.target)
            return report
        if options.handover and not to_files and not checkpoint.covered:
            checkpoint.covered = topic_ends(settings)
            checkpoints.save(checkpoint)  # before anything is read: a resume keeps these
        if health is not None:
            health.started()
        return _run_rebuild(settings, options, alias, encoders, fingerprint, admin,
                            checkpoints, checkpoint, report, sink_factory, progress_stream,
                            metrics)
    finally:
        if admin is not None and owned_admin:
            admin.close()


def _serve(settings: Settings, metrics: Metrics) -> Health | None:
    """Serve ``metrics`` when ``settings.metrics.enabled``; None when not served."""
    if not settings.metrics.enabled:
        return None
    # A rebuild has no loop to watch: liveness is the process serving at all.
    health = Health(float("inf"), ready_gauge=metrics.ready)
    try:
        serve_metrics(metrics, health, settings.metrics)
    except ConfigError as error:
        # Progress metrics are a convenience here; a port taken (e.g. by a consumer on
        # the same host) must not stop a rebuild that may have hours of work to resume.
        log.warning("not serving rebuild metrics: %s", error)
        return None
    log.info("serving rebuild metrics on %s:%d/metrics", settings.metrics.host,
             settings.metrics.port)
    return health


def _run_rebuild(settings: Settings, options: RebuildOptions, alias: str,
                 encoders: list[AnyEncoder], fingerprint: Fingerprint,
                 admin: SinkAdmin | None, checkpoints: CheckpointStore,
                 checkpoint: Checkpoint, report: RebuildReport,
                 sink_factory: Callable[[str], Sink] | None,
                 progress_stream: TextIO | None, metrics: Metrics) -> RebuildReport:
    to_files = options.output is not None
    encoder = encoders[0]
    resumed_from = checkpoint.done
    if resumed_from:
        log.info("resuming rebuild %s after %d records", checkpoint.name, resumed_from)
    sink: Sink | None = None
    writer: VectorFileWriter | None = None
    if to_files:
        assert options.output is not None
        writer = VectorFileWriter(options.output, encoder.dimension,
                                  resume=checkpoint.writer if resumed_from else None,
                                  sparse=settings.retrieval.sparse != "none")
    else:
        sink = (sink_factory or (lambda n: build_sink(
            settings.sink, physical=n, filter_fields=settings.source.filter_fields)))(
            str(checkpoint.target))
        sink.open(fingerprint)
    total = None if options.source == "kafka" else count_rows(options.source, settings)
    progress = Progress(total, interval_s=settings.bulk.progress_interval_s,
                        stream=progress_stream, start=resumed_from)
    sparse = build_sparse_encoder(settings.retrieval, settings.embed.device)
    run = RebuildRun(settings, encoder, checkpoints, checkpoint, report, sink, writer,
                     progress, metrics=metrics, total=total, sparse=sparse)
    snapshot: KafkaSnapshot | None = None
    try:
        if not checkpoint.embedded:
            records, snapshot = open_records(settings, options, checkpoint, run)
            checkpoints.save(checkpoint)  # the snapshot's marks, before anything is written
            engine = _engine(settings, options, encoders)
            run.engine = engine
            try:
                stats = engine.run(records, run.prepare, run.write)
            finally:
                if hasattr(engine, "close"):  # Ray: shut down a local instance it started
                    engine.close()
            _fill_stats(report, stats)
            checkpoint.embedded = True
            run.save()
        progress.close()
        report.covered = {_tp_key(tp): o for tp, o in sorted(checkpoint.covered.items())}
        report.precision = encoder.precision
        report.backend = encoder.backend
        if sink is not None:
            # Nobody reads the new collection yet: index all of it now, however long it
            # takes, so it is fast from its first query after the swap.
            started = time.perf_counter()
            sink.maintain()
            log.info("indexed the new collection in %.1f s", time.perf_counter() - started)
        if sink is not None and options.handover and checkpoint.covered:
            caught = catch_up(settings, sink, run.chunker(), encoder, checkpoint.covered,
                              sparse=sparse, on_failure=lambda p, r, d: run.failure(
                                  f"{p.topic}[{p.partition}]@{p.offset}", r, d))
            report.failures += caught.failed
            sink.flush()  # the catch-up's writes are durable before the record that counts them
            sink.write_handover(caught.reached)
            report.handover = {_tp_key(tp): o for tp, o in sorted(caught.reached.items())}
        run.publish(embedded=True)  # the catch-up's failures; the final padding
        if sink is not None:
            sink.flush()
            sink.close()
            sink = None
            if options.swap:
                assert admin is not None
                report.previous = admin.switch(alias, str(checkpoint.target))
                log.info("alias %s now points at %s (was %s)", alias, checkpoint.target,
                         report.previous)
        if writer is not None:
            writer.close()
            writer = None
        checkpoints.remove(checkpoint.name)
    finally:
        run.close()
        if snapshot is not None:
            snapshot.close()
        if sink is not None:
            sink.close()
        if writer is not None:
            writer.abort()
    return report


def _engine(settings: Settings, options: RebuildOptions,
            encoders: list[AnyEncoder]) -> Any:
    bulk = settings.bulk
    if options.engine == "ray":
        from embedstream.bulk.ray_engine import RayEngine

        embed = settings.embed
        guard = (embed.quality_guard.mean_cosine, embed.quality_guard.p01_cosine)
        return RayEngine(embed.model, device=embed.device, backend=embed.backend,
                         precision=embed.precision, batch_tokens=bulk.batch_tokens,
                         guard=guard, unit_records=bulk.write_documents,
                         prompts=embed.prompts)
    if options.engine != "local":
        raise ConfigError(f"--engine must be local or ray, not {options.engine!r}")
    return BulkEngine[Record, Prepared](
        encoders, unit_records=bulk.write_documents, tokenizer_workers=bulk.tokenizer_workers,
        bucket_texts=bulk.bucket_texts, queue_depth=bulk.queue_depth)


def _fill_stats(report: RebuildReport, stats: EngineStats) -> None:
    report.tokens = stats.tokens
    report.padding_fraction = round(stats.padding_fraction, 4)
    report.elapsed_s = round(stats.elapsed_s, 2)
