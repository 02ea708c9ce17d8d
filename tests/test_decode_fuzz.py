"""decode_message under fuzzing: at least 100,000 generated cases per run
(with the "full" hypothesis profile of `make test`; the quick loop runs a tenth).

The contract (stream/decode.py): for any key and value bytes, ``decode_message``
returns a well-formed ChangeEvent or Skipped, or raises DecodeError with a reason
from ``decode.REASONS`` (never "unexpected", which means a bug) and a short,
UTF-8-encodable detail (both go into dead-letter headers). Nothing else escapes:
no RecursionError, OverflowError, UnicodeError, KeyError...

* round trip: valid events (Debezium bare and enveloped, every key form, MongoDB
  extended JSON, native, tombstones, huge and empty texts) decode to the id, op,
  version, text, metadata and kind they were built from;
* corruption: in each valid event, every field in turn (op, before, after, source,
  lsn, ts_ms, payload, schema, ids, text and metadata fields, native fields, the
  key) is replaced by a wrong value (any JSON type, non-finite or oversized numbers,
  lone surrogates, deep nesting, garbage literals) or removed;
* bytes: valid messages truncated, with bytes flipped or invalid UTF-8 spliced in;
  arbitrary binary and arbitrary JSON shapes;
* nesting: 1,000 to 50,000 levels anywhere give invalid_json, never RecursionError.

Every call goes through :func:`check`, which counts it; the count test asserts the
total (running itself whichever generator has not run in this session).
Hypothesis runs derandomized without a database, so every run is the same.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedstream.stream.config import RESERVED_PAYLOAD_FIELDS, SourceSettings
from embedstream.stream.decode import REASONS, SKIP_REASONS, decode_message
from embedstream.stream.errors import DecodeError
from embedstream.stream.events import ChangeEvent, Op, Position, Skipped

from .conftest import hypothesis_examples

MIN_CASES = hypothesis_examples(100_000)  # 100,000 in the "full" profile
CASES: Counter[str] = Counter()  # decode_message calls, per generator
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
KINDS = {"create", "read", "update", "delete", "tombstone", "native"}
DEBEZIUM_KINDS = {"c": "create", "r": "read", "u": "update", "d": "delete"}
UNAVAILABLE = "__debezium_unavailable_value"
MAX_DETAIL = 300


def fuzz(examples: int) -> Callable[[Any], Any]:
    """``examples`` in the "full" hypothesis profile, scaled to the loaded one."""
    return settings(
        max_examples=hypothesis_examples(examples),
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )


# ---------------------------------------------------------------------------------------
# The property every single case is held to
# ---------------------------------------------------------------------------------------


def check(
    counter: str, key: bytes | None, value: bytes | None, cfg: SourceSettings, offset: int = 42
) -> ChangeEvent | Skipped | DecodeError:
    """Decode once; anything but a well-formed result or a well-formed DecodeError fails."""
    CASES[counter] += 1
    position = Position("fuzz.topic", 3, offset)
    try:
        result = decode_message(key, value, position, cfg)
    except DecodeError as error:
        assert error.reason in REASONS, error.reason
        assert error.reason != "unexpected", f"a bug in decode: {error.detail}"
        assert isinstance(error.detail, str) and 0 < len(error.detail) <= MAX_DETAIL, error
        f"{error.reason}: {error.detail}".encode()  # a Kafka header: must be UTF-8
        return error
    if isinstance(result, Skipped):
        assert result.reason in SKIP_REASONS and result.position == position
        return result
    assert isinstance(result, ChangeEvent), type(result)
    assert result.position == position
    assert isinstance(result.doc_id, str)
    result.doc_id.encode()  # no lone surrogates: ids go into UUIDs and payloads
    assert type(result.version) is int and INT64_MIN <= result.version <= INT64_MAX
    ts = result.source_ts_ms
    assert ts is None or (type(ts) is int and 1 <= ts <= INT64_MAX), ts
    assert result.op in (Op.UPSERT, Op.DELETE) and result.kind in KINDS
    assert isinstance(result.text, str)
    result.text.encode()
    metadata = dict(result.metadata)
    assert all(isinstance(k, str) for k in metadata)
    # What a sink writes: strict JSON (no NaN or Infinity), UTF-8.
    json.dumps(metadata, allow_nan=False, ensure_ascii=False).encode()
    assert not metadata.keys() & RESERVED_PAYLOAD_FIELDS
    if result.op is Op.DELETE:
        assert result.text == "" and not metadata
    if result.kind == "tombstone":
        assert result.op is Op.DELETE and result.version in (-1, offset)
    if cfg.format == "native":
        assert result.kind in ("native", "tombstone")
    else:
        assert result.kind != "native" and metadata.keys() <= set(cfg.metadata_fields)
        if result.kind != "tombstone":
            assert (result.op is Op.DELETE) == (result.kind == "delete")
    if cfg.version == "offset":
        assert result.version == offset
    return result


# ---------------------------------------------------------------------------------------
# Building messages: Python objects with a few markers, serialized at the end
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text spliced in as it is (NaN, 1e400, 5,000-digit ints, lone surrogates...)."""

    text: str


@dataclass(frozen=True)
class MongoText:
    """A MongoDB after/before image: the document as extended-JSON text."""

    doc: Any


@dataclass(frozen=True)
class PlainKey:
    """A StringConverter key: the text itself, not JSON."""

    text: str


def serialize(obj: Any, ascii_only: bool = False) -> bytes:
    raws: dict[str, str] = {}

    def prepare(node: Any) -> Any:
        if isinstance(node, Raw):
            sentinel = f"\x00raw{len(raws)}\x00"
            raws[json.dumps(sentinel, ensure_ascii=ascii_only)] = node.text
            return sentinel
        if isinstance(node, MongoText):
            return serialize(node.doc, ascii_only).decode("utf-8", "surrogatepass")
        if isinstance(node, dict):
            return {k: prepare(v) for k, v in node.items()}
        if isinstance(node, list):
            return [prepare(v) for v in node]
        return node

    text = json.dumps(prepare(obj), ensure_ascii=ascii_only)
    for quoted, literal in raws.items():
        text = text.replace(quoted, literal)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate gives invalid UTF-8


def encode_key(key: Any, ascii_only: bool = False) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, PlainKey):
        return key.text.encode()
    return serialize(key, ascii_only)


@dataclass(frozen=True)
class Expected:
    doc_id: str
    op: Op
    version: int
    kind: str
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    source_ts_ms: int | None = None


@dataclass
class Built:
    """A valid message: its value, the key forms that must all decode alike, the result."""

    cfg: SourceSettings
    value: Any  # None: a tombstone
    keys: list[Any]
    offset: int
    expected: Expected | Skipped


# ---------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------

UTF8 = st.characters(codec="utf-8")
small_text = st.text(UTF8, max_size=24)
blank_text = st.sampled_from(["", " ", "\n\n", "\t \r\n", "\u3000", "\u00a0", "\u2028"])
huge_text = st.builds(
    lambda unit, n: unit * n, st.text(UTF8, min_size=1, max_size=6), st.integers(20_000, 120_000)
)
int64 = st.integers(INT64_MIN, INT64_MAX)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | small_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(small_text, inner, max_size=3),
    max_leaves=8,
)
RAW_LITERALS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e999", "1e-400", "-0", "-0.0", "1E2",
    "9" * 4300, "-" + "9" * 4300, "1" * 5000, "9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "123456789012345678901234567890", "3.0", "1.5",
    '"\\ud800"', '"a\\udfffb"', '"\\u0000"', f'"{UNAVAILABLE}"', '"\\ud83d\\ude00"',
    "tru", "nul", "{", "[", "]", "", "00", "0x10", "'x'", '"unterminated', "[1,]", '{"a"}',
    "[" * 20_000 + "]" * 20_000, '{"a":' * 12_000 + "1" + "}" * 12_000, "[" * 30_000,
    '"' + "long " * 40_000 + '"', "true", "false", "null", "{}", "[]", '""', '"   "',
    '{"$oid": 5}', '{"$numberLong": "x"}', '{"$numberDouble": ' + "9" * 400 + "}",
    '{"$numberInt": 1.5}', '{"$numberDecimal": []}', '{"$date": {"$numberLong": "1e3"}}',
]
# By index: a strategy's repr holds its values, and some of these are large.
raw_literals = st.integers(0, len(RAW_LITERALS) - 1).map(lambda i: Raw(RAW_LITERALS[i]))
lone_surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
wrong_values = st.one_of(
    json_values,
    raw_literals,
    lone_surrogates,
    st.builds(MongoText, json_values),
    st.integers(INT64_MAX - 2, 10**400),
)


def id_text(value: Any) -> str:
    """The documented id spelling: str(value); an integral float its integer text."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def join_ids(values: list[Any]) -> str:
    if len(values) == 1:
        return id_text(values[0])
    return "/".join(id_text(v).replace("%", "%25").replace("/", "%2F") for v in values)


def parses_as_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def key_forms(fields: tuple[str, ...], ids: list[Any], mongo: bool = False) -> list[Any]:
    """Every key form that must give ``ids``. Not generated, as documented limits: str ids
    that look like JSON text in a key (MongoDB keys hold the _id as extended JSON, so
    '"x"' or '{...}' is unwrapped), and plain-text keys that parse as JSON."""
    if not mongo and any(isinstance(v, str) and v.lstrip()[:1] in ("{", '"') for v in ids):
        return []
    row = dict(zip(fields, ids, strict=True))
    forms: list[Any] = [row, {"schema": {"type": "struct", "optional": False}, "payload": row}]
    if len(fields) == 1 and not mongo:
        [value] = ids
        forms.append(value)  # a JSON scalar
        text = id_text(value)
        if text.strip() and text.isprintable() and not parses_as_json(text):
            forms.append(PlainKey(text))
    return forms


id_values = st.one_of(
    int64,
    st.text(UTF8, min_size=1, max_size=20),
    st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
    st.floats(-1e15, 1e15, allow_nan=False),
)
text_values = st.one_of(
    st.none(), small_text, blank_text, int64, st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)
source_extras = st.fixed_dictionaries(
    {},
    optional={
        "connector": st.sampled_from(["postgresql", "mysql", "mongodb"]),
        "db": small_text,
        "snapshot": st.sampled_from(["true", "false", "last"]),
        "txId": int64,
    },
)


def text_of(value: Any) -> str | None:
    if value is None:
        return None
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return text if text.strip() else None


BOOLS = st.booleans()
NATURAL = st.integers(0, INT64_MAX)
POSITIVE = st.integers(1, INT64_MAX)
MAYBE_NATURAL = st.none() | NATURAL
MAYBE_POSITIVE = st.none() | POSITIVE
MAYBE_TS = st.none() | st.just(0) | POSITIVE


def versions(
    draw: st.DrawFn, mode: str, offset: int
) -> tuple[dict[str, Any], int | None, int, int | None]:
    """(source fields, top-level ts_ms, the version it gives, source_ts_ms)."""
    lsn = draw(MAYBE_NATURAL)
    source_ts = draw(MAYBE_TS)
    top_ts = draw(MAYBE_POSITIVE)
    if mode == "lsn" and lsn is None:
        lsn = draw(NATURAL)
    if mode == "ts_ms" and not source_ts and top_ts is None:
        source_ts = draw(POSITIVE)
    source: dict[str, Any] = draw(source_extras)
    if lsn is not None or draw(BOOLS):
        source["lsn"] = lsn
    if source_ts is not None or draw(BOOLS):
        source["ts_ms"] = source_ts
    if mode == "offset":
        version = offset
    elif mode == "lsn":
        assert lsn is not None
        version = lsn
    elif mode == "ts_ms":
        version = source_ts or top_ts or 0
    else:
        version = lsn if lsn is not None else source_ts or offset
    return source, top_ts, version, top_ts or source_ts or None


@cache
def debezium_settings(fields: tuple[str, ...], mode: str, mongo: bool = False) -> SourceSettings:
    if mongo:
        return SourceSettings(
            id_fields=fields, text_fields=("name", "description"),
            metadata_fields=("qty", "tags"), version=mode,  # type: ignore[arg-type]
        )
    return SourceSettings(
        id_fields=fields, text_fields=("title", "body", "extra"),
        metadata_fields=("lang", "tags"), version=mode,  # type: ignore[arg-type]
    )


@cache
def native_settings(mode: str) -> SourceSettings:
    return SourceSettings(format="native", version=mode)  # type: ignore[arg-type]


MODES = st.sampled_from(["auto", "lsn", "ts_ms", "offset"])
offsets = st.integers(0, 2**62)
ID_FIELDS = st.sampled_from([("id",), ("pk",), ("tenant", "id")])
OPS = st.sampled_from("cudr")
PRESENCE = st.integers(0, 3)
ONE_IN_100 = st.integers(0, 99)
EXTRA_COLUMNS = st.dictionaries(
    st.sampled_from(["x", "updated_at", "price"]), json_values, max_size=2
)
OLDER_TEXTS = st.dictionaries(st.sampled_from(["title", "body", "extra"]), small_text)


def maybe_huge(draw: st.DrawFn, huge: bool, usual: st.SearchStrategy[Any]) -> Any:
    """``usual``, or one time in a hundred (when ``huge``) a text of 20k to 720k chars."""
    return draw(huge_text) if huge and draw(ONE_IN_100) == 0 else draw(usual)


@st.composite
def debezium_events(draw: st.DrawFn, huge: bool = True) -> Built:
    fields = draw(ID_FIELDS)
    cfg = debezium_settings(fields, draw(MODES))
    ids = [draw(id_values) for _ in fields]
    row = dict(zip(fields, ids, strict=True))
    op = draw(OPS)
    offset = draw(offsets)
    source, top_ts, version, source_ts_ms = versions(draw, cfg.version, offset)
    keys = key_forms(fields, ids)
    texts: dict[str, Any] = {}
    for name in cfg.text_fields:
        if draw(PRESENCE):
            texts[name] = maybe_huge(draw, huge, text_values)
    metadata = {name: draw(json_values) for name in cfg.metadata_fields if draw(BOOLS)}
    image = {**draw(EXTRA_COLUMNS), **row, **texts, **metadata}
    older = {**row, **draw(OLDER_TEXTS)}
    payload: dict[str, Any] = {"op": op, "source": source, "ts_ms": top_ts}
    if op == "d":
        with_before = not keys or draw(BOOLS)
        payload |= {"before": older if with_before else None, "after": None}
        if with_before:
            keys = [None, *keys]
        expected = Expected(join_ids(ids), Op.DELETE, version, "delete",
                            source_ts_ms=source_ts_ms)
    else:
        payload |= {"before": older if op == "u" and draw(BOOLS) else None,
                    "after": image}
        keys = [None, *keys]
        text = "\n\n".join(t for n in cfg.text_fields if (t := text_of(texts.get(n))))
        expected = Expected(join_ids(ids), Op.UPSERT, version, DEBEZIUM_KINDS[op], text,
                            metadata, source_ts_ms)
    if draw(BOOLS):
        payload = {"schema": {"type": "struct", "name": "envelope"}, "payload": payload}
    return Built(cfg, payload, keys, offset, expected)


OBJECT_ID = st.binary(min_size=12, max_size=12).map(bytes.hex)
MONGO_ID_FIELDS = st.sampled_from(["_id", "id"])
MONGO_ID_KINDS = st.sampled_from(["oid", "long", "int", "str"])
MONGO_STR_IDS = st.text(UTF8, min_size=1, max_size=16)
MONGO_NAMES = st.one_of(
    small_text,
    st.integers(-1000, 1000).map(lambda n: {"$numberInt": str(n)}),
    st.just({"$numberDouble": "2.5"}),
)
MONGO_DESCRIPTIONS = st.none() | small_text
MONGO_QTY = st.none() | st.integers(0, 10**6)


@st.composite
def mongo_events(draw: st.DrawFn, huge: bool = True) -> Built:
    cfg = debezium_settings((draw(MONGO_ID_FIELDS),), draw(MODES), mongo=True)
    kind = draw(MONGO_ID_KINDS)
    if kind == "oid":
        doc_id = draw(OBJECT_ID)
        ext: Any = {"$oid": doc_id}
    elif kind == "str":
        ext = doc_id = draw(MONGO_STR_IDS)
    else:
        number = draw(int64)
        ext, doc_id = ({"$numberLong": str(number)} if kind == "long" else number), str(number)
    key = {"id": json.dumps(ext)}
    name = draw(MONGO_NAMES)
    description = maybe_huge(draw, huge, MONGO_DESCRIPTIONS)
    qty = draw(MONGO_QTY)
    doc: dict[str, Any] = {"_id": ext, "name": name, "description": description}
    if qty is not None:
        doc["qty"] = {"$numberLong": str(qty)}
    op = draw(OPS)
    offset = draw(offsets)
    source, top_ts, version, source_ts_ms = versions(draw, cfg.version, offset)
    source["connector"] = "mongodb"
    if op == "d":
        payload = {"op": "d", "before": None, "after": None, "source": source, "ts_ms": top_ts}
        expected = Expected(doc_id, Op.DELETE, version, "delete", source_ts_ms=source_ts_ms)
        keys: list[Any] = [key]
    else:
        payload = {"op": op, "after": MongoText(doc), "source": source, "ts_ms": top_ts}
        name_text = name if isinstance(name, str) else (
            "2.5" if "$numberDouble" in name else name["$numberInt"])
        text = "\n\n".join(t for t in (name_text, description) if t is not None and t.strip())
        metadata = {} if qty is None else {"qty": qty}
        expected = Expected(doc_id, Op.UPSERT, version, DEBEZIUM_KINDS[op], text, metadata,
                            source_ts_ms)
        keys = [key, None]
    return Built(cfg, payload, keys, offset, expected)


NATIVE_IDS = st.one_of(int64, st.text(UTF8, min_size=1, max_size=20))
MAYBE_INT64 = st.none() | int64
MAYBE_BOOL = st.none() | BOOLS
NATIVE_TEXTS = st.none() | small_text | blank_text
NATIVE_METADATA = st.none() | st.dictionaries(
    small_text.filter(lambda k: k not in RESERVED_PAYLOAD_FIELDS), json_values, max_size=4
)


@st.composite
def native_events(draw: st.DrawFn, huge: bool = True) -> Built:
    cfg = native_settings(draw(MODES))
    raw_id = draw(NATIVE_IDS)
    doc_id = str(raw_id)
    offset = draw(offsets)
    doc: dict[str, Any] = {"id": raw_id}
    keys: list[Any] = [None]
    if isinstance(raw_id, int) or raw_id.lstrip()[:1] not in ("{", '"'):
        keys += [{"id": raw_id}, raw_id]
        if draw(BOOLS):  # the id from the key alone
            del doc["id"]
            keys = keys[1:]
    version = draw(MAYBE_INT64)
    if version is not None:
        doc["version"] = version
    ts_ms = draw(MAYBE_POSITIVE)
    if ts_ms is not None:
        doc["ts_ms"] = ts_ms
    deleted = draw(MAYBE_BOOL)
    if deleted is not None:
        doc["deleted"] = deleted
    text = maybe_huge(draw, huge, NATIVE_TEXTS)
    if text is not None:
        doc["text"] = text
    metadata = draw(NATIVE_METADATA)
    if metadata is not None:
        doc["metadata"] = metadata
    expected_version = offset if cfg.version == "offset" or version is None else version
    if deleted:
        expected = Expected(doc_id, Op.DELETE, expected_version, "native", source_ts_ms=ts_ms)
    else:
        expected = Expected(doc_id, Op.UPSERT, expected_version, "native", text or "",
                            metadata or {}, ts_ms)
    return Built(cfg, doc, keys, offset, expected)


NATIVE_KEY_IDS = st.one_of(int64, small_text.filter(str.strip))
TOMBSTONE_FIELDS = st.sampled_from([("id",), ("tenant", "id")])
ENVELOPE_SCHEMAS = st.none() | st.just({"type": "struct"})


@st.composite
def tombstones(draw: st.DrawFn) -> Built:
    native = draw(BOOLS)
    fields = ("id",) if native else draw(TOMBSTONE_FIELDS)
    cfg = native_settings(draw(MODES)) if native else debezium_settings(fields, draw(MODES))
    ids = [draw(NATIVE_KEY_IDS if native else id_values) for _ in fields]
    keys = key_forms(fields, ids)
    if not keys:
        keys = [{f: draw(int64) for f in fields}]
        ids = list(keys[0].values())
    offset = draw(offsets)
    version = offset if cfg.version == "offset" else -1
    value = None
    if not native and draw(BOOLS):
        value = {"schema": draw(ENVELOPE_SCHEMAS), "payload": None}
    return Built(cfg, value, keys, offset, Expected(join_ids(ids), Op.DELETE, version,
                                                    "tombstone"))


SKIPPED = st.sampled_from(
    [
        ("schema_change", {"databaseName": "inventory", "ddl": "ALTER TABLE t ADD c INT"}),
        ("schema_change", {"source": {}, "ts_ms": 1, "tableChanges": []}),
        ("heartbeat", {"ts_ms": 1700000000000}),
        ("transaction", {"status": "BEGIN", "id": "571:53195829", "event_count": None}),
        ("transaction", {"status": "END", "id": "571:53195829", "event_count": 2}),
        ("no_op", {"id": 1, "name": "a flattened row"}),
        ("truncate", {"op": "t", "source": {}}),
        ("message", {"op": "m", "message": {"prefix": "p", "content": "eA=="}}),
    ]
)


@st.composite
def skipped_messages(draw: st.DrawFn) -> Built:
    cfg = debezium_settings(("id",), draw(MODES))
    why, value = draw(SKIPPED)
    if draw(BOOLS):
        value = {"schema": {}, "payload": value}
    return Built(cfg, value, [None, {"id": 1}], draw(offsets), Skipped(why, Position("", 0, 0)))


valid_messages = st.one_of(
    debezium_events(), mongo_events(), native_events(), tombstones(), skipped_messages()
)
# For the tests that decode many variants of each message: no huge texts.
small_messages = st.one_of(
    debezium_events(huge=False), mongo_events(huge=False), native_events(huge=False),
    tombstones(), skipped_messages(),
)


def value_forms(built: Built) -> list[Any]:
    """The value as built and, for Debezium, with the JsonConverter envelope toggled."""
    value = built.value
    if built.cfg.format != "debezium" or not isinstance(value, dict):
        return [value]
    if value.keys() == {"schema", "payload"}:
        return [value] if value["payload"] is None else [value, value["payload"]]
    return [value, {"schema": {"type": "struct", "optional": False}, "payload": value}]


def encodings(built: Built) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Every key form with every value form, as ASCII-escaped and as raw UTF-8 JSON."""
    for ascii_only in (False, True):
        for value in value_forms(built):
            raw = None if value is None else serialize(value, ascii_only)
            for key in built.keys:
                yield encode_key(key, ascii_only), raw


# ---------------------------------------------------------------------------------------
# 1. Round trip: a valid event decodes to what it was built from, in every encoding
# ---------------------------------------------------------------------------------------


@fuzz(2_200)
@given(built=valid_messages)
def test_valid_events_round_trip(built: Built) -> None:
    assert built.keys
    for key, value in encodings(built):
        result = check("round_trip", key, value, built.cfg, built.offset)
        if isinstance(built.expected, Skipped):
            assert isinstance(result, Skipped) and result.reason == built.expected.reason
            continue
        assert isinstance(result, ChangeEvent), (key, result)
        want = built.expected
        got = Expected(result.doc_id, result.op, result.version, result.kind, result.text,
                       dict(result.metadata), result.source_ts_ms)
        assert got == want, (key, value[:300] if value else value)


# ---------------------------------------------------------------------------------------
# 2. Corruption: every field of a valid event replaced by a wrong value, or removed
# ---------------------------------------------------------------------------------------

Path = tuple[Any, ...]
DELETE = object()


def slots(node: Any, path: Path = ()) -> Iterator[Path]:
    """Every field path in a message (dict keys, list items, Mongo text), the root included."""
    yield path
    if isinstance(node, MongoText):
        yield from slots(node.doc, (*path, MongoText))
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from slots(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from slots(v, (*path, i))


def replaced(node: Any, path: Path, new: Any) -> Any:
    if not path:
        return None if new is DELETE else new
    head, rest = path[0], path[1:]
    if head is MongoText:
        return MongoText(replaced(node.doc, rest, new))
    copy: Any = dict(node) if isinstance(node, dict) else list(node)
    if new is DELETE and not rest:
        del copy[head]
    else:
        copy[head] = replaced(node[head], rest, new)
    return copy


def extra_slots(built: Built) -> list[Path]:
    """Fields the config reads that the message may not hold yet: every one gets a value."""
    payload = built.value
    if isinstance(payload, dict) and "payload" in payload:
        prefix: Path = ("payload",)
        payload = payload["payload"]
    else:
        prefix = ()
    if not isinstance(payload, dict):
        return []
    cfg = built.cfg
    if cfg.format == "native":
        return [(name,) for name in ("id", "text", "metadata", "version", "deleted", "ts_ms")]
    out: list[Path] = [(*prefix, name) for name in ("op", "before", "after", "source", "ts_ms")]
    if isinstance(payload.get("source"), dict):
        out += [(*prefix, "source", name) for name in ("lsn", "ts_ms")]
    for image in ("after", "before"):
        found = payload.get(image)
        inner: Path = (MongoText,) if isinstance(found, MongoText) else ()
        if isinstance(found, dict | MongoText):
            names = {*cfg.id_fields, *cfg.text_fields, *cfg.metadata_fields}
            out += [(*prefix, image, *inner, name) for name in sorted(names)]
    return out


VALID_OPS = {"c", "r", "u", "d", "t", "m"}
JSON_TYPES = (dict, list, str, int, float, bool)


def expected_reason(built: Built, path: Path, new: Any) -> str | None:
    """The reason some replacements must give in an otherwise valid message; None where
    the outcome is left to the general property."""
    if not isinstance(new, JSON_TYPES) or (isinstance(new, str) and any(
            "\ud800" <= c <= "\udfff" for c in new)):
        return None  # a spliced literal, a Mongo text or a lone surrogate: parsed or not
    value, cfg = built.value, built.cfg
    if cfg.format == "native":
        if path == ("version",):  # checked right after the id, deleted or not
            ok = type(new) is int and INT64_MIN <= new <= INT64_MAX
            return None if ok else "bad_type"
        return None
    if path[:1] == ("payload",):
        value, path = value["payload"], path[1:]
    if not isinstance(value, dict) or "op" not in value:
        return None
    if path == ("op",):
        return None if isinstance(new, str) and new in VALID_OPS else "unknown_op"
    if (value["op"] in ("c", "r", "u") and len(path) == 2 and path[0] == "after"
            and isinstance(value["after"], dict) and path[1] in cfg.text_fields
            and isinstance(new, dict | list)):
        return "bad_type"  # a text field that is an object or array
    return None


@fuzz(1_000)
@given(built=small_messages, wrongs=st.lists(wrong_values, min_size=3, max_size=8))
def test_every_field_replaced_by_a_wrong_value(built: Built, wrongs: list[Any]) -> None:
    """Each field, in turn, gets each of the drawn wrong values, or is removed."""
    key = built.keys[-1]
    targets = [("value", p) for p in {*slots(built.value), *extra_slots(built)}]
    targets += [("key", p) for p in slots(key)]
    targets.sort(key=repr)
    for where, path in targets:
        for new in [DELETE, *wrongs]:
            value, key_obj = built.value, key
            try:
                if where == "value":
                    value = replaced(value, path, new)
                else:
                    key_obj = replaced(key_obj, path, new)
            except (KeyError, IndexError, TypeError, AttributeError):  # a slot not held
                continue
            raw = None if value is None else serialize(value)
            result = check("corruption", encode_key(key_obj), raw, built.cfg, built.offset)
            if where == "value" and (reason := expected_reason(built, path, new)):
                assert isinstance(result, DecodeError) and result.reason == reason, (
                    path, new, result)


# ---------------------------------------------------------------------------------------
# 3. Bytes: truncated, flipped, invalid UTF-8; arbitrary binary and JSON shapes
# ---------------------------------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
            b"\xe2\x82", b"\xc3", b"\xf0\x9f\x98"]

edits = st.lists(
    st.tuples(st.sampled_from(["cut", "flip", "splice", "drop"]), st.floats(0, 1),
              st.binary(min_size=1, max_size=3) | st.sampled_from(BAD_UTF8)),
    min_size=1, max_size=4,
)


def edited(raw: bytes, edit: tuple[str, float, bytes]) -> bytes:
    kind, where, payload = edit
    at = int(where * len(raw))
    if kind == "cut":
        return raw[:at]
    if kind == "flip":
        return raw[:at] + payload[:1] + raw[at + 1:]
    if kind == "drop":
        return raw[:at] + raw[at + len(payload):]
    return raw[:at] + payload + raw[at:]


@fuzz(1_000)
@given(built=small_messages, value_edits=edits, key_edits=edits)
def test_damaged_bytes(
    built: Built, value_edits: list[tuple[str, float, bytes]],
    key_edits: list[tuple[str, float, bytes]],
) -> None:
    """Each edit alone on the key and on the value of every encoding, then all at once."""
    for key, value in encodings(built):
        for edit in value_edits:
            if value is not None:
                check("bytes", key, edited(value, edit), built.cfg, built.offset)
        for edit in key_edits:
            if key is not None:
                check("bytes", edited(key, edit), value, built.cfg, built.offset)
        if value is not None:  # every edit at once, and the damaged value as a key
            for edit in value_edits:
                value = edited(value, edit)
            check("bytes", key, value, built.cfg, built.offset)
            check("bytes", value, None, built.cfg, built.offset)


CONFIGS = [
    debezium_settings(("id",), "auto"),
    debezium_settings(("_id",), "lsn", mongo=True),
    debezium_settings(("tenant", "id"), "ts_ms"),
    debezium_settings(("pk",), "offset"),
    native_settings("auto"),
    native_settings("offset"),
    SourceSettings(format="debezium-flat", id_fields=("id",), text_fields=("title", "body"),
                   metadata_fields=("lang", "__table")),
    SourceSettings(format="debezium-flat", id_fields=("tenant", "id"), version="lsn",
                   text_template="{title}: {body}"),
]
shape_keys = st.sampled_from(
    ["op", "before", "after", "source", "ts_ms", "payload", "schema", "id", "_id", "pk",
     "tenant", "text", "title", "body", "metadata", "version", "deleted", "lsn", "status",
     "ddl", "name", "description", "lang", "tags", "$oid", "$numberLong", "$date",
     "__deleted", "__op", "__lsn", "__source_ts_ms"]
)
shapes = st.recursive(
    json_scalars | raw_literals,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(shape_keys, inner, max_size=5),
    max_leaves=12,
)
anything = st.one_of(
    st.none(), st.binary(max_size=48), shapes.map(serialize),
    st.builds(lambda v, s: serialize(v)[: s], shapes, st.integers(0, 40)),
)


@fuzz(1_400)
@given(pairs=st.lists(st.tuples(anything, anything), min_size=1, max_size=4),
       offset=offsets)
def test_arbitrary_bytes_and_shapes(
    pairs: list[tuple[bytes | None, bytes | None]], offset: int
) -> None:
    for key, value in pairs:
        for cfg in CONFIGS:
            check("arbitrary", key, value, cfg, offset)


# ---------------------------------------------------------------------------------------
# 4. Nesting: far deeper than the recursion limit, anywhere in a message
# ---------------------------------------------------------------------------------------

DEEP_PLACES: dict[str, Callable[[Raw], tuple[Any, Any]]] = {
    "value": lambda deep: ({"id": 1}, deep),
    "after": lambda deep: (None, {"op": "c", "after": deep}),
    "after field": lambda deep: (None, {"op": "c", "after": {"id": 1, "title": deep}}),
    "metadata field": lambda deep: (None, {"op": "u", "after": {"id": 1, "lang": deep}}),
    "mongo after": lambda deep: (None, {"op": "c", "after": MongoText({"_id": 1, "tags": deep})}),
    "source": lambda deep: (None, {"op": "c", "source": deep, "after": {"id": 1}}),
    "payload": lambda deep: (None, {"schema": {}, "payload": deep}),
    "schema": lambda deep: (None, {"schema": deep, "payload": {"op": "d", "before": {"id": 1}}}),
    "key": lambda deep: (deep, {"op": "d", "before": None}),
    "key field": lambda deep: ({"id": deep}, {"op": "d", "before": None}),
    "native metadata": lambda deep: (None, {"id": 1, "metadata": {"a": deep}}),
    "native text": lambda deep: (None, {"id": 1, "text": deep}),
}


def nested(depth: int, bracket: str, closed: bool) -> Raw:
    opening, closing = {"list": ("[", "]"), "dict": ('{"a":', "}"), "mongo": (
        '{"$date":', "}")}[bracket]
    return Raw(opening * depth + ("1" + closing * depth if closed else ""))


@fuzz(300)
@given(depth=st.integers(1_000, 50_000) | st.just(10_000), place=st.sampled_from(
    sorted(DEEP_PLACES)), bracket=st.sampled_from(["list", "dict", "mongo"]),
    closed=st.booleans())
def test_deep_nesting_is_invalid_json(depth: int, place: str, bracket: str, closed: bool) -> None:
    key, value = DEEP_PLACES[place](nested(depth, bracket, closed))
    encoded = encode_key(key)
    for cfg in CONFIGS:
        result = check("nesting", encoded, serialize(value), cfg)
        parsed = place != "mongo after" or cfg.format == "debezium"  # else just a string
        if parsed and depth >= max(sys.getrecursionlimit(), 10_000):
            # The parser gives up before building it: whichever field, the message is bad.
            assert isinstance(result, DecodeError) and result.reason == "invalid_json", result


@pytest.mark.parametrize("depth", [50, 500, 900, 990])
def test_moderate_nesting_decodes_or_is_rejected_cleanly(depth: int) -> None:
    """Just under the limit: parsed, then walked again (extended JSON, metadata encoding)."""
    for build in DEEP_PLACES.values():
        for bracket in ("list", "dict", "mongo"):
            key, value = build(nested(depth, bracket, True))
            for cfg in CONFIGS:
                check("moderate nesting", encode_key(key), serialize(value), cfg)


# ---------------------------------------------------------------------------------------
# The count
# ---------------------------------------------------------------------------------------

# The generated cases counted toward MIN_CASES, per counter, by the test making them.
GENERATORS: dict[str, Callable[[], None]] = {
    "round_trip": test_valid_events_round_trip,
    "corruption": test_every_field_replaced_by_a_wrong_value,
    "bytes": test_damaged_bytes,
    "arbitrary": test_arbitrary_bytes_and_shapes,
    "nesting": test_deep_nesting_is_invalid_json,
}


def test_at_least_100000_generated_cases() -> None:
    """Every decode above went through check() and was counted. A generator that has not
    run in this session (this test alone, a -k selection, another order) runs here."""
    for counter, generate in GENERATORS.items():
        if counter not in CASES:
            generate()
    total = sum(CASES[counter] for counter in GENERATORS)
    print(f"\ndecode fuzz: {total:,} generated cases {dict(CASES)}")
    assert total >= MIN_CASES, dict(CASES)
