"""decode_message: Debezium and native JSON in, ChangeEvent / Skipped / DecodeError out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedstream.stream.config import SourceSettings
from embedstream.stream.decode import decode_message
from embedstream.stream.errors import DecodeError
from embedstream.stream.events import ChangeEvent, Op, Position, Skipped

from .conftest import hypothesis_examples

SAMPLES = Path(__file__).parents[1] / ".." / "shared" / "data" / "debezium"
POS = Position("dbserver1.inventory.customers", 0, 42)
CUSTOMERS = SourceSettings(
    id_fields=("id",), text_fields=("first_name", "last_name"), metadata_fields=("email",)
)
OID = "5f9b1c2e8a1d4c3b2a190807"


def sample(name: str) -> bytes:
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"sample {path} not available")
    return path.read_bytes()


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def decode(
    value: Any, key: Any = None, cfg: SourceSettings = CUSTOMERS, pos: Position = POS
) -> ChangeEvent | Skipped:
    """Encode dicts/lists as JSON; pass bytes and None through."""
    raw_value = value if value is None or isinstance(value, bytes) else js(value)
    raw_key = key if key is None or isinstance(key, bytes) else js(key)
    return decode_message(raw_key, raw_value, pos, cfg)


def event(value: Any, key: Any = None, cfg: SourceSettings = CUSTOMERS) -> ChangeEvent:
    result = decode(value, key, cfg)
    assert isinstance(result, ChangeEvent), result
    return result


def reason(value: Any, key: Any = None, cfg: SourceSettings = CUSTOMERS) -> str:
    with pytest.raises(DecodeError) as info:
        decode(value, key, cfg)
    return info.value.reason


def change(op: str, after: Any = None, before: Any = None, **extra: Any) -> dict[str, Any]:
    return {"op": op, "before": before, "after": after, "source": {"ts_ms": 0}, **extra}


ANNE = {"id": 1004, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@x.org"}


# --- the real Debezium samples -----------------------------------------------------------


def test_mysql_create_sample_envelope_and_bare_payload_give_the_same_event() -> None:
    with_schema = event(sample("serde-with-schema.json"))
    bare = event(sample("serde-without-schema.json"))
    assert with_schema == bare
    assert with_schema.doc_id == "1004"
    assert with_schema.op is Op.UPSERT and with_schema.kind == "create"
    assert with_schema.text == "Anne\n\nKretchmar"
    assert with_schema.metadata == {"email": "annek@noanswer.org"}
    # source.ts_ms is 0 in the sample, so "auto" falls back to the Kafka offset.
    assert with_schema.version == POS.offset
    assert with_schema.source_ts_ms == 1465491411815


def test_update_sample_takes_the_after_image() -> None:
    ev = event(sample("serde-update.json"))
    assert (ev.doc_id, ev.op, ev.kind) == ("1004", Op.UPSERT, "update")
    assert ev.text == "Anne\n\nKretchmar"  # before said "Anne-Marie"


def test_postgresql_sample_versions_by_lsn() -> None:
    raw = sample("postgresql.adoc.L765-L952.create-event-value.json")
    cfg = SourceSettings(
        id_fields=("id",), text_fields=("first_name", "last_name", "email"), version="auto"
    )
    ev = event(raw, key={"id": 1}, cfg=cfg)
    assert ev.doc_id == "1"
    assert ev.kind == "create"
    assert ev.text == "Anne\n\nKretchmar\n\nannek@noanswer.org"
    assert ev.version == 24023128
    assert ev.source_ts_ms == 1559033904863
    assert event(raw, cfg=cfg.model_copy(update={"version": "lsn"})).version == 24023128
    assert event(raw, cfg=cfg.model_copy(update={"version": "ts_ms"})).version == 1559033904863


def test_sample_key_forms_all_give_the_same_id() -> None:
    raw = sample("serde-without-schema.json")
    envelope_key = {"schema": {"type": "struct"}, "payload": {"id": 1004}}
    for key in ({"id": 1004}, envelope_key, 1004, "1004", b"1004", None):
        assert event(raw, key=key).doc_id == "1004"


# --- deletes, missing before images, tombstones ------------------------------------------


def test_delete_with_before_image() -> None:
    ev = event(change("d", before=ANNE, ts_ms=1700000000000))
    assert (ev.doc_id, ev.op, ev.kind) == ("1004", Op.DELETE, "delete")
    assert ev.text == "" and ev.source_ts_ms == 1700000000000


KEYS = [
    pytest.param({"id": 7}, id="json-object"),
    pytest.param({"schema": {"type": "struct"}, "payload": {"id": 7}}, id="envelope"),
    pytest.param(7, id="json-scalar"),
    pytest.param(b"7", id="plain-text"),
]


@pytest.mark.parametrize("key", KEYS)
def test_delete_with_null_before_takes_the_id_from_the_key(key: Any) -> None:
    ev = event(change("d"), key=key)
    assert (ev.doc_id, ev.op) == ("7", Op.DELETE)


@pytest.mark.parametrize("key", KEYS)
def test_update_with_null_before_takes_the_id_from_the_key(key: Any) -> None:
    ev = event(change("u", after={"first_name": "Zed"}), key=key)
    assert (ev.doc_id, ev.op, ev.text) == ("7", Op.UPSERT, "Zed")


def test_key_wins_over_after_and_after_over_before() -> None:
    assert event(change("u", after={"id": 2}), key={"id": 1}).doc_id == "1"
    assert event(change("u", after={"id": 2}, before={"id": 3})).doc_id == "2"
    assert event(change("d", before={"id": 3})).doc_id == "3"


def test_plain_text_and_quoted_string_keys() -> None:
    assert event(change("d"), key=b"sku-1").doc_id == "sku-1"
    assert event(change("d"), key="sku-1").doc_id == "sku-1"


def test_tombstone_deletes_by_key() -> None:
    ev = event(None, key={"id": 1004})
    assert (ev.doc_id, ev.op, ev.kind) == ("1004", Op.DELETE, "tombstone")
    assert ev.version == -1  # no LSN/timestamp: the consumer decides
    for mode, expected in (("auto", -1), ("lsn", -1), ("ts_ms", -1), ("offset", POS.offset)):
        cfg = CUSTOMERS.model_copy(update={"version": mode})
        assert event(None, key={"id": 1004}, cfg=cfg).version == expected


def test_envelope_with_null_payload_is_a_tombstone() -> None:
    ev = event({"schema": None, "payload": None}, key={"id": 5})
    assert (ev.doc_id, ev.kind) == ("5", "tombstone")


def test_tombstone_without_key_is_missing_id() -> None:
    assert reason(None) == "missing_id"
    assert reason(None, key=b"") == "missing_id"
    assert reason(None, key={"other": 1}) == "missing_id"


# --- MongoDB ------------------------------------------------------------------------------

MONGO_DOC = {
    "_id": {"$oid": OID},
    "name": "Widget",
    "description": "A small widget",
    "qty": {"$numberLong": "5"},
    "n": {"$numberInt": "3"},
    "price": {"$numberDouble": "1.5"},
    "weird": {"$numberDouble": "NaN"},
    "exact": {"$numberDecimal": "9.99"},
    "at": {"$date": {"$numberLong": "1700000000000"}},
    "tags": [{"$numberInt": "1"}, "x"],
}
MONGO_KEY = {"id": json.dumps({"$oid": OID})}
MONGO_META = ("qty", "n", "price", "weird", "exact", "at", "tags")


@pytest.mark.parametrize("id_field", ["_id", "id"])
def test_mongo_after_is_extended_json_text(id_field: str) -> None:
    cfg = SourceSettings(id_fields=(id_field,), metadata_fields=MONGO_META)
    value = change("c", after=json.dumps(MONGO_DOC), source={"connector": "mongodb"})
    for key in (MONGO_KEY, None):
        ev = event(value, key=key, cfg=cfg)
        assert ev.doc_id == OID
        assert ev.text == "Widget\n\nA small widget"
        assert ev.metadata == {
            "qty": 5,
            "n": 3,
            "price": 1.5,
            "weird": "NaN",
            "exact": "9.99",
            "at": 1700000000000,
            "tags": [1, "x"],
        }


@pytest.mark.parametrize("id_field", ["_id", "id"])
def test_mongo_delete_and_tombstone_take_the_oid_from_the_key(id_field: str) -> None:
    cfg = SourceSettings(id_fields=(id_field,))
    assert event(change("d"), key=MONGO_KEY, cfg=cfg).doc_id == OID
    assert event(None, key=MONGO_KEY, cfg=cfg).doc_id == OID
    envelope = {"schema": {"type": "struct"}, "payload": MONGO_KEY}
    assert event(None, key=envelope, cfg=cfg).doc_id == OID


def test_mongo_string_and_number_ids_match_between_key_and_after() -> None:
    cfg = SourceSettings(id_fields=("_id",))
    for _id, key_text in (
        ("abc", '"abc"'),
        (12, "12"),
        ({"$numberLong": "12"}, '{"$numberLong": "12"}'),
    ):
        from_after = event(change("c", after=json.dumps({"_id": _id})), cfg=cfg).doc_id
        from_key = event(change("d"), key={"id": key_text}, cfg=cfg).doc_id
        assert from_after == from_key


def test_mongo_update_without_full_document_is_missing_after() -> None:
    value = change("u", updateDescription={"updatedFields": "{}"})
    assert reason(value, key=MONGO_KEY, cfg=SourceSettings(id_fields=("_id",))) == "missing_after"


def test_mongo_malformed_extended_json_is_bad_type() -> None:
    after = json.dumps({"_id": 1, "n": {"$numberLong": "many"}})
    assert reason(change("c", after=after)) == "bad_type"


# --- messages without a document change --------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({"databaseName": "inventory", "ddl": "CREATE TABLE t (id INT)"}, "schema_change"),
        ({"source": {}, "ts_ms": 1, "tableChanges": []}, "schema_change"),
        ({"ts_ms": 123}, "heartbeat"),
        ({"status": "BEGIN", "id": "571:53195829", "event_count": None}, "transaction"),
        ({"id": 1, "name": "flattened row"}, "no_op"),
        ({"op": "t", "source": {}}, "truncate"),
        ({"op": "m", "message": {"prefix": "x"}}, "message"),
        ({"schema": {}, "payload": {"ts_ms": 123}}, "heartbeat"),
    ],
)
def test_messages_without_a_document_change_are_skipped(value: Any, why: str) -> None:
    assert decode(value) == Skipped(why, POS)


# --- versions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "source", "top_ts", "expected"),
    [
        ("auto", {"lsn": 900, "ts_ms": 5}, 7, 900),
        ("auto", {"ts_ms": 5}, 7, 5),
        ("auto", {"lsn": None, "ts_ms": 5}, 7, 5),
        ("auto", {"ts_ms": 0}, 7, POS.offset),
        ("auto", {}, None, POS.offset),
        ("lsn", {"lsn": 900, "ts_ms": 5}, 7, 900),
        ("ts_ms", {"lsn": 900, "ts_ms": 5}, 7, 5),
        ("ts_ms", {"ts_ms": 0}, 7, 7),
        ("offset", {"lsn": 900, "ts_ms": 5}, 7, POS.offset),
    ],
)
def test_version_modes(
    mode: str, source: dict[str, Any], top_ts: int | None, expected: int
) -> None:
    cfg = CUSTOMERS.model_copy(update={"version": mode})
    ev = event(change("c", after=ANNE, source=source, ts_ms=top_ts), cfg=cfg)
    assert ev.version == expected


@pytest.mark.parametrize(
    ("mode", "source"),
    [
        ("lsn", {"ts_ms": 5}),
        ("lsn", {"lsn": True}),
        ("lsn", {"lsn": "0/16B3748"}),
        ("ts_ms", {"ts_ms": 0}),
    ],
)
def test_explicit_version_mode_without_its_field_is_an_error(mode: str, source: Any) -> None:
    cfg = CUSTOMERS.model_copy(update={"version": mode})
    assert reason(change("c", after=ANNE, source=source), cfg=cfg) == "missing_version"


def test_source_ts_ms_prefers_the_top_level_timestamp() -> None:
    assert event(change("c", after=ANNE, source={"ts_ms": 5}, ts_ms=9)).source_ts_ms == 9
    assert event(change("c", after=ANNE, source={"ts_ms": 5})).source_ts_ms == 5
    assert event(change("c", after=ANNE)).source_ts_ms is None


# --- text, metadata, ids ------------------------------------------------------------------


def test_text_fields_are_joined_and_empties_skipped() -> None:
    cfg = SourceSettings(text_fields=("title", "empty", "blank", "missing", "null", "n", "body"))
    after = {"id": 1, "title": "T", "empty": "", "blank": "  ", "null": None, "n": 42, "body": "B"}
    assert event(change("r", after=after), cfg=cfg).text == "T\n\n42\n\nB"


def test_row_without_any_text_field_is_an_upsert_with_empty_text() -> None:
    ev = event(change("c", after={"id": 1, "other": "x"}))
    assert (ev.op, ev.text) == (Op.UPSERT, "")


def test_text_field_that_is_an_object_is_bad_type() -> None:
    assert reason(change("c", after={"id": 1, "first_name": {"a": 1}})) == "bad_type"
    assert reason(change("c", after={"id": 1, "last_name": [1]})) == "bad_type"


def test_unavailable_toast_placeholder_is_not_embedded() -> None:
    after = {"id": 1, "first_name": "__debezium_unavailable_value"}
    assert reason(change("u", after=after)) == "unavailable_value"


def test_metadata_fields_are_copied_and_missing_ones_omitted() -> None:
    cfg = SourceSettings(metadata_fields=("lang", "tags", "dims", "absent"))
    after = {"id": 1, "lang": "en", "tags": ["a", "b"], "dims": {"w": 2}, "other": 3}
    ev = event(change("c", after=after), cfg=cfg)
    assert ev.metadata == {"lang": "en", "tags": ["a", "b"], "dims": {"w": 2}}


def test_composite_ids_are_joined_with_slash_and_escaped() -> None:
    cfg = SourceSettings(id_fields=("tenant", "id"))
    assert event(change("c", after={"tenant": "acme", "id": 7}), cfg=cfg).doc_id == "acme/7"
    assert event(change("d"), key={"tenant": "acme", "id": 7}, cfg=cfg).doc_id == "acme/7"
    slashy = event(change("c", after={"tenant": "a/b", "id": "c%"}), cfg=cfg).doc_id
    assert slashy == "a%2Fb/c%25"
    # A scalar key cannot hold two fields: fall back to after.
    assert event(change("c", after={"tenant": "t", "id": 1}), key=5, cfg=cfg).doc_id == "t/1"


def test_integral_ids_have_one_spelling() -> None:
    assert {event(change("c", after={"id": v})).doc_id for v in (1004, "1004", 1004.0)} == {"1004"}


# --- native format ------------------------------------------------------------------------

NATIVE = SourceSettings(format="native")


def test_native_upsert() -> None:
    value = {"id": "doc-1", "text": "hello", "metadata": {"lang": "en"}, "version": 3, "ts_ms": 99}
    ev = event(value, cfg=NATIVE)
    assert (ev.doc_id, ev.op, ev.text, ev.version, ev.kind) == (
        "doc-1",
        Op.UPSERT,
        "hello",
        3,
        "native",
    )
    assert ev.metadata == {"lang": "en"} and ev.source_ts_ms == 99


def test_native_defaults_and_offset_mode() -> None:
    ev = event({"id": 5}, cfg=NATIVE)
    assert (ev.doc_id, ev.text, ev.metadata, ev.version) == ("5", "", {}, POS.offset)
    offset_mode = NATIVE.model_copy(update={"version": "offset"})
    assert event({"id": 5, "version": 3}, cfg=offset_mode).version == POS.offset


def test_native_delete_and_tombstone() -> None:
    ev = event({"id": "doc-1", "deleted": True, "version": 4}, cfg=NATIVE)
    assert (ev.doc_id, ev.op, ev.version, ev.kind) == ("doc-1", Op.DELETE, 4, "native")
    for key in (b"doc-1", {"id": "doc-1"}, "doc-1"):
        tomb = event(None, key=key, cfg=NATIVE)
        assert (tomb.doc_id, tomb.op, tomb.kind) == ("doc-1", Op.DELETE, "tombstone")
    assert reason(None, cfg=NATIVE) == "missing_id"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ({"text": "no id"}, "missing_id"),
        ({"id": True, "text": "x"}, "bad_type"),
        ({"id": [1], "text": "x"}, "bad_type"),
        ({"id": 1, "text": 5}, "bad_type"),
        ({"id": 1, "version": True}, "bad_type"),
        ({"id": 1, "version": "3"}, "bad_type"),
        ({"id": 1, "metadata": ["x"]}, "bad_type"),
        ({"id": 1, "metadata": {"chunk_index": 1}}, "bad_type"),
        ({"id": 1, "deleted": "yes"}, "bad_type"),
        ({"id": 1, "ts_ms": "now"}, "bad_type"),
        ([1, 2], "bad_type"),
    ],
)
def test_native_bad_input(value: Any, why: str) -> None:
    assert reason(value, cfg=NATIVE) == why


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "key", "why"),
    [
        (b"\xff\xfe{", None, "not_utf8"),
        (js(change("d")), b"\xff", "not_utf8"),
        (b'{"op": "c", ', None, "invalid_json"),
        (b'{"op": "c", "after": {"id": NaN}}', None, "invalid_json"),
        (b"", None, "invalid_json"),
        (b"[" * 100000, None, "invalid_json"),
        (b'{"a":' * 100000, None, "invalid_json"),
        (js(change("d")), b"[" * 100000, "invalid_json"),
        (b"[1, 2]", None, "bad_type"),
        (b"42", None, "bad_type"),
        (b"null", None, "bad_type"),
        (b'"text"', None, "bad_type"),
        (js(change("c", after={"first_name": "x"})), None, "missing_id"),
        (js(change("d")), None, "missing_id"),
        (js(change("x", after=ANNE)), None, "unknown_op"),
        (js(change(5, after=ANNE)), None, "unknown_op"),  # type: ignore[arg-type]
        (js({"op": ["c"], "after": ANNE}), None, "unknown_op"),
        (js(change("c", after=[1])), None, "bad_type"),
        (js(change("c", after="[1]")), None, "bad_type"),
        (js(change("c", after="{not json")), None, "invalid_json"),
        (js(change("c", after={"id": {"a": 1}})), None, "bad_type"),
        (js(change("c", after={"id": [1]})), None, "bad_type"),
        (js(change("c", after=ANNE, source=[1])), None, "bad_type"),
        (js(change("c", after=None)), b'{"id": 1}', "missing_after"),
        (js(change("c", after={"id": 1, "first_name": "\ud800"})), None, "not_utf8"),
        (js(change("d")), b"\x00\x01binary", "bad_type"),
    ],
)
def test_bad_input_raises_decode_error_with_reason(
    value: bytes, key: bytes | None, why: str
) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(key, value, POS, CUSTOMERS)
    assert info.value.reason == why


# --- fuzzing: nothing but DecodeError ever escapes ---------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
fields = st.sampled_from(["id", "_id", "name", "description", "text", "$oid", "payload", "schema"])
shaped = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["c", "r", "u", "d", "t", "m", "x", None, 1]),
        "after": json_values | st.dictionaries(fields, json_values, max_size=4).map(json.dumps),
        "before": json_values | st.dictionaries(fields, json_values, max_size=4),
        "source": json_values
        | st.fixed_dictionaries({}, optional={"lsn": json_values, "ts_ms": json_values}),
        "ts_ms": json_values,
        "id": json_values,
        "text": json_values,
        "metadata": json_values,
        "version": json_values,
        "deleted": json_values,
        "payload": json_values,
    },
)
raw = st.none() | st.binary(max_size=64) | json_values.map(js) | shaped.map(js)
configs = st.sampled_from(
    [
        CUSTOMERS,
        SourceSettings(id_fields=("_id",), version="lsn"),
        SourceSettings(id_fields=("a", "b"), metadata_fields=("id", "x"), version="ts_ms"),
        SourceSettings(format="native"),
        SourceSettings(format="native", version="offset"),
    ]
)


@settings(max_examples=hypothesis_examples(400), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(key=raw, value=raw, cfg=configs, offset=st.integers(min_value=0, max_value=2**40))
def test_any_bytes_decode_or_raise_decode_error_only(
    key: bytes | None, value: bytes | None, cfg: SourceSettings, offset: int
) -> None:
    pos = Position("t", 0, offset)
    try:
        result = decode_message(key, value, pos, cfg)
    except DecodeError as error:
        assert error.reason != "unexpected", error
        return
    assert isinstance(result, ChangeEvent | Skipped)
    assert result.position == pos
    if isinstance(result, ChangeEvent):
        assert isinstance(result.doc_id, str) and isinstance(result.text, str)
        assert isinstance(result.version, int) and not isinstance(result.version, bool)
        json.dumps(dict(result.metadata), allow_nan=False).encode("utf-8")
