"""Document ids from Kafka keys and row images (see :mod:`embedstream.stream.decode`
for the rules): pure, raising only DecodeError through ``fail``."""

from __future__ import annotations

import json
import math
from typing import Any

from embedstream.stream.errors import DecodeError
from embedstream.stream.strict_json import check_utf8, fail, reject_constant, unwrap_ext, utf8
from embedstream.stream.wire import Deserialized

__all__ = ["id_part", "ids_from_key", "join_id", "key_scalar", "pick", "unwrap_envelope"]

_ENVELOPE = frozenset({"schema", "payload"})
_ID_ALIASES = {"id": "_id", "_id": "id"}


def unwrap_envelope(obj: Any) -> Any:
    if isinstance(obj, dict) and "payload" in obj and obj.keys() <= _ENVELOPE:
        return obj["payload"]
    return obj


def pick(obj: dict[str, Any], fields: tuple[str, ...]) -> list[Any] | None:
    """All of ``fields`` from ``obj``, or None if any is missing or null."""
    values = []
    for name in fields:
        alias = _ID_ALIASES.get(name)
        if obj.get(name) is None and len(fields) == 1 and alias is not None:
            name = alias  # MongoDB: the key says "id" where the document says "_id"
        found = obj.get(name)
        if found is None:
            return None
        values.append(found)
    return values


def key_scalar(value: Any) -> Any:
    # MongoDB keys hold the _id as extended-JSON text: "{\"$oid\": ...}" or "\"abc\"".
    if isinstance(value, str) and value.lstrip()[:1] in ("{", '"'):
        try:
            parsed = unwrap_ext(json.loads(value, parse_constant=reject_constant))
        except (ValueError, RecursionError, DecodeError):
            return value
        if parsed is not None and not isinstance(parsed, dict | list):
            return parsed
    return value


def ids_from_key(key: bytes | Deserialized | None, fields: tuple[str, ...]) -> list[Any] | None:
    if isinstance(key, Deserialized):  # a Schema Registry key: read as its JSON would be
        parsed = unwrap_envelope(key.value)
    elif not key:
        return None
    else:
        text = utf8(key, "key")
        try:
            parsed = json.loads(text, parse_constant=reject_constant)
        except ValueError:
            # StringConverter keys: the whole key is the id.
            if len(fields) == 1 and text.strip() and text.isprintable():
                return [text]
            fail("bad_type", "key is neither JSON nor printable text")
        parsed = unwrap_envelope(parsed)
    if isinstance(parsed, dict):
        picked = pick(parsed, fields)
        return None if picked is None else [key_scalar(v) for v in picked]
    if len(fields) == 1 and parsed is not None and not isinstance(parsed, list):
        return [key_scalar(parsed)]
    return None


def id_part(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            fail("bad_type", "id is not a finite number")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int | str):
        return str(value)
    fail("bad_type", f"id value is a {type(value).__name__}, not a scalar")


def join_id(values: list[Any]) -> str:
    parts = [id_part(v) for v in values]
    doc_id = (
        parts[0]
        if len(parts) == 1
        else "/".join(p.replace("%", "%25").replace("/", "%2F") for p in parts)
    )
    check_utf8(doc_id, "id")
    return doc_id
