"""``source.title_field``: every chunk is embedded under its document's title (a
contextual chunk header) while the stored ``text``, ``start`` and ``end`` stay the
document's own; reuse follows what was embedded; the stream and a rebuild agree."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedstream.bulk.sources import SourceRow, read_rows
from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.apply import apply_batch
from embedstream.stream.chunking import Chunk, TokenChunker, content_hash
from embedstream.stream.config import Settings, SourceSettings
from embedstream.stream.events import Position
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.metrics import Metrics
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.vectors import ChunkVectors, Failure

from .conftest import hypothesis_examples
from .test_apply import FP, HashEmbedder

BODY = "\n\n".join(
    " ".join(f"Sentence {j} of part {i} is about the otter colony number {i * 9 + j}."
             for j in range(8))
    for i in range(6)
)
TITLE = "Otters of the northern rivers"


@pytest.fixture(scope="module")
def model_limit(minilm_path: str) -> int:
    """The model's max_seq_length: tokens past it are silently truncated."""
    config = json.loads((Path(minilm_path) / "sentence_bert_config.json").read_text())
    return int(config["max_seq_length"])


@pytest.fixture(scope="module")
def chunker(minilm_tokenizer: Any, model_limit: int) -> TokenChunker:
    # As the service builds it: the default chunk.max_tokens, less [CLS] and [SEP].
    return TokenChunker(minilm_tokenizer, max_tokens=min(256, model_limit - 2))


def source(fmt: str = "debezium-flat", **extra: Any) -> SourceSettings:
    fields = {"id_fields": ["id"], "text_fields": ["body"], "title_field": "title"}
    fields.update(extra)
    if fmt == "native":
        del fields["text_fields"]
    return SourceSettings(format=fmt, **fields)


def message(fmt: str, row: dict[str, Any]) -> bytes:
    """One upsert of ``row`` (id, body, title) as the format sends it."""
    if fmt == "debezium":
        value: dict[str, Any] = {"op": "u", "after": row, "source": {"lsn": 10}}
    elif fmt == "native":
        metadata = {k: v for k, v in row.items() if k not in ("id", "body")}
        value = {"id": row["id"], "text": row["body"], "metadata": metadata}
    else:
        value = row
    return json.dumps(value).encode()


def prepare(fmt: str, row: dict[str, Any], settings: SourceSettings, chunker: TokenChunker,
            offset: int = 0) -> PreparedEvent:
    taken = take_in(str(row["id"]).encode(), message(fmt, row), Position("t", 0, offset),
                    settings, chunker)
    assert isinstance(taken, PreparedEvent), taken
    return taken


def n_tokens(tokenizer: Any, text: str, special: bool = False) -> int:
    return len(tokenizer(text, add_special_tokens=special, truncation=False)["input_ids"])


# --------------------------------------------------------------------------------------
# What is embedded, what is stored
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["debezium", "debezium-flat", "native"])
def test_chunks_embed_the_title_first_and_keep_the_documents_text(
        fmt: str, chunker: TokenChunker, minilm_tokenizer: Any) -> None:
    prepared = prepare(fmt, {"id": 7, "body": BODY, "title": f"  {TITLE} "}, source(fmt), chunker)
    assert prepared.event.title == TITLE and prepared.event.text == BODY
    assert len(prepared.chunks) > 3
    for chunk in prepared.chunks:
        assert chunk.text == BODY[chunk.start:chunk.end]
        assert chunk.embed_text == f"{TITLE}\n\n{chunk.text}"
        assert chunk.content_hash == content_hash(chunk.embed_text)
        assert chunk.n_tokens == n_tokens(minilm_tokenizer, chunk.embed_text)
    assert prepared.n_tokens == sum(n_tokens(minilm_tokenizer, c.embed_text)
                                    for c in prepared.chunks)


@pytest.mark.parametrize("row", [{}, {"title": None}, {"title": " \n "}],
                         ids=["absent", "null", "blank"])
def test_no_title_gives_no_header(row: dict[str, Any], chunker: TokenChunker) -> None:
    prepared = prepare("debezium", {"id": 1, "body": BODY, **row}, source("debezium"), chunker)
    assert prepared.event.title is None
    assert list(prepared.chunks) == chunker.chunk(BODY)
    assert all(c.header == "" and c.embed_text == c.text for c in prepared.chunks)


@pytest.mark.parametrize("fmt", ["debezium", "debezium-flat", "native"])
def test_without_title_field_chunks_and_hashes_are_as_before(
        fmt: str, chunker: TokenChunker) -> None:
    prepared = prepare(fmt, {"id": 1, "body": BODY, "title": TITLE},
                       source(fmt, title_field=None), chunker)
    assert prepared.event.title is None
    assert list(prepared.chunks) == chunker.chunk(BODY)
    # A store written before titles existed keeps matching: the hash is the text's own.
    assert [c.content_hash for c in prepared.chunks] == [
        hashlib.sha256(c.text.encode()).hexdigest() for c in prepared.chunks]


def test_a_title_is_read_as_a_text_field_is(chunker: TokenChunker) -> None:
    numbered = prepare("debezium-flat", {"id": 1, "body": BODY, "title": 1984}, source(),
                       chunker)
    assert numbered.event.title == "1984" and numbered.chunks[0].header == "1984\n\n"
    for title, reason in (({"a": 1}, "bad_type"), ([1], "bad_type"),
                          ("__debezium_unavailable_value", "unavailable_value")):
        taken = take_in(b"1", message("debezium", {"id": 1, "body": BODY, "title": title}),
                        Position("t", 0, 0), source("debezium"), chunker)
        assert isinstance(taken, Rejected) and taken.reason == reason, (title, taken)


def test_file_rows_carry_the_title(tmp_path: Path) -> None:
    rows = [{"id": 1, "body": "First body.", "title": "One", "unused": "x"},
            {"id": 2, "body": "Second body.", "title": None, "unused": "y"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    plain = Settings(source=source().model_dump())
    templated = Settings(source=source(text_fields=["x"], text_template="{body} ({unused})")
                         .model_dump())
    for name in ("rows.jsonl", "rows.parquet"):
        read = list(read_rows(str(tmp_path / name), plain))
        assert all(isinstance(r, SourceRow) for r in read)
        assert [(r.doc_id, r.text, r.title) for r in read if isinstance(r, SourceRow)] == [
            ("1", "First body.", "One"), ("2", "Second body.", None)]
    # Parquet reads only the columns a row needs: the template's fields are among them.
    read = list(read_rows(str(tmp_path / "rows.parquet"), templated))
    assert [r.text for r in read if isinstance(r, SourceRow)] == [
        "First body. (x)", "Second body. (y)"]


# --------------------------------------------------------------------------------------
# The model's limit
# --------------------------------------------------------------------------------------


def _check_within_limit(chunker: TokenChunker, tokenizer: Any, limit: int, text: str,
                        title: str) -> list[Chunk]:
    chunks = chunker.chunk(text, title)
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end]
        # What the model is given, [CLS] and [SEP] included, fits: nothing is truncated.
        assert n_tokens(tokenizer, chunk.embed_text, special=True) <= limit
        assert chunk.n_tokens <= chunker.max_tokens
        header = chunk.header.removesuffix("\n\n")
        assert title.strip().startswith(header)
        assert n_tokens(tokenizer, chunk.header) <= chunker.max_tokens // 4
    return chunks


def test_an_over_long_title_never_makes_an_input_over_the_model_limit(
        chunker: TokenChunker, minilm_tokenizer: Any, model_limit: int) -> None:
    words = " ".join(f"heading{i}" for i in range(3000))
    giant = "-".join(f"part{i}" for i in range(3000))  # no whitespace, ~9,000 tokens
    long_sentences = " ".join(f"word{i}" for i in range(2000))  # forced cuts everywhere
    for title in (words, giant, "標題" * 500, "🦦 " * 400):
        chunks = _check_within_limit(chunker, minilm_tokenizer, model_limit,
                                     f"{BODY}\n\n{long_sentences}\n\n{giant}", title)
        assert len(chunks) > 10
        # The title is cut to its share, not dropped, and the text keeps most of the room.
        assert chunks[0].header and n_tokens(minilm_tokenizer, chunks[0].header) >= 50
    # Nothing of a title with no tokens is left: no header, as without a title.
    assert chunker.chunk(BODY, "\x1f\x1e") == chunker.chunk(BODY)


_TEXT = st.lists(st.sampled_from(["otter", "river", "antidisestablishmentarianism", "標題",
                                  "e.g.", "3.14", "🦦", "x" * 300, ".", "\n\n", "\n"]),
                 max_size=400).map(" ".join)


@settings(max_examples=hypothesis_examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=_TEXT, title=_TEXT)
def test_every_titled_input_fits_the_model(text: str, title: str, chunker: TokenChunker,
                                           minilm_tokenizer: Any, model_limit: int) -> None:
    chunks = _check_within_limit(chunker, minilm_tokenizer, model_limit, text, title)
    # The header takes room, never text: every non-blank character is still in a chunk.
    assert "".join("".join(c.text for c in chunks).split()) == "".join(text.split())


# --------------------------------------------------------------------------------------
# Reuse follows what was embedded
# --------------------------------------------------------------------------------------

class Store:
    """The real Qdrant Edge store fed through the stream's own apply step."""

    def __init__(self, path: Path, settings: SourceSettings, chunker: TokenChunker) -> None:
        self.sink = QdrantEdgeSink(path, "docs")
        self.sink.open(FP)
        self.embedder, self.metrics = HashEmbedder(), Metrics()  # it records its texts
        self.vectors = ChunkVectors(self.embedder, self.metrics)
        self.settings, self.chunker, self.offset = settings, chunker, 0

    def send(self, body: str, title: str | None) -> list[str]:
        """Apply one version of document 1; the texts that had to be embedded for it."""
        self.embedder.texts.clear()
        self.offset += 1
        prepared = prepare("debezium-flat", {"id": 1, "body": body, "title": title},
                           self.settings, self.chunker, self.offset)

        def never(winner: PreparedEvent, failure: Failure) -> None:
            raise AssertionError(f"{winner.event.doc_id} failed: {failure}")

        apply_batch([prepared], self.sink, self.vectors, self.metrics, never)
        return list(self.embedder.texts)

    def payloads(self) -> list[dict[str, Any]]:
        return sorted((dict(p.payload) for p in self.sink.points()),
                      key=lambda p: int(p["chunk_index"]))


def test_a_changed_title_re_embeds_and_an_unchanged_one_reuses(
        tmp_path: Path, chunker: TokenChunker) -> None:
    store = Store(tmp_path / "store", source(), chunker)
    first = store.send(BODY, "Otters")
    assert len(first) > 3 and all(t.startswith("Otters\n\n") for t in first)
    assert store.send(BODY, "Otters") == []  # same title, same text: all from the store
    renamed = store.send(BODY, "River otters")
    assert len(renamed) == len(first) and all(t.startswith("River otters\n\n") for t in renamed)
    edited = BODY.replace("otter colony number 50.", "otter colony that moved away.")
    assert edited != BODY
    again = store.send(edited, "River otters")
    assert 1 <= len(again) <= 2, again  # only the edit's neighbourhood
    payloads = store.payloads()
    assert [p["text"] for p in payloads] == [edited[p["start"]:p["end"]] for p in payloads]
    assert all(p["content_hash"] == content_hash(f"River otters\n\n{p['text']}")
               for p in payloads)
    # Dropping the title re-embeds the bare texts.
    bare = store.send(edited, None)
    assert len(bare) == len(payloads) and all(not t.startswith("River") for t in bare)
    store.sink.close()


def test_without_title_field_stored_hashes_are_the_texts(tmp_path: Path,
                                                         chunker: TokenChunker) -> None:
    store = Store(tmp_path / "store", source(title_field=None), chunker)
    assert store.send(BODY, "Otters") == [c.text for c in chunker.chunk(BODY)]
    assert store.send(BODY, "Another title") == []  # the title is not read at all
    assert all(p["content_hash"] == content_hash(p["text"]) for p in store.payloads())
    store.sink.close()


# --------------------------------------------------------------------------------------
# The stream and a rebuild give the same vectors (real broker, real model)
# --------------------------------------------------------------------------------------

ROWS = [
    {"id": 1, "title": "Otters", "body": BODY},
    {"id": 2, "title": "Beavers and their dams",
     "body": "Beavers build dams. The dams slow the river. Fish find pools behind them."},
    {"id": 3, "title": " ".join(f"heading{i}" for i in range(400)),  # cut to its share
     "body": " ".join(f"word{i}" for i in range(600))},  # forced cuts
    {"id": 4, "title": None, "body": "A page with no title. It is embedded as it is."},
    {"id": 5, "body": "A page whose title field is absent."},
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_stream_and_a_rebuild_embed_title_and_text_alike(
        broker: Any, tmp_path: Path, minilm: Any) -> None:
    from embedstream.bulk.rebuild import RebuildOptions, rebuild
    from embedstream.stream.app.service import build_consumer, build_pipeline

    from .streamkit import create_topic, produce, run_until, unique

    topic = unique("titles")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source=source().model_dump(), chunk={"max_tokens": 64},
        sink={"kind": "qdrant-edge", "path": str(tmp_path / "store"), "collection": "docs"},
        metrics={"enabled": False}, embed={"backend": "torch", "precision": "fp32"},
    )
    # One batch each: the test broker (Tansu) gives a batch's first offset + 1 as the high
    # watermark, and a rebuild from Kafka reads up to the high watermark.
    for row in ROWS:
        produce(broker.bootstrap_servers, topic, [(str(row["id"]).encode(),
                                                   json.dumps(row).encode())])
    pipeline = build_pipeline(settings)
    try:
        stream = build_consumer(pipeline, Metrics())
        try:
            run_until(stream, lambda: sum(stream.committed.values()) >= len(ROWS), 120,
                      "every row to be committed")
        finally:
            stream.close()
        streamed = {(p.payload["doc_id"], p.payload["chunk_index"]): p
                    for p in pipeline.sink.points()}
    finally:
        pipeline.close()

    # The stored vector is the model's vector of title + text, not of the text alone.
    keys = sorted(streamed)
    texts = [str(streamed[k].payload["text"]) for k in keys]
    titles = {str(r["id"]): r.get("title") for r in ROWS}
    headers = [chunker_header(minilm, titles[k[0]]) for k in keys]
    stored = np.asarray([streamed[k].vector for k in keys], np.float32)
    titled = minilm.embed([h + t for h, t in zip(headers, texts, strict=True)])
    assert (stored * titled).sum(axis=1).min() >= 0.999
    bare = minilm.embed(texts)
    with_header = [i for i, h in enumerate(headers) if h]
    # (A title close to its text moves the vector little: "Otters" over otter text, 0.993.)
    assert with_header and (stored[with_header] * bare[with_header]).sum(axis=1).max() < 0.996
    for key, text in zip(keys, texts, strict=True):
        body = next(r["body"] for r in ROWS if str(r["id"]) == key[0])
        p = streamed[key].payload
        assert text == body[p["start"]:p["end"]]

    # A rebuild from the same rows in a file, and from the topic, gives the same chunks.
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for name, spec in (("file", str(tmp_path / "rows.jsonl")), ("kafka", "kafka")):
        out = tmp_path / f"{name}.parquet"
        report = rebuild(settings, RebuildOptions(source=spec, output=out))
        assert report.failures == 0, (name, report)
        table = pq.read_table(out).to_pylist()
        rebuilt = {(r["doc_id"], r["chunk_index"]): r for r in table}
        assert sorted(rebuilt) == keys, (name, report)
        for key in keys:
            row, point = rebuilt[key], streamed[key]
            assert (row["text"], row["start"], row["end"], row["content_hash"]) == (
                point.payload["text"], point.payload["start"], point.payload["end"],
                point.payload["content_hash"]), (name, key)
        vectors = np.asarray([rebuilt[k]["vector"] for k in keys], np.float32)
        assert (vectors * stored).sum(axis=1).min() >= 0.999, name


def chunker_header(embedder: Any, title: str | None) -> str:
    """The header the stream's chunker puts in front of a chunk of a document titled so."""
    if not title:
        return ""
    limit = min(64, embedder.max_seq_length - 2)
    return TokenChunker(embedder.tokenizer, max_tokens=limit).header(title)[0]
