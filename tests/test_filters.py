"""Filter fields and filtered search: the types a filter field's values take, the
filter grammar, the payload indexes in both stores, and `search --filter` /
`search --queries` on a real store built with the tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as qe
import yaml

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.sinks.qdrant_server import QdrantServerSink
from embedstream.stream.app.cli import main
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import Settings, SourceSettings, load_settings
from embedstream.stream.decode import decode_message
from embedstream.stream.errors import ConfigError, DecodeError, QueryError
from embedstream.stream.events import ChangeEvent, Position
from embedstream.stream.filters import (
    FieldType,
    Filter,
    Match,
    Range,
    filter_payload,
    parse_filter,
    parse_filter_json,
)
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.plan import PreparedEvent, build_write, fold
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Sink

FIELDS: dict[str, FieldType] = {"category": "keyword", "price": "float",
                                "published": "datetime", "stock": "integer", "used": "bool"}
AT = Position("products", 0, 7)


# -- the values a filter field takes -------------------------------------------------------

def test_values_are_stored_as_their_types() -> None:
    payload = filter_payload({"category": 42, "price": "19.5", "published": 1_700_000_000_000,
                              "stock": 3.0, "used": 1, "other": "x"}, FIELDS)
    assert payload == {"category": "42", "price": 19.5, "stock": 3, "used": True,
                       "published": "2023-11-14T22:13:20.000000Z"}
    assert filter_payload({"published": "2024-05-01T14:00:00+02:00"}, FIELDS) == {
        "published": "2024-05-01T12:00:00.000000Z"}
    assert filter_payload({"published": "2024-05-01"}, FIELDS) == {
        "published": "2024-05-01T00:00:00.000000Z"}
    # Missing and null are left out; a list is a list of the type.
    assert filter_payload({"price": None, "category": ["a", 1]}, FIELDS) == {
        "category": ["a", "1"]}


@pytest.mark.parametrize(("field", "value", "why"), [
    ("price", "abc", "not a number"),
    ("price", float("inf"), "not a finite number"),
    ("stock", 1.5, "not an integer"),
    ("used", "maybe", "not true or false"),
    ("category", {"a": 1}, "not a string"),
    ("published", "yesterday", "not an ISO-8601"),
    ("published", 1_700_000_000_000_000, "epoch microseconds"),  # a MicroTimestamp
])
def test_a_value_not_of_its_type_is_bad_type_naming_the_field(field: str, value: Any,
                                                               why: str) -> None:
    with pytest.raises(DecodeError) as caught:
        filter_payload({field: value}, FIELDS)
    assert caught.value.reason == "bad_type"
    assert repr(field) in caught.value.detail and why in caught.value.detail


def test_decode_copies_filter_fields_as_their_types_or_dead_letters_the_message() -> None:
    settings = SourceSettings(metadata_fields=("lang",), filter_fields=FIELDS)
    row = {"id": 1, "name": "Dune", "lang": "en", "price": "9.99", "category": "books"}
    value = json.dumps({"op": "c", "after": row, "source": {"lsn": 5}}).encode()
    event = decode_message(None, value, AT, settings)
    assert isinstance(event, ChangeEvent)
    assert event.metadata == {"lang": "en", "price": 9.99, "category": "books"}
    bad = json.dumps({"op": "c", "after": {**row, "price": "abc"}}).encode()
    with pytest.raises(DecodeError) as caught:
        decode_message(None, bad, AT, settings)
    assert caught.value.reason == "bad_type" and "'price'" in str(caught.value)
    native = SourceSettings(format="native", filter_fields=FIELDS)
    event = decode_message(None, json.dumps({"id": 2, "text": "t", "metadata": {
        "used": "true", "note": "kept"}}).encode(), AT, native)
    assert isinstance(event, ChangeEvent) and event.metadata == {"used": True, "note": "kept"}


def test_config_refuses_a_reserved_name_or_an_unknown_type() -> None:
    with pytest.raises(ConfigError, match="doc_id"):
        load_settings(source={"filter_fields": {"doc_id": "keyword"}})
    with pytest.raises(ConfigError, match=r"source\.filter_fields\.size"):
        load_settings(source={"filter_fields": {"size": "number"}})


# -- the filter grammar ---------------------------------------------------------------------

def test_expressions_parse_by_the_field_type() -> None:
    parsed = parse_filter(["category=books", "price < 20", "stock!=0", "used=false",
                           "published>=2024-01-01", "price=3"], FIELDS)
    assert parsed == Filter(
        must=(Match("category", "books"), Range("price", lt=20.0), Match("used", False),
              Range("published", True, gte="2024-01-01T00:00:00.000000Z"),
              Range("price", gte=3.0, lte=3.0)),
        must_not=(Match("stock", 0),))
    # Spaces inside a keyword value stay; around it they go.
    assert parse_filter(["category= New York "], FIELDS).must == (Match("category", "New York"),)


def test_json_filters_take_objects_and_expression_lists() -> None:
    assert parse_filter_json({"category": "books", "price": {"lt": 20, "gte": 5}}, FIELDS) == \
        Filter(must=(Match("category", "books"), Range("price", lt=20.0),
                     Range("price", gte=5.0)))
    assert parse_filter_json(["category!=toys"], FIELDS) == Filter(
        must_not=(Match("category", "toys"),))


@pytest.mark.parametrize(("expressions", "message"), [
    (["colour=red"], "'colour': not a filter field (filter fields: category, price"),
    (["category<b"], "'category': a keyword field takes only = and !="),
    (["price<cheap"], "'price': value is not a number"),
    (["stock=1.5"], "'stock': value is not an integer"),
    (["price"], "expected FIELD=VALUE"),
    (["=books"], "expected FIELD=VALUE"),
])
def test_a_bad_expression_is_refused_naming_it(expressions: list[str], message: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_filter(expressions, FIELDS)
    assert message in str(caught.value)


def test_a_bad_json_filter_is_refused_naming_it() -> None:
    with pytest.raises(QueryError, match="unknown operator 'under'"):
        parse_filter_json({"price": {"under": 3}}, FIELDS)
    with pytest.raises(QueryError, match="'category': the value must be a single keyword"):
        parse_filter_json({"category": ["a", "b"]}, FIELDS)
    with pytest.raises(QueryError, match="a filter is an object"):
        parse_filter_json("category=books", FIELDS)


# -- both stores ------------------------------------------------------------------------------

FP = Fingerprint(model="m", revision="r", dimension=4, normalized=True, chunker="c")


def _catalogue() -> list[DocumentWrite]:
    rng = np.random.default_rng(0)
    writes = []
    for i in range(40):
        row = {"category": ("books", "toys", "games", "food")[i % 4], "price": i * 1.5,
               "published": 1_700_000_000_000 + i * 86_400_000, "stock": i, "used": i % 3 == 0}
        vector = rng.normal(size=4).astype(np.float32)
        vector /= np.linalg.norm(vector)
        payload = {**filter_payload(row, FIELDS), "text": f"item {i}"}
        writes.append(DocumentWrite(f"d{i}", DocState(1, i, False),
                                    [ChunkPoint(0, vector, payload)]))
    return writes


ROWS = {w.doc_id: w.chunks[0].payload for w in _catalogue()}


def _matching(keep: Any) -> set[str]:
    return {doc_id for doc_id, payload in ROWS.items() if keep(payload)}


@pytest.fixture(params=["qdrant-edge", "qdrant"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sink]:
    store: Sink = (QdrantEdgeSink(tmp_path, "shop", filter_fields=FIELDS)
                   if request.param == "qdrant-edge"
                   else QdrantServerSink(":memory:", "shop", filter_fields=FIELDS))
    store.open(FP)
    store.apply(_catalogue())
    yield store
    store.close()


@pytest.mark.parametrize(("expressions", "keep"), [
    (["category=books"], lambda p: p["category"] == "books"),
    (["category!=books", "price<30"], lambda p: p["category"] != "books" and p["price"] < 30),
    (["price>=12", "price<=15"], lambda p: 12 <= p["price"] <= 15),
    (["stock>35"], lambda p: p["stock"] > 35),
    (["used=true"], lambda p: p["used"]),
    (["used=false", "category=toys"], lambda p: not p["used"] and p["category"] == "toys"),
    (["published>2023-12-10T00:00:00Z"], lambda p: p["published"] > "2023-12-10"),
    (["published=2023-11-15T22:13:20Z"], lambda p: p["published"].startswith("2023-11-15T22")),
    (["price=3"], lambda p: p["price"] == 3),
])
def test_a_filtered_search_returns_only_matching_points(
        sink: Sink, expressions: list[str], keep: Any) -> None:
    wanted = _matching(keep)
    assert wanted and wanted != set(ROWS)  # each case selects some, not all
    hits = sink.search([1.0, 0.0, 0.0, 0.0], limit=100, filter=parse_filter(expressions, FIELDS))
    assert {h.payload["doc_id"] for h in hits} == wanted
    # The limit still applies, to matching points only.
    top = sink.search([1.0, 0.0, 0.0, 0.0], limit=2, filter=parse_filter(expressions, FIELDS))
    assert len(top) == min(2, len(wanted)) and {h.payload["doc_id"] for h in top} <= wanted
    assert len(sink.search([1.0, 0.0, 0.0, 0.0], limit=100)) == len(ROWS)


def _edge_indexes(path: Path) -> dict[str, str]:
    """The payload indexes of a closed Edge collection, read from the shard itself."""
    [directory] = [d for d in path.iterdir() if d.name.startswith("shop_")
                   and not d.name.endswith("_state")]
    shard = qe.EdgeShard.load(str(directory), None)
    try:
        return {field: str(info.data_type).rsplit(".", 1)[-1].lower()
                for field, info in shard.info().payload_schema.items()}
    finally:
        shard.close()


def test_edge_creates_a_payload_index_per_filter_field(tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path, "shop", filter_fields=FIELDS)
    sink.open(FP)
    sink.apply(_catalogue())
    sink.close()
    indexes = _edge_indexes(tmp_path)
    assert {field: indexes.get(field) for field in FIELDS} == dict(FIELDS)
    assert indexes["doc_id"] == "keyword"


def test_a_filter_field_added_later_is_indexed_on_open_without_a_rebuild(tmp_path: Path) -> None:
    first = QdrantEdgeSink(tmp_path, "shop")
    first.open(FP)
    first.apply(_catalogue())
    first.close()
    assert "category" not in _edge_indexes(tmp_path)
    # Same fingerprint (filter fields are not in it): opens, adds the index, keeps the points.
    again = QdrantEdgeSink(tmp_path, "shop", filter_fields={"category": "keyword"})
    again.open(FP)
    hits = again.search([1.0, 0.0, 0.0, 0.0], 100, parse_filter(["category=food"], FIELDS))
    assert {h.payload["doc_id"] for h in hits} == _matching(lambda p: p["category"] == "food")
    again.close()
    assert _edge_indexes(tmp_path)["category"] == "keyword"
    # Opened for reading only (no fingerprint), nothing is written.
    reader = QdrantEdgeSink(tmp_path, "shop", filter_fields={"stock": "integer"})
    reader.open(None)
    reader.close()
    assert "stock" not in _edge_indexes(tmp_path)


# -- the command line -------------------------------------------------------------------------

DOCS = {
    "b1": ("books", 12.0, "A novel about a lighthouse keeper"),
    "b2": ("books", 35.0, "A history of the printing press"),
    "b3": ("books", 8.0, "Poems about the sea and the sky"),
    "t1": ("toys", 15.0, "A wooden train set with bridges"),
    "t2": ("toys", 9.0, "A puzzle of a lighthouse by the sea"),
}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A config whose Edge store holds DOCS, written through decode and build_write."""
    tmp = tmp_path_factory.mktemp("shop")
    config = {
        "source": {"format": "native", "filter_fields": {"category": "keyword",
                                                         "price": "float"}},
        "embed": {"model": str(tiny_model_dir), "device": "cpu"},
        "chunk": {"max_tokens": 64},
        "sink": {"kind": "qdrant-edge", "path": str(tmp / "store"), "collection": "shop"},
        "metrics": {"enabled": False},
    }
    config_file = tmp / "embedstream.yaml"
    config_file.write_text(yaml.safe_dump(config))
    settings = Settings.model_validate(config)
    pipeline = build_pipeline(settings)
    try:
        writes = []
        for offset, (doc_id, (category, price, text)) in enumerate(DOCS.items()):
            message = {"id": doc_id, "text": text,
                       "metadata": {"category": category, "price": str(price)}}
            event = decode_message(None, json.dumps(message).encode(),
                                   Position("shop", 0, offset), settings.source)
            assert isinstance(event, ChangeEvent)
            chunks = pipeline.chunker.chunk(event.text)
            vectors = pipeline.embedder.embed([c.text for c in chunks])
            writes.append(build_write(fold(None, [PreparedEvent(event, chunks)]),
                                      {c.content_hash: v for c, v in zip(chunks, vectors,
                                                                         strict=True)}))
        pipeline.sink.apply(writes)
    finally:
        pipeline.close()
    return config_file


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["search", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_search_filter_returns_only_matching_documents(
        shop: Path, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    code, out, err = _run(capsys, "lighthouse", "--filter", "category=books",
                          "--filter", "price<20", "-k", "5", "--json", "--config", str(shop))
    assert code == 0, err
    hits = [json.loads(line) for line in out.splitlines()]
    assert {h["doc_id"] for h in hits} == {"b1", "b3"}
    assert all(set(h) == {"doc_id", "chunk_index", "score", "text"} for h in hits)
    code, out, err = _run(capsys, "lighthouse", "--filter", "category!=books",
                          "--config", str(shop))
    assert code == 0, err
    assert sorted(line.split()[1] for line in out.splitlines()) == ["t1", "t2"]


def test_search_filter_on_an_unknown_field_exits_2_naming_it(
        shop: Path, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    code, out, err = _run(capsys, "sea", "--filter", "colour=red", "--config", str(shop))
    assert code == 2 and out == ""
    assert "'colour': not a filter field (filter fields: category, price)" in err


def test_search_queries_answers_each_line_in_order(
        shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    queries = tmp_path / "queries.jsonl"
    lines = [{"id": "q1", "text": "the sea", "filter": {"category": "toys"}},
             {"id": 2, "text": "printing", "filter": ["price>=20"]},
             {"id": "q3", "text": "anything"},
             {"id": "q4", "text": "cheap books",
              "filter": {"category": "books", "price": {"lt": 10}}}]
    queries.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, out, err = _run(capsys, "--queries", str(queries), "--json", "-k", "3",
                          "--config", str(shop))
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["id"] for a in answers] == ["q1", 2, "q3", "q4"]
    found = [{h["doc_id"] for h in a["hits"]} for a in answers]
    assert found[0] == {"t1", "t2"} and found[1] == {"b2"} and found[3] == {"b3"}
    assert len(found[2]) == 3  # -k per query, unfiltered
    # --filter applies to every query as well.
    code, out, err = _run(capsys, "--queries", str(queries), "--json", "--filter",
                          "price<10", "--config", str(shop))
    assert code == 0, err
    assert [{h["doc_id"] for h in json.loads(line)["hits"]} for line in out.splitlines()] == [
        {"t2"}, set(), {"b3", "t2"}, {"b3"}]


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "queries.jsonl:2: not JSON"),
    ('{"text": "no id"}', 'queries.jsonl:2: expected {"id"'),
    ('{"id": "q2", "text": "x", "filter": {"size": 3}}',
     "queries.jsonl:2 (id 'q2'): filter on 'size': not a filter field"),
])
def test_a_bad_queries_line_exits_2_naming_it_having_written_nothing(
        shop: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None,
        line: str, message: str) -> None:
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"id": "q1", "text": "sea"}) + "\n" + line + "\n")
    code, out, err = _run(capsys, "--queries", str(queries), "--json", "--config", str(shop))
    assert code == 2 and out == ""
    assert message in err
