"""The rebuild's engine callbacks: what each record becomes, how units are written,
and the checkpoints and failure list that make a rebuild resumable (see
:mod:`embedstream.bulk.rebuild`)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from embedstream.bulk.checkpoint import Checkpoint, CheckpointStore
from embedstream.bulk.encoder import AnyEncoder
from embedstream.bulk.engine import EmbeddedUnit, EngineStats
from embedstream.bulk.kafka_source import BulkEvent, BulkFailure, BulkSkip, BulkSuperseded
from embedstream.bulk.outputs import VectorFileWriter, VectorRow
from embedstream.bulk.progress import Progress
from embedstream.bulk.sources import RowFailure, SourceRow
from embedstream.stream.chunking import Chunk, TokenChunker
from embedstream.stream.config import Settings
from embedstream.stream.embedding import chunk_max_tokens
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import Folded, PreparedEvent, build_write, supersedes
from embedstream.stream.sparse import SparseEncoder
from embedstream.stream.store import DocState, DocumentWrite, Sink, chunk_point_id

if TYPE_CHECKING:
    from embedstream.bulk.rebuild import RebuildReport

__all__ = ["Prepared", "RebuildRun", "Record"]

Record = SourceRow | RowFailure | BulkEvent | BulkFailure | BulkSkip | BulkSuperseded
# What preparing a record gives: its chunks (None: nothing to write), or why it failed.
Prepared = tuple[list[Chunk] | None, tuple[str, str] | None]
# A file row has no log position; any stream event (offset >= 0) supersedes it.
_FILE_STATE = DocState(version=0, offset=-1, deleted=False)
_FILE_POSITION = Position("", 0, -1)


class RebuildRun:
    """One rebuild's state between the engine callbacks."""

    def __init__(self, settings: Settings, encoder: AnyEncoder,
                 checkpoints: CheckpointStore, checkpoint: Checkpoint, report: RebuildReport,
                 sink: Sink | None, writer: VectorFileWriter | None, progress: Progress,
                 metrics: Metrics | None = None, total: int | None = None,
                 sparse: SparseEncoder | None = None) -> None:
        self.settings, self.encoder = settings, encoder
        self.sparse = sparse  # each document's sparse vector, made as it is written
        self.checkpoints, self.checkpoint, self.report = checkpoints, checkpoint, report
        self.sink, self.writer, self.progress = sink, writer, progress
        self.metrics, self.total = metrics, total
        # The engine running the rebuild: its ``stats`` (replaced when it starts) give the
        # padding so far. None: only the report's figure, filled in at the end.
        self.engine: Any = None
        # What the counters already hold of the report's figures (they only go up).
        self._published = {"records": 0, "chunks": 0, "failures": 0}
        self._local = threading.local()
        self._next_checkpoint = time.monotonic() + settings.bulk.checkpoint_interval_s
        self._failures: TextIO | None = None
        self.max_tokens = chunk_max_tokens(settings.chunk.max_tokens, encoder)
        # A resumed Kafka snapshot checks each write against the store (see _newer_than_stored).
        self.resumed_kafka = checkpoint.source == "kafka" and checkpoint.done > 0

    def chunker(self) -> TokenChunker:
        # One per tokenizer thread: a chunker keeps per-call state in its tokenizer.
        chunker: TokenChunker | None = getattr(self._local, "chunker", None)
        if chunker is None:
            chunker = TokenChunker(self.encoder.tokenizer, max_tokens=self.max_tokens)
            self._local.chunker = chunker
        return chunker

    # -- engine callbacks ---------------------------------------------------------

    def prepare(self, record: Record) -> tuple[Prepared, Sequence[str]]:
        if isinstance(record, RowFailure):
            return (None, (record.reason, record.detail)), ()
        if isinstance(record, BulkFailure):
            return (None, (record.reason, record.detail)), ()
        if isinstance(record, BulkSkip | BulkSuperseded):
            return (None, None), ()
        if isinstance(record, BulkEvent) and record.event.op is Op.DELETE:
            return ([], None), ()
        text, title = ((record.text, record.title) if isinstance(record, SourceRow)
                       else (record.event.text, record.event.title))
        limit = self.settings.source.max_document_chars
        if len(text) > limit:
            return (None, ("document_too_large", f"{len(text)} characters > {limit}")), ()
        try:
            chunks = self.chunker().chunk(text, title)  # as the stream's take_in does
        except Exception as error:
            return (None, ("chunk_failed", repr(error)[:300])), ()
        return (chunks, None), [c.embed_text for c in chunks]

    def write(self, unit: EmbeddedUnit[Record, Prepared]) -> None:
        writes: list[DocumentWrite] = []
        for index, (record, (chunks, failure), vectors) in enumerate(zip(
                unit.records, unit.prepared, unit.vectors, strict=True)):
            self._advance(record)
            failure = failure or unit.failed.get(index)
            if failure is not None:
                self._fail(record, *failure)
                continue
            if chunks is None:
                if isinstance(record, BulkSuperseded):
                    self.report.superseded += 1
                else:
                    self.report.skipped += 1
                continue
            writes.append(self._document(record, chunks, vectors))
        if self.sink is not None and self.resumed_kafka:
            writes = self._newer_than_stored(writes)
        self.report.records += len(unit.records)
        deleted = sum(1 for w in writes if w.state.deleted)
        self.report.deleted += deleted
        self.report.documents += len(writes) - deleted
        self.report.chunks += sum(len(w.chunks) for w in writes)
        if writes:
            if self.sink is not None:
                self.sink.apply(writes)
            elif self.writer is not None:
                self._write_files(writes)
        self.progress.update(self.checkpoint.done, chunks=self.report.chunks,
                             failures=self.report.failures)
        self.publish()
        if time.monotonic() >= self._next_checkpoint:
            self.save()

    def expect(self, records: int) -> None:
        """The source now knows how many records are left to read (a Kafka snapshot,
        once folded): progress shows a total and an ETA from here on. Called from the
        engine's reader thread; the figures are only read for reporting."""
        self.total = self.checkpoint.done + records
        self.progress.set_total(self.total)

    def publish(self, embedded: bool = False) -> None:
        """Bring the rebuild metrics up to the report: the counters gain what the
        report gained since the last call, the ratios are set (progress to 1 once
        ``embedded``: every record is read, whether or not the total was known).
        No-op without metrics."""
        metrics, report = self.metrics, self.report
        if metrics is None:
            return
        for name, counter in (("records", metrics.rebuild_records),
                              ("chunks", metrics.rebuild_chunks),
                              ("failures", metrics.rebuild_failures)):
            value = int(getattr(report, name))
            if value > self._published[name]:
                counter.inc(value - self._published[name])
                self._published[name] = value
        if embedded:
            metrics.rebuild_progress.set(1.0)
        elif self.total:
            metrics.rebuild_progress.set(min(1.0, self.checkpoint.done / self.total))
        stats = getattr(self.engine, "stats", None)
        if not isinstance(stats, EngineStats):
            stats = None
        # Read without the engine's lock: a forward thread may be between its two
        # additions, so keep the figure within 0..1 rather than take the lock per write.
        padding = stats.padding_fraction if stats is not None else report.padding_fraction
        metrics.rebuild_padding.set(min(1.0, max(0.0, padding)))

    def _newer_than_stored(self, writes: list[DocumentWrite]) -> list[DocumentWrite]:
        """The stream's version guard against what the store holds, once a Kafka
        snapshot resumes: a safety net (the fold yields each document's winner once,
        so a resumed run should never meet an older event of a written document,
        unless the topic changed between the runs, e.g. compaction)."""
        assert self.sink is not None
        stored = self.sink.document_states([w.doc_id for w in writes])
        kept = [w for w in writes if supersedes(w.state, stored.get(w.doc_id))]
        self.report.skipped += len(writes) - len(kept)
        return kept

    def _document(self, record: Record, chunks: list[Chunk], vectors: Any) -> DocumentWrite:
        if isinstance(record, SourceRow):
            event = ChangeEvent(record.doc_id, Op.UPSERT, _FILE_STATE.version, _FILE_POSITION,
                                record.text, record.metadata, title=record.title)
            state = _FILE_STATE
        else:
            assert isinstance(record, BulkEvent)
            event, state = record.event, record.state
        by_hash = {c.content_hash: v for c, v in zip(chunks, vectors, strict=True)}
        folded = Folded(winner=PreparedEvent(event, chunks), state=state, applied=1, stale=0)
        return build_write(folded, by_hash, self.sparse)

    def _write_files(self, writes: list[DocumentWrite]) -> None:
        import numpy as np

        assert self.writer is not None
        rows: list[VectorRow] = []
        vectors: list[Any] = []
        for write in writes:
            for point in write.chunks:
                p = point.payload
                rows.append(VectorRow(chunk_point_id(write.doc_id, point.chunk_index), write.doc_id,
                                      point.chunk_index, int(p["start"]), int(p["end"]),
                                      str(p["content_hash"]), str(p["text"]),
                                      # An empty vector: none, as in the store.
                                      (write.sparse or None) if point.chunk_index == 0
                                      else None))
                vectors.append(point.vector)
        if rows:
            self.writer.add(rows, np.asarray(vectors, dtype=np.float32))

    def _advance(self, record: Record) -> None:
        self.checkpoint.done += 1
        if (position := _position(record)) is not None:
            self.checkpoint.offsets[(position.topic, position.partition)] = position.offset + 1

    def _fail(self, record: Record, reason: str, detail: str) -> None:
        self.report.failures += 1
        position = _position(record)
        where = (f"{position.topic}[{position.partition}]@{position.offset}"
                 if position is not None else getattr(record, "where", ""))
        doc_id = (record.doc_id if isinstance(record, SourceRow)
                  else record.event.doc_id if isinstance(record, BulkEvent) else None)
        self.failure(where, reason, detail, doc_id)

    def failure(self, where: str, reason: str, detail: str, doc_id: str | None = None) -> None:
        if self._failures is None:
            path = self.checkpoints.failures_path(self.checkpoint.name)
            self.report.failures_file = str(path)
            self._failures = path.open("a", encoding="utf-8")
        entry = {"where": where, "reason": reason, "detail": detail[:1000]}
        if doc_id is not None:  # the record decoded: which document is missing
            entry["doc_id"] = doc_id
        self._failures.write(json.dumps(entry) + "\n")

    def save(self) -> None:
        """Durable writes first, then the checkpoint that counts them."""
        if self.sink is not None:
            self.sink.flush()
        if self.writer is not None:
            self.checkpoint.writer = self.writer.checkpoint()
        if self._failures is not None:
            self._failures.flush()
            os.fsync(self._failures.fileno())
        self.checkpoints.save(self.checkpoint)
        self._next_checkpoint = time.monotonic() + self.settings.bulk.checkpoint_interval_s

    def close(self) -> None:
        if self._failures is not None:
            self._failures.close()
            self._failures = None


def _position(record: Record) -> Position | None:
    """Where a Kafka record sits; None for a file row."""
    if isinstance(record, BulkEvent):
        return record.event.position
    if isinstance(record, BulkFailure | BulkSkip | BulkSuperseded):
        return record.position
    return None
