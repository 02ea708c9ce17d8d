"""Filterable payload fields (``source.filter_fields``) and search filters: the pure part.

A filter field is copied into every chunk's payload under its own name, as its
declared type, and gets a payload index of that type in the store, so a search
can filter on it cheaply. The types are Qdrant's payload schema types:

* ``keyword``: a string (an integer is taken as its text, so ``42`` matches ``42``).
* ``integer``: an integer (an integral float or a string of one is taken too).
* ``float``: a finite number (or a string of one).
* ``bool``: ``true``/``false``, also as text, or ``0``/``1`` (MySQL's ``TINYINT(1)``).
* ``datetime``: an ISO-8601 string (without a zone: UTC) or an integer of
  milliseconds since the epoch (Debezium's ``io.debezium.time.Timestamp``). Stored
  as RFC 3339 in UTC with microseconds (``2024-05-01T12:00:00.000000Z``), which
  Qdrant's datetime index reads and which sorts as text. Debezium's
  ``MicroTimestamp`` (microseconds) and ``Date`` (days) integers are not told apart
  from milliseconds: microseconds fall past year 9999 and are refused; a ``Date``
  column must come as text (or use ``time.precision.mode`` that gives milliseconds).

A list of values is a list of that type (any element matching matches). A missing
or null field is left out. A value that cannot be read as its type makes the
message a dead letter (reason ``bad_type``, naming the field) at decode time.

Filters: conditions on filter fields, all of which must hold. From the command
line, ``field=value``, ``field!=value`` (keyword, integer, bool; and float and
datetime, as an exact value), ``field<value``, ``<=``, ``>``, ``>=`` (integer,
float, datetime). From JSON, an object ``{"category": "books", "price": {"lt":
20}}`` (operators ``eq``, ``ne``, ``lt``, ``lte``, ``gt``, ``gte``) or a list of
the command-line strings. ``!=`` keeps points without the field, as Qdrant's
``must_not`` does. A field that is not a filter field, an operator its type does
not take, or a value not of its type is a :class:`QueryError` naming the field.
The sinks translate a :class:`Filter` into their client's filter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

from embedstream.stream.errors import DecodeError, QueryError

__all__ = [
    "FIELD_TYPES",
    "Condition",
    "FieldType",
    "Filter",
    "Match",
    "Range",
    "filter_payload",
    "parse_filter",
    "parse_filter_json",
]

FieldType = Literal["keyword", "integer", "float", "bool", "datetime"]
FIELD_TYPES: tuple[FieldType, ...] = get_args(FieldType)

Bound = float | str  # a number, or an RFC 3339 datetime


@dataclass(frozen=True, slots=True)
class Match:
    """``field`` holds exactly ``value`` (a keyword, integer or bool)."""

    field: str
    value: str | int | bool


@dataclass(frozen=True, slots=True)
class Range:
    """``field`` lies within the bounds given; ``datetime``: the bounds are
    RFC 3339 strings, else numbers."""

    field: str
    datetime: bool = False
    gt: Bound | None = None
    gte: Bound | None = None
    lt: Bound | None = None
    lte: Bound | None = None


Condition = Match | Range


@dataclass(frozen=True, slots=True)
class Filter:
    """Every ``must`` condition holds and no ``must_not`` one does."""

    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.must or self.must_not)


# -- values ---------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


def _number_text(value: str) -> str:
    text = value.strip()
    if not text:
        raise ValueError("is an empty string")
    return text


def _keyword(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"is a {type(value).__name__}, not a string")


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("is a bool, not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    raise ValueError("is not an integer")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("is a bool, not a number")
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(_number_text(value))
        except ValueError:
            raise ValueError("is not a number") from None
    else:
        raise ValueError(f"is a {type(value).__name__}, not a number")
    if not math.isfinite(number):
        raise ValueError("is not a finite number")
    return number


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, int | str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("is not true or false")


def _datetime(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("is not whole epoch milliseconds")
        try:
            moment = _EPOCH + timedelta(milliseconds=int(value))
        except OverflowError:
            raise ValueError("as epoch milliseconds lies outside years 1-9999 "
                             "(epoch microseconds? send ISO-8601 text)") from None
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError("is not an ISO-8601 datetime") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    else:
        raise ValueError(f"is a {type(value).__name__}, not a datetime")
    try:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, ValueError):
        raise ValueError("lies outside years 1-9999 in UTC") from None


_COERCE = {"keyword": _keyword, "integer": _integer, "float": _float, "bool": _bool,
           "datetime": _datetime}


def _coerce(kind: FieldType, value: Any) -> Any:
    """``value`` as ``kind`` (a list element by element); ValueError says why not."""
    convert = _COERCE[kind]
    if isinstance(value, list):
        return [convert(item) for item in value]
    return convert(value)


def filter_payload(source: Mapping[str, Any],
                   fields: Mapping[str, FieldType]) -> dict[str, Any]:
    """The filter fields present (and not null) in ``source``, each as its type.

    Raises :class:`DecodeError` ``bad_type`` naming the field (not quoting the
    value) for one that cannot be read as its type."""
    payload: dict[str, Any] = {}
    for name, kind in fields.items():
        value = source.get(name)
        if value is None:
            continue
        try:
            payload[name] = _coerce(kind, value)
        except ValueError as why:
            raise DecodeError("bad_type", f"filter field {name!r} ({kind}): value {why}") from None
    return payload


# -- filters ----------------------------------------------------------------------

_OPERATORS = {"=": "eq", "!=": "ne", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}
_EXPRESSION = re.compile(r"\s*([^\s!<>=]+)\s*(!=|<=|>=|=|<|>)(.*)", re.DOTALL)
_RANGED: frozenset[FieldType] = frozenset({"integer", "float", "datetime"})


def _condition(name: str, op: str, raw: Any, fields: Mapping[str, FieldType]
               ) -> tuple[bool, Condition]:
    """One condition, and whether it must hold (else must not)."""
    kind = fields.get(name)
    if kind is None:
        known = ", ".join(sorted(fields)) or "none; set source.filter_fields"
        raise QueryError(f"filter on {name!r}: not a filter field (filter fields: {known})")
    if op not in ("eq", "ne") and kind not in _RANGED:
        raise QueryError(f"filter on {name!r}: a {kind} field takes only = and !=")
    if isinstance(raw, list | dict) or raw is None:
        raise QueryError(f"filter on {name!r}: the value must be a single {kind}")
    # An integer field's bounds may fall between integers (price < 19.5).
    as_kind: FieldType = "float" if kind == "integer" and op not in ("eq", "ne") else kind
    try:
        value = _coerce(as_kind, raw)
    except ValueError as why:
        raise QueryError(f"filter on {name!r}: value {why} ({kind} field)") from None
    if op in ("eq", "ne"):
        exact: Condition = (
            Range(name, kind == "datetime", gte=value, lte=value) if kind in ("float", "datetime")
            else Match(name, value))
        return op == "eq", exact
    return True, Range(name, kind == "datetime", **{op: value})


def _combine(conditions: Sequence[tuple[bool, Condition]]) -> Filter:
    return Filter(must=tuple(c for keep, c in conditions if keep),
                  must_not=tuple(c for keep, c in conditions if not keep))


def parse_filter(expressions: Sequence[str], fields: Mapping[str, FieldType]) -> Filter:
    """The filter of command-line expressions (``field<op>value``, ANDed)."""
    conditions = []
    for expression in expressions:
        found = _EXPRESSION.fullmatch(expression)
        if found is None:
            raise QueryError(f"filter {expression!r}: expected FIELD=VALUE, FIELD!=VALUE, "
                              "FIELD<VALUE, FIELD<=VALUE, FIELD>VALUE or FIELD>=VALUE")
        name, symbol, value = found.groups()
        conditions.append(_condition(name, _OPERATORS[symbol], value.strip(), fields))
    return _combine(conditions)


def parse_filter_json(spec: Any, fields: Mapping[str, FieldType]) -> Filter:
    """The filter of a JSON value: an object of field to value or to
    ``{operator: value}``, or a list of command-line expressions."""
    if isinstance(spec, list) and all(isinstance(item, str) for item in spec):
        return parse_filter(spec, fields)
    if not isinstance(spec, dict):
        raise QueryError("a filter is an object ({\"field\": value or {\"lt\": value}}) "
                          "or a list of FIELD<op>VALUE strings")
    conditions = []
    for name, wanted in spec.items():
        for op, value in (wanted.items() if isinstance(wanted, dict) else [("eq", wanted)]):
            if op not in _OPERATORS.values():
                raise QueryError(f"filter on {name!r}: unknown operator {op!r} "
                                  f"(one of {', '.join(_OPERATORS.values())})")
            conditions.append(_condition(name, op, value, fields))
    return _combine(conditions)
