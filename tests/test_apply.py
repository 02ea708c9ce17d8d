"""The one apply step the consumer and the rebuild's catch-up share
(embedstream.stream.apply.apply_batch), against a real Qdrant Edge store."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.apply import apply_batch
from embedstream.stream.chunking import Chunk, content_hash
from embedstream.stream.errors import EmbedFailures, SinkUnavailable
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.store import DocumentWrite
from embedstream.stream.vectors import ChunkVectors, Failure

DIM = 8
FP = Fingerprint(model="test/hash", revision="1", dimension=DIM, normalized=True,
                 chunker="sentences")
REFUSED = "this sentence is refused"


class HashEmbedder:
    """Deterministic unit vectors from a text's hash; refuses texts containing REFUSED
    while ``refusing`` (as a remote provider refuses one input with a 400)."""

    model_name, revision, dimension, max_seq_length, tokenizer = "test/hash", "1", DIM, 64, None
    document_prompt = ""

    def __init__(self) -> None:
        self.refusing = True
        self.texts: list[str] = []

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        self.texts.extend(texts)
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:DIM], np.uint8)
                for t in texts]
        out = np.asarray(rows, np.float32) + 1.0
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        refused = {i: ("embed_rejected", "400: refused") for i, t in enumerate(texts)
                   if self.refusing and REFUSED in t}
        if refused:
            raise EmbedFailures(out, refused)
        return out

    def embed_queries(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return self.embed(texts)

    def close(self) -> None:
        pass


class FailingOnce:
    """The real sink, whose first ``apply`` fails as an unreachable store would."""

    def __init__(self, sink: QdrantEdgeSink) -> None:
        self.real, self.failures_left = sink, 1

    @property
    def sparse(self) -> bool:
        return self.real.sparse

    def document_states(self, doc_ids: Collection[str]):  # type: ignore[no-untyped-def]
        return self.real.document_states(doc_ids)

    def stored_vectors(self, doc_ids: Collection[str]):  # type: ignore[no-untyped-def]
        return self.real.stored_vectors(doc_ids)

    def apply(self, writes: Sequence[DocumentWrite]) -> None:
        if self.failures_left:
            self.failures_left -= 1
            raise SinkUnavailable("store unreachable", retry_after=0.1)
        self.real.apply(writes)


def event(doc: str, version: int, offset: int, text: str) -> PreparedEvent:
    change = ChangeEvent(doc, Op.UPSERT, version, Position("t", 0, offset), text, {},
                         kind="u")
    chunks, start = [], 0
    for index, sentence in enumerate(text.split(". ")):
        start = text.index(sentence, start)
        chunks.append(Chunk(index, start, start + len(sentence), sentence, 4,
                            content_hash(sentence)))
    return PreparedEvent(change, chunks)


def count(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_retried_batch_reports_a_failed_document_once_and_never_writes_it(
        tmp_path: Path) -> None:
    real = QdrantEdgeSink(tmp_path / "store", "docs")
    real.open(FP)
    sink, embedder, metrics = FailingOnce(real), HashEmbedder(), Metrics()
    vectors = ChunkVectors(embedder, metrics)
    batch = [event("a", 1, 0, "First draft. Of a"),
             event("b", 1, 1, f"Fine text. And {REFUSED}"),
             event("a", 2, 2, "Second draft. Of a")]
    reported: list[tuple[str, Failure]] = []

    def on_failure(winner: PreparedEvent, failure: Failure) -> None:
        reported.append((winner.event.doc_id, failure))

    failed: dict[Position, Failure] = {}
    with pytest.raises(SinkUnavailable):
        apply_batch(batch, sink, vectors, metrics, on_failure, failed)  # type: ignore[arg-type]
    assert reported == [("b", ("embed_rejected", "400: refused"))]
    assert count(metrics, "embedstream_sink_errors_total", op="apply") == 1
    assert real.document_states(["a", "b"]) == {}  # nothing was written

    embedder.refusing = False  # the provider would now take it: it must still not be written
    written = apply_batch(batch, sink, vectors, metrics, on_failure, failed)  # type: ignore[arg-type]
    assert [e.position.offset for e in written] == [2]  # a's newest event, b not at all
    assert len(reported) == 1  # not reported again on the retry
    states = real.document_states(["a", "b"])
    assert list(states) == ["a"] and states["a"].version == 2
    texts = sorted(str(p.payload["text"]) for p in real.points())
    assert texts == ["Of a", "Second draft"]
    # Outcomes are counted once, by the attempt that wrote: not again through the outage.
    events = "embedstream_events_total"
    assert count(metrics, events, op="u", outcome="stale", route="default") == 1
    assert count(metrics, events, op="u", outcome="applied", route="default") == 1
    real.close()


def test_an_unchanged_chunk_reuses_its_stored_vector(tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path / "store", "docs")
    sink.open(FP)
    embedder, metrics = HashEmbedder(), Metrics()
    vectors = ChunkVectors(embedder, metrics)

    def never(winner: PreparedEvent, failure: Failure) -> None:
        raise AssertionError(f"{winner.event.doc_id} failed: {failure}")

    apply_batch([event("a", 1, 0, "Kept sentence. Old ending")], sink, vectors, metrics, never)
    embedder.texts.clear()
    apply_batch([event("a", 2, 1, "Kept sentence. New ending")], sink, vectors, metrics, never)
    assert embedder.texts == ["New ending"]  # "Kept sentence" came from the store
    sink.close()
