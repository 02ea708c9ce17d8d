"""The Schema Registry wire format and what its deserializers give: pure, no I/O.

A Confluent-compatible Schema Registry serializer (Avro, Protobuf, JSON Schema;
Confluent, Karapace, Apicurio's ccompat API, Redpanda) writes a key or value as
the magic byte ``0``, the schema id as 4 bytes big-endian, then the payload
(Protobuf puts its message indexes before the payload). :func:`schema_id_of`
tells such a frame from JSON by its first byte: no JSON text starts with a NUL.

:class:`Deserialized` marks a key or value a deserializer has already turned
into a Python object, so the decoders skip the UTF-8 and JSON parse for it and
read it with the same rules as the JSON. :func:`to_json_like` makes what the
deserializers return look like what Kafka Connect's ``JsonConverter`` gives for
the same event, so an Avro event and its JSON twin decode alike:

* ``decimal.Decimal`` -> its exact text (as Debezium's
  ``decimal.handling.mode=string``), never a float;
* ``datetime`` (Avro ``timestamp-millis``/``-micros``, Connect's ``Timestamp``)
  -> milliseconds since the epoch, an int (a naive one is read as UTC; micros
  are floored to the millisecond);
* ``date`` (Connect's ``Date``) -> days since the epoch; ``time`` (Connect's
  ``Time``) -> milliseconds of the day;
* ``uuid.UUID`` -> its text; ``bytes`` (Avro ``bytes``, ``fixed``) -> base64
  text, as ``JsonConverter`` writes bytes;
* a non-finite float (an Avro ``double`` may hold NaN) -> its text (``"nan"``,
  ``"inf"``, ``"-inf"``): strict JSON has none, and no payload should hold one;
* a Protobuf message -> a dict as ``MessageToDict`` gives it with the ``.proto``
  field names and fields without presence printed at their defaults, but with
  64-bit integers kept as ints (``MessageToDict`` writes them as strings);
  enums as their names, ``bytes`` as base64, well-known types as their JSON form
  (a ``Timestamp`` as RFC 3339 text);
* dicts, lists and tuples recursively; str, int, bool, None and finite floats as
  they are.

Not guaranteed: anything beyond these types (a custom ``from_dict`` object) is
returned as it is, for the decoder to refuse (``bad_type``) or copy.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import struct
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["FRAME_BYTES", "MAGIC_BYTE", "Deserialized", "schema_id_of", "to_json_like"]

MAGIC_BYTE = 0
# The magic byte and the schema id; the payload (possibly empty) follows.
FRAME_BYTES = 5

_AS_THEY_ARE = frozenset({str, int, bool, type(None)})
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DATE = dt.date(1970, 1, 1)
_MS_PER_DAY = 86_400_000

# FieldDescriptor type numbers (descriptor.proto) of the 64-bit integers, which
# MessageToDict writes as strings: int64, uint64, fixed64, sfixed64, sint64.
_INT64_TYPES = frozenset({3, 4, 6, 16, 18})
_INT64_WRAPPERS = frozenset({"google.protobuf.Int64Value", "google.protobuf.UInt64Value"})


@dataclass(frozen=True, slots=True)
class Deserialized:
    """A key or value already turned into a Python object by a deserializer
    (normalised by :func:`to_json_like`): the decoders read ``value`` as they
    read parsed JSON."""

    value: Any


def schema_id_of(data: bytes | None) -> int | None:
    """The schema id of a Schema Registry frame, or None when ``data`` is not one
    (None, shorter than the frame, or not starting with the magic byte)."""
    if data is None or len(data) < FRAME_BYTES or data[0] != MAGIC_BYTE:
        return None
    schema_id: int = struct.unpack_from(">I", data, 1)[0]
    return schema_id


def to_json_like(obj: Any) -> Any:
    """``obj`` with every value a deserializer may return made JSON-like (see the
    module docstring)."""
    # The common cases first, by exact type: this runs on every field of every message.
    kind = type(obj)
    if kind in _AS_THEY_ARE:
        return obj
    if kind is dict:
        return {key if type(key) is str else str(to_json_like(key)):
                value if type(value) in _AS_THEY_ARE else to_json_like(value)
                for key, value in obj.items()}
    if isinstance(obj, str | bool | int):  # subclasses (an enum's str, say)
        return obj
    if isinstance(obj, dict):
        return {key if isinstance(key, str) else str(to_json_like(key)): to_json_like(value)
                for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json_like(value) for value in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, dt.datetime):
        return _epoch_ms(obj)
    if isinstance(obj, dt.date):
        return (obj - _EPOCH_DATE).days
    if isinstance(obj, dt.time):
        return ((obj.hour * 60 + obj.minute) * 60 + obj.second) * 1000 + obj.microsecond // 1000
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(obj)).decode("ascii")
    if hasattr(obj, "DESCRIPTOR") and hasattr(obj, "ListFields"):
        return _protobuf(obj)
    return obj


def _epoch_ms(moment: dt.datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    since = moment - _EPOCH  # exact: integer days, seconds and microseconds
    return since.days * _MS_PER_DAY + since.seconds * 1000 + since.microseconds // 1000


def _protobuf(message: Any) -> Any:
    from google.protobuf import json_format

    printed = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    return _int64s(message.DESCRIPTOR, printed)


def _int64s(descriptor: Any, printed: Any) -> Any:
    """``printed`` (MessageToDict's output for a message of ``descriptor``) with its
    64-bit integers turned back from strings into ints."""
    if not isinstance(printed, dict):
        return printed  # a well-known type printed as a scalar (Timestamp, Value...)
    for field in descriptor.fields:
        if field.name not in printed:
            continue
        value = printed[field.name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            printed[field.name] = {k: _int64_field(value_field, v) for k, v in value.items()}
        elif isinstance(value, list) and _repeated(field):
            printed[field.name] = [_int64_field(field, v) for v in value]
        else:
            printed[field.name] = _int64_field(field, value)
    return printed


def _repeated(field: Any) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.28; label is deprecated
    return bool(repeated) if repeated is not None else bool(field.label == field.LABEL_REPEATED)


def _int64_field(field: Any, value: Any) -> Any:
    if field.type in _INT64_TYPES and isinstance(value, str):
        return int(value)
    message = field.message_type
    if message is None:
        return value
    if message.full_name in _INT64_WRAPPERS and isinstance(value, str):
        return int(value)
    if message.full_name.startswith("google.protobuf."):
        return value  # Struct, Timestamp, wrappers...: their JSON form as printed
    return _int64s(message, value)
