"""Turn one Kafka message (key and value bytes) into a change event.

:func:`decode_message` is pure (no I/O, no Kafka client) and, for *any* bytes,
raises nothing but :class:`~embedstream.stream.errors.DecodeError`, with ``reason`` one of
``not_utf8``, ``invalid_json``, ``bad_type``, ``missing_id``, ``unknown_op``,
``missing_after``, ``missing_version``, ``unavailable_value`` or ``unexpected``
(a bug here, never a valid input; the Schema Registry reasons in ``REASONS``
come from :mod:`embedstream.stream.registry`, before decoding): the sets
``REASONS`` and ``SKIP_REASONS``
(tests/test_decode_fuzz.py holds every decode to this). JSON must be strict (no
``NaN``, no number beyond a float such as ``1e400``), and ids, text and metadata
must encode as UTF-8 (no lone surrogates). Nesting too deep for the parser (about
1,000 levels) is ``invalid_json``.

A key or value a Schema Registry deserializer already read comes as a
:class:`~embedstream.stream.wire.Deserialized`: its object is read exactly as the
same JSON would be (no UTF-8 or JSON parse), with the same decoders.

Ids are stable across a key's events: one id field gives ``str(value)`` (``1004``
and ``"1004"`` give ``"1004"``; an integral float its integer text); several are
joined with ``/`` after escaping ``%``/``/`` as ``%25``/``%2F`` so composite keys
never collide. Object or array ids are ``bad_type``. A null value is a tombstone:
a delete of the key's document, kind ``tombstone``, ``version`` the offset in
``"offset"`` mode and ``-1`` otherwise, since it carries no LSN or timestamp;
what it may delete is the consumer's decision. An envelope with a null
``payload`` counts as a tombstone.

Debezium: the JsonConverter envelope ``{"schema", "payload"}`` and the bare
payload decode alike. ``op`` c/r/u upsert from ``after`` (``after`` null is
``missing_after``, e.g. a MongoDB update without full-document capture); d
deletes. t (truncate; not replayed, a known limitation) and m (logical message)
are skipped, as is any object without ``op``: schema changes, heartbeats,
transaction markers, and rows flattened by ExtractNewRecordState (read those
with ``debezium-flat``; the consumer warns when a source only ever skips).

Debezium, flattened (``format: debezium-flat``, the ExtractNewRecordState
"unwrap" transform): the value is the row itself (or a JsonConverter envelope
around it). ``__deleted`` true (boolean or the string) deletes (delete handling
``rewrite``); a null value is a tombstone (``drop``, or after a rewrite);
``__op`` (``add.fields=op``) gives the kind, ``d`` deletes, ``t``/``m`` are
skipped, others are ``unknown_op``. Version as for envelopes, from ``__lsn``
and ``__source_ts_ms`` (``add.fields=lsn,source.ts_ms``); the id from the key,
else the row; a row with neither is ``missing_id``, never skipped. ``__``
fields reach the payload only when named in ``metadata_fields``.

Text, for every format but native: ``text_template`` when set (each
``{field}`` filled as a text field is, absent or null as ``""``; a result that
is only blanks is ``""``), else ``text_fields`` as below.

* Id: ``id_fields`` from the key when it holds them all (a JSON object, an
  envelope around one, or for one field a JSON scalar or plain text), else from
  ``after``, else ``before``, so deletes with a null ``before`` (PostgreSQL's
  default REPLICA IDENTITY) still find their document.
* Text: the non-null, non-blank ``text_fields`` of ``after`` as strings, joined
  with a blank line. None present gives an upsert with text ``""``: the row
  exists with no text, so it keeps no chunks. The ``__debezium_unavailable_value``
  placeholder (unchanged TOAST column) is ``unavailable_value``, never embedded.
* Metadata: the ``metadata_fields`` present in ``after``, copied as they are,
  and the ``filter_fields`` present, each as its type (not readable as it:
  ``bad_type``; see :mod:`embedstream.stream.filters`).
* Title (``source.title_field`` set): that field of ``after`` (or the flattened
  row) read as a text field is, whitespace-trimmed; absent, null or blank gives
  no title (None). It is embedded in front of each chunk, never stored as text.
* Version: ``lsn`` = integer ``source.lsn``; ``ts_ms`` = ``source.ts_ms`` else
  top-level ``ts_ms``; ``offset`` = the Kafka offset; ``auto`` = integer
  ``source.lsn``, else ``source.ts_ms``, else the offset (a ``ts_ms`` of 0 is
  absent; so is an integer beyond signed 64 bits, which no store keeps). An
  explicit mode without its field is ``missing_version``.
* ``source_ts_ms``: top-level ``ts_ms``, else ``source.ts_ms``, else None.

MongoDB: ``after``/``before`` strings are parsed as extended JSON, unwrapping
``$oid``, ``$numberInt``/``$numberLong`` (int), ``$numberDouble`` (float;
non-finite stays a string), ``$numberDecimal`` (string) and ``$date`` (its
value). The key ``{"id": "<_id as extended JSON>"}`` is unwrapped the same way
(also a quoted JSON string), so an ObjectId gives its hex from key and ``after``
alike. Configure ``id_fields: [_id]`` or ``[id]``: with one id field, ``id`` and
``_id`` stand in for each other when the configured one is absent. Compound
``_id`` documents are ``bad_type``. Known limits of reading keys this way, for
any connector: a string id in a key that is itself JSON text (``"x"``, ``{...}``)
is unwrapped, and a plain-text key that parses as JSON is read as JSON (``1.50``
gives ``1.5``), so such ids differ from the same ids read from ``after``.

Native: ``{"id": str|int, "text": str, "metadata": {...}, "version": int,
"deleted": bool, "ts_ms": int}``, all but ``id`` optional (the key supplies a
missing id). ``version`` and ``ts_ms`` are signed 64-bit (``ts_ms`` of 0 or less is
absent). ``version`` defaults to the offset, which ``"offset"`` mode forces;
metadata is copied whole (its ``filter_fields`` as their types) but may not use a
reserved payload field; the title is ``metadata[title_field]``, read as above. A
native tombstone's key is the id as text, a JSON scalar, or ``{"id": ...}``.
"""

from __future__ import annotations

from typing import Any

from embedstream.stream._doc_ids import ids_from_key, join_id, pick, unwrap_envelope
from embedstream.stream._image_fields import image_metadata, image_text, image_title
from embedstream.stream.config import RESERVED_PAYLOAD_FIELDS, SourceSettings
from embedstream.stream.errors import DecodeError
from embedstream.stream.events import ChangeEvent, Op, Position, Skipped
from embedstream.stream.filters import filter_payload
from embedstream.stream.strict_json import (
    INT64_MAX,
    REASONS,
    check_utf8,
    fail,
    int64,
    loads,
    typed_field,
    unwrap_ext,
    utf8,
)
from embedstream.stream.wire import Deserialized

__all__ = ["REASONS", "SKIP_REASONS", "decode_message", "decode_row"]

# Every Skipped reason (counted, not an error).
SKIP_REASONS = frozenset(
    {"schema_change", "transaction", "heartbeat", "no_op", "truncate", "message"}
)

_KINDS = {"c": "create", "r": "read", "u": "update", "d": "delete"}
_SKIPPED_OPS = {"t": "truncate", "m": "message"}
_TOMBSTONE_VERSION = -1


def decode_message(
    key: bytes | Deserialized | None, value: bytes | Deserialized | None, position: Position,
    settings: SourceSettings,
) -> ChangeEvent | Skipped:
    """Decode one message; raise :class:`DecodeError` if it cannot be (see module doc)."""
    try:
        if settings.format == "native":
            return _decode_native(key, value, position, settings)
        if settings.format == "debezium-flat":
            return _decode_flat(key, value, position, settings)
        return _decode_debezium(key, value, position, settings)
    except DecodeError:
        raise
    except RecursionError:
        raise DecodeError("invalid_json", "nested too deeply") from None
    except Exception as error:  # the contract: only DecodeError escapes
        raise DecodeError("unexpected", f"{type(error).__name__}: {error}"[:300]) from error


def decode_row(row: dict[str, Any], settings: SourceSettings
               ) -> tuple[str, str, dict[str, Any], str | None]:
    """``(doc_id, text, metadata, title)`` of one row of a file (a bulk rebuild
    source), read with the stream's rules: ``id_fields`` joined as for keys and
    ``after``, the text, metadata and title as from ``after``.

    Raises :class:`DecodeError` (``missing_id``, ``bad_type``,
    ``unavailable_value``, or ``unexpected``) and nothing else."""
    try:
        ids = pick(row, settings.id_fields)
        if ids is None:
            fail("missing_id", f"row does not hold {list(settings.id_fields)}")
        return (join_id(ids), image_text(row, settings),
                image_metadata(row, settings), image_title(row, settings))
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError("unexpected", f"{type(error).__name__}: {error}"[:300]) from error


def _tombstone(
    key: bytes | Deserialized | None, position: Position, settings: SourceSettings,
    fields: tuple[str, ...],
) -> ChangeEvent:
    ids = ids_from_key(key, fields)
    if ids is None:
        fail("missing_id", f"tombstone key does not hold {list(fields)}")
    version = position.offset if settings.version == "offset" else _TOMBSTONE_VERSION
    return ChangeEvent(join_id(ids), Op.DELETE, version, position, kind="tombstone",
                       versioned=False)


def _image(payload: dict[str, Any], name: str) -> dict[str, Any] | None:
    image = payload.get(name)
    if isinstance(image, str):  # MongoDB: the document as extended-JSON text
        image = unwrap_ext(loads(image))
    if image is None or isinstance(image, dict):
        return image
    fail("bad_type", f"{name} is a {type(image).__name__}, not an object")


def _why_no_op(payload: dict[str, Any]) -> str:
    if "ddl" in payload or "tableChanges" in payload:
        return "schema_change"
    if payload.get("status") in ("BEGIN", "END"):
        return "transaction"
    if payload and payload.keys() <= {"ts_ms"}:
        return "heartbeat"
    return "no_op"


def _version(payload: dict[str, Any], source: dict[str, Any], position: Position,
             mode: str) -> tuple[int, bool]:
    """The event's version, and whether it came from the event (not its offset)."""
    lsn = int64(source.get("lsn"))
    source_ts = int64(source.get("ts_ms"), 1)
    if mode == "offset":
        return position.offset, False
    if mode == "lsn":
        if lsn is None:
            fail("missing_version", "no integer source.lsn")
        return lsn, True
    if mode == "ts_ms":
        ts = source_ts or int64(payload.get("ts_ms"), 1)
        if ts is None:
            fail("missing_version", "neither source.ts_ms nor ts_ms is set")
        return ts, True
    if lsn is not None:
        return lsn, True
    return (source_ts, True) if source_ts is not None else (position.offset, False)


def _object_value(key: bytes | Deserialized | None, value: bytes | Deserialized | None,
                  position: Position, settings: SourceSettings) -> dict[str, Any] | ChangeEvent:
    """The value's JSON object (out of a JsonConverter envelope), or the tombstone
    a null value (or a null payload) is."""
    if value is None:
        return _tombstone(key, position, settings, settings.id_fields)
    parsed = _parsed(value)
    payload = unwrap_envelope(parsed)
    if payload is None and parsed is not None:
        return _tombstone(key, position, settings, settings.id_fields)
    if not isinstance(payload, dict):
        fail("bad_type", f"value is a JSON {type(payload).__name__}, not an object")
    return payload


def _parsed(value: bytes | Deserialized) -> Any:
    """The value as parsed JSON: a deserializer's object as it is, else the bytes parsed."""
    return value.value if isinstance(value, Deserialized) else loads(utf8(value, "value"))


def _skipped_op(op: Any, field: str) -> bool:
    """Whether ``op`` (from ``field``) is one that is skipped; ``unknown_op`` if unknown."""
    if not isinstance(op, str) or op not in _KINDS.keys() | _SKIPPED_OPS.keys():
        fail("unknown_op", f"{field} {str(op)[:20]!r}")
    return op in _SKIPPED_OPS


def _decode_debezium(
    key: bytes | Deserialized | None, value: bytes | Deserialized | None, position: Position,
    settings: SourceSettings,
) -> ChangeEvent | Skipped:
    payload = _object_value(key, value, position, settings)
    if isinstance(payload, ChangeEvent):
        return payload
    op = payload.get("op")
    if op is None:
        return Skipped(_why_no_op(payload), position)
    if _skipped_op(op, "op"):
        return Skipped(_SKIPPED_OPS[op], position)
    source = typed_field(payload, "source", (dict,), {})
    after, before = _image(payload, "after"), _image(payload, "before")
    ids = ids_from_key(key, settings.id_fields)
    for image in (after, before):
        if ids is None and image is not None:
            ids = pick(image, settings.id_fields)
    if ids is None:
        fail("missing_id", f"neither key, after nor before holds {list(settings.id_fields)}")
    doc_id = join_id(ids)
    version, versioned = _version(payload, source, position, settings.version)
    ts_ms = int64(payload.get("ts_ms"), 1) or int64(source.get("ts_ms"), 1)
    if op == "d":
        return ChangeEvent(doc_id, Op.DELETE, version, position, source_ts_ms=ts_ms,
                           kind="delete", versioned=versioned)
    if after is None:
        fail("missing_after", f"op {op!r} without an after image")
    text, metadata = image_text(after, settings), image_metadata(after, settings)
    return ChangeEvent(doc_id, Op.UPSERT, version, position, text, metadata, ts_ms, _KINDS[op],
                       versioned=versioned, title=image_title(after, settings))


def _decode_flat(
    key: bytes | Deserialized | None, value: bytes | Deserialized | None, position: Position,
    settings: SourceSettings,
) -> ChangeEvent | Skipped:
    # A tombstone: ExtractNewRecordState's delete.handling.mode=drop sends only these.
    row = _object_value(key, value, position, settings)
    if isinstance(row, ChangeEvent):
        return row
    op = row.get("__op")
    if op is not None and _skipped_op(op, "__op"):
        return Skipped(_SKIPPED_OPS[op], position)
    ids = ids_from_key(key, settings.id_fields) or pick(row, settings.id_fields)
    if ids is None:
        fail("missing_id", f"neither key nor row holds {list(settings.id_fields)}")
    doc_id = join_id(ids)
    version, versioned = _flat_version(row, position, settings.version)
    ts_ms = int64(row.get("__source_ts_ms"), 1) or int64(row.get("__ts_ms"), 1)
    if _deleted_flag(row.get("__deleted")) or op == "d":  # delete.handling.mode=rewrite
        return ChangeEvent(doc_id, Op.DELETE, version, position, source_ts_ms=ts_ms,
                           kind="delete", versioned=versioned)
    text, metadata = image_text(row, settings), image_metadata(row, settings)
    return ChangeEvent(doc_id, Op.UPSERT, version, position, text, metadata, ts_ms,
                       _KINDS.get(op or "u", "update"), versioned=versioned,
                       title=image_title(row, settings))


def _deleted_flag(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    fail("bad_type", f"__deleted is {str(value)[:20]!r}, not true or false")


def _flat_version(row: dict[str, Any], position: Position, mode: str) -> tuple[int, bool]:
    """As :func:`_version`, from ``add.fields``' ``__lsn`` and ``__source_ts_ms``."""
    lsn, source_ts = int64(row.get("__lsn")), int64(row.get("__source_ts_ms"), 1)
    if mode == "lsn" and lsn is None:
        fail("missing_version", "no integer __lsn (add.fields=lsn)")
    if mode == "ts_ms" and source_ts is None:
        fail("missing_version", "no __source_ts_ms (add.fields=source.ts_ms)")
    if mode == "offset":
        return position.offset, False
    if mode != "ts_ms" and lsn is not None:
        return lsn, True
    return (source_ts, True) if source_ts is not None else (position.offset, False)


def _decode_native(
    key: bytes | Deserialized | None, value: bytes | Deserialized | None, position: Position,
    settings: SourceSettings,
) -> ChangeEvent:
    if value is None:
        return _tombstone(key, position, settings, ("id",))
    doc = _parsed(value)
    if not isinstance(doc, dict):
        fail("bad_type", f"value is a JSON {type(doc).__name__}, not an object")
    raw_id = typed_field(doc, "id", (str, int), None)
    ids = [raw_id] if raw_id is not None else ids_from_key(key, ("id",))
    if ids is None:
        fail("missing_id", "neither value nor key holds an id")
    doc_id = join_id(ids)
    version = typed_field(doc, "version", (int,), None)
    versioned = version is not None and settings.version != "offset"
    if version is not None and int64(version) is None:
        fail("bad_type", "version is not a 64-bit integer")
    if not versioned:
        version = position.offset
    ts_ms = typed_field(doc, "ts_ms", (int,), None)
    if ts_ms is not None and ts_ms > INT64_MAX:
        fail("bad_type", "ts_ms is not a 64-bit integer")
    ts_ms = int64(ts_ms, 1)  # like Debezium's: a ts_ms of 0 (or less) is absent
    if typed_field(doc, "deleted", (bool,), False):
        return ChangeEvent(doc_id, Op.DELETE, version, position, source_ts_ms=ts_ms,
                           versioned=versioned)
    text = typed_field(doc, "text", (str,), "")
    metadata = typed_field(doc, "metadata", (dict,), {})
    metadata = {**metadata, **filter_payload(metadata, settings.filter_fields)}
    clash = sorted(metadata.keys() & RESERVED_PAYLOAD_FIELDS)
    if clash:
        fail("bad_type", f"metadata keys {clash} are reserved payload fields")
    check_utf8(text, "text")
    check_utf8(metadata, "metadata")
    return ChangeEvent(doc_id, Op.UPSERT, version, position, text, metadata, ts_ms,
                       versioned=versioned, title=image_title(metadata, settings))
