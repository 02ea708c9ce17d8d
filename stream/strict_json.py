"""Strict reading of untrusted JSON bytes: the checks every decoder shares.

Everything here fails with :class:`~embedstream.stream.errors.DecodeError` and a reason
from :data:`REASONS`; nothing else escapes for any input.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from embedstream.stream.errors import DecodeError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "REASONS",
    "check_utf8",
    "fail",
    "finite_float",
    "int64",
    "loads",
    "reject_constant",
    "typed_field",
    "unwrap_ext",
    "utf8",
]

# Every DecodeError reason (a DLQ header and a metric label: a fixed, bounded set).
# "unexpected" means a bug here, never a valid input.
REASONS = frozenset(
    {
        "not_utf8",
        "invalid_json",
        "bad_type",
        "missing_id",
        "unknown_op",
        "missing_after",
        "missing_version",
        "unavailable_value",
        # Schema Registry framed values (embedstream.stream.registry).
        "unknown_schema",
        "schema_mismatch",
        "no_schema_registry",
        "not_framed",
        "unexpected",
    }
)

# Versions and timestamps are stored and compared as signed 64-bit integers (and a
# timestamp over it would overflow the freshness metric's float): a bigger one is none.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def fail(reason: str, detail: str) -> NoReturn:
    assert reason in REASONS, reason
    raise DecodeError(reason, detail)


def reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def finite_float(text: str) -> float:
    # 1e400 parses as inf: as unwritable (strict JSON payloads) as a NaN literal.
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text[:20]} is out of range")
    return number


def utf8(raw: bytes, what: str) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        fail("not_utf8", f"{what}: {error}")


def loads(text: str) -> Any:
    # RecursionError (absurd nesting) is turned into invalid_json by decode_message.
    try:
        return json.loads(text, parse_constant=reject_constant, parse_float=finite_float)
    except ValueError as error:
        fail("invalid_json", str(error)[:200])


def int64(value: Any, minimum: int = INT64_MIN) -> int | None:
    """``value`` if it is a 64-bit int (bools are not) at least ``minimum``, else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if minimum <= value <= INT64_MAX else None
    return None


def typed_field(doc: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """``doc[name]`` checked against ``kinds`` (bool only if named); null -> default."""
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) is not (bool in kinds) or not isinstance(value, kinds):
        fail("bad_type", f"{name} must be {' or '.join(k.__name__ for k in kinds)}")
    return value


def check_utf8(value: Any, what: str) -> None:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fail("not_utf8", f"{what} holds a lone surrogate")


def unwrap_ext(value: Any) -> Any:
    if isinstance(value, list):
        return [unwrap_ext(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        try:
            if tag == "$oid" and isinstance(inner, str):
                return inner
            if tag in ("$numberInt", "$numberLong") and isinstance(inner, str | int):
                return int(inner)
            if tag == "$numberDouble" and isinstance(inner, str | int | float):
                try:
                    number = float(inner)
                except OverflowError:  # an int too large for a float
                    number = math.inf
                return number if math.isfinite(number) else str(inner)
            if tag == "$numberDecimal":
                return str(inner)
            if tag == "$date":
                return unwrap_ext(inner)
        except ValueError:
            fail("bad_type", f"malformed extended JSON {tag}")
    return {k: unwrap_ext(v) for k, v in value.items()}
