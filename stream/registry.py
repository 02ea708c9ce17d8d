"""Reading Schema Registry framed keys and values: the I/O edge of decoding.

:func:`build_registry_client` makes the one
``confluent_kafka.schema_registry.SchemaRegistryClient`` of a process from
``kafka.schema_registry``; a :class:`ValueReader` per route (its
``source.encoding``) shares it. :meth:`ValueReader.read` runs before the pure
decoders: a key or value framed as magic byte 0 + 4-byte schema id (see
:mod:`embedstream.stream.wire`) comes out as a
:class:`~embedstream.stream.wire.Deserialized` holding JSON-like data; anything
else comes out untouched, for the JSON decoders.

* Avro is read with ``AvroDeserializer`` and JSON Schema with ``JSONDeserializer``
  (validating against the writer's schema; the JSON itself is parsed strictly,
  as the JSON path does). Both read with the writer's schema found by the id:
  no subject is looked up, so no reader schema, migration or data-contract rule
  applies (not supported).
* Protobuf: ``ProtobufDeserializer`` needs a generated class, so the message
  class is built here from the registered schema, fetched with
  ``format=serialized`` (a ``FileDescriptorProto``; its references fetched the
  same way, well-known imports from the installed protobuf), picked by the
  message indexes the serializer writes after the schema id.
* Schemas are fetched once per id and process: the client caches them by id
  (a second message with an id makes no request), and each reader keeps the
  deserializer or message class made for an id. A Protobuf id takes two
  requests the first time: the schema (which tells its type) and its
  serialized form. The client's cache ignores the format, so that second one
  goes through a client of its own.

Failures, by who is at fault:

* :class:`~embedstream.stream.errors.RegistryUnavailable` (an outage: the
  caller pauses and reads the message again): the registry unreachable, timing
  out, answering 5xx, 429 or anything but 404 (a refusal such as 401 does not
  pass with time; the message says what the registry answered).
* :class:`~embedstream.stream.errors.DecodeError` (a dead letter), reasons:
  ``unknown_schema`` (the registry answers 404 for the id, or its schema is of a
  type or form that cannot be read), ``schema_mismatch`` (the payload does not
  match its schema: truncated Avro, bad Protobuf, JSON not valid against its
  JSON Schema), ``no_schema_registry`` (a framed key or value, but
  ``kafka.schema_registry`` is not configured), ``not_framed`` (``encoding:
  schema-registry`` and an unframed, non-null value), and for a JSON Schema
  payload that is not JSON the JSON path's own ``not_utf8``/``invalid_json``.

``encoding``: ``auto`` reads framed keys and values and passes the rest;
``json`` passes everything (a framed value then fails as JSON);
``schema-registry`` wants every non-null value framed (keys may be plain: a
connector often writes them with another converter). A null value stays null
(a tombstone) under every encoding.
"""

from __future__ import annotations

import base64
import struct
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from embedstream.stream.errors import ConfigError, DecodeError, RegistryUnavailable
from embedstream.stream.strict_json import loads, utf8
from embedstream.stream.wire import FRAME_BYTES, Deserialized, schema_id_of, to_json_like

if TYPE_CHECKING:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from embedstream.stream.config import SchemaRegistrySettings, Settings

__all__ = ["ENCODINGS", "ValueReader", "build_reader", "build_registry_client"]

ENCODINGS = ("auto", "json", "schema-registry")
_EXTRA = "pip install 'embedstream[schema-registry]'"
# The client's own retries, kept short: a caller backs off from an outage itself
# (the consumer pauses its partitions), so a long in-call wait only delays that.
_CLIENT_RETRIES = {"max.retries": 2, "retries.wait.ms": 200, "retries.max.wait.ms": 1000}
_RETRY_AFTER_S = 2.0

Decoder = Callable[[bytes], Any]


def build_registry_client(settings: SchemaRegistrySettings | None
                          ) -> SchemaRegistryClient | None:
    """The ``SchemaRegistryClient`` for ``settings``, or None without them. Imports the
    registry's deserializers now, so a missing extra is a :class:`ConfigError` at start,
    never a failure in the middle of a stream. Makes no request."""
    if settings is None:
        return None
    try:
        from confluent_kafka.schema_registry import (  # noqa: F401
            SchemaRegistryClient,
            avro,
            json_schema,
            protobuf,
        )
    except ImportError as error:
        raise ConfigError(f"kafka.schema_registry needs the schema-registry extra ({_EXTRA}): "
                          f"{error}") from None
    try:
        return SchemaRegistryClient({**settings.client_config(), **_CLIENT_RETRIES})
    except (ValueError, TypeError, OSError) as error:  # a bad URL, unreadable TLS files
        raise ConfigError(f"kafka.schema_registry: {error}") from None


def build_reader(settings: Settings) -> ValueReader:
    """A reader for ``settings.source.encoding`` over a client for
    ``settings.kafka.schema_registry`` (one per command: the client holds the cache)."""
    return ValueReader(build_registry_client(settings.kafka.schema_registry),
                       settings.source.encoding)


class ValueReader:
    """Keys and values as the decoders take them (see the module docstring)."""

    def __init__(self, client: SchemaRegistryClient | None, encoding: str) -> None:
        """``client``: a ``SchemaRegistryClient`` (shared), or None when no registry
        is configured. ``encoding``: ``source.encoding``."""
        if encoding not in ENCODINGS:
            raise ConfigError(f"source.encoding {encoding!r} is not one of {ENCODINGS}")
        if encoding == "schema-registry" and client is None:
            raise ConfigError("source.encoding schema-registry needs kafka.schema_registry")
        self._client = client
        self._encoding = encoding
        self._decoders: dict[int, Decoder] = {}
        self._avro: Any = None
        self._json: Any = None
        self._protobuf: _ProtobufClasses | None = None

    def read(self, topic: str, key: bytes | None, value: bytes | None
             ) -> tuple[bytes | Deserialized | None, bytes | Deserialized | None]:
        """``(key, value)`` with framed ones deserialized; raises
        :class:`RegistryUnavailable` or :class:`DecodeError` (see the module docstring).
        ``topic`` names the message in errors."""
        if self._encoding == "json":
            return key, value
        if self._encoding == "schema-registry" and value is not None \
                and schema_id_of(value) is None:
            raise DecodeError("not_framed", f"{topic}: source.encoding is schema-registry but "
                              f"the value ({len(value)} bytes) has no Schema Registry frame")
        return self._one(topic, "key", key), self._one(topic, "value", value)

    def _one(self, topic: str, what: str, data: bytes | None) -> bytes | Deserialized | None:
        schema_id = schema_id_of(data)
        if schema_id is None or data is None:
            return data
        if self._client is None:
            raise DecodeError("no_schema_registry", f"{topic}: the {what} is framed with schema "
                              f"id {schema_id}, but kafka.schema_registry is not configured")
        decoder = self._decoders.get(schema_id)
        if decoder is None:
            try:
                decoder = self._decoders[schema_id] = self._decoder(self._client, schema_id)
            except Exception as error:
                raise _fault(error, schema_id, what, payload=False) from None
        # try/except, not a context manager: this runs twice per message.
        try:
            return Deserialized(to_json_like(decoder(data)))
        except Exception as error:
            raise _fault(error, schema_id, what, payload=True) from None

    def _decoder(self, client: SchemaRegistryClient, schema_id: int) -> Decoder:
        schema = client.get_schema(schema_id)
        kind = schema.schema_type or "AVRO"
        if kind == "AVRO":
            return self._avro_deserializer()
        if kind == "JSON":
            return self._json_deserializer()
        if kind == "PROTOBUF":
            if self._protobuf is None:
                self._protobuf = _ProtobufClasses(client)
            return self._protobuf.decoder(schema_id)
        raise DecodeError("unknown_schema", f"schema id {schema_id} is of type {kind!r}, "
                          "not AVRO, PROTOBUF or JSON")

    def _avro_deserializer(self) -> Decoder:
        if self._avro is None:
            from confluent_kafka.schema_registry.avro import AvroDeserializer

            avro = AvroDeserializer(self._client, conf=_NO_SUBJECT)
            self._avro = lambda data: avro(data, None)
        decoder: Decoder = self._avro
        return decoder

    def _json_deserializer(self) -> Decoder:
        if self._json is None:
            from confluent_kafka.schema_registry.json_schema import JSONDeserializer

            json = JSONDeserializer(None, schema_registry_client=self._client, conf=_NO_SUBJECT,
                                    json_decode=_strict_json)
            self._json = lambda data: json(data, None)
        decoder: Decoder = self._json
        return decoder


def _no_subject(ctx: Any, record_name: Any) -> None:
    # The writer's schema, found by id, is the reader's: looking a subject up would
    # cost a request per topic (associations) and bring migrations and rules.
    return None


_NO_SUBJECT = {"subject.name.strategy": _no_subject}
_SCHEMA_NOT_FOUND = 40403  # Confluent's error code: the schema id is unknown


def _strict_json(raw: bytes) -> Any:
    # As the JSON path reads: no NaN, no 1e400; failures are its DecodeErrors.
    return loads(utf8(raw, "JSON Schema payload"))


def _fault(error: Exception, schema_id: int, what: str, payload: bool) -> Exception:
    """What ``error`` (raised fetching a schema or, with ``payload``, reading a
    payload) is: :class:`RegistryUnavailable` for an outage, ``unknown_schema`` for
    a 404 or an unusable schema, ``schema_mismatch`` for a payload its schema
    cannot read; our own DecodeErrors and outages as they are."""
    from confluent_kafka.schema_registry import SchemaRegistryError

    if isinstance(error, DecodeError | RegistryUnavailable):
        return error
    if isinstance(error, SchemaRegistryError):
        if error.http_status_code == 404 and error.error_code == _SCHEMA_NOT_FOUND:
            return DecodeError("unknown_schema", f"the registry does not know schema id "
                               f"{schema_id} of the {what}: {error}"[:300])
        if error.http_status_code == 404:
            # Not the registry's own "schema not found": a wrong URL path (e.g. without
            # Apicurio's /apis/ccompat/v7, or a proxy prefix). Dead-lettering every
            # framed message for it would be wrong: wait, as for an outage, and say so.
            return RegistryUnavailable(
                f"the Schema Registry URL answers 404 without a registry error code for "
                f"schema id {schema_id}: check kafka.schema_registry.url ({error})",
                _RETRY_AFTER_S)
        return RegistryUnavailable(f"Schema Registry failed for schema id {schema_id}: {error}",
                                   _RETRY_AFTER_S)
    if _transport_error(error):
        return RegistryUnavailable(f"Schema Registry unreachable (schema id {schema_id}): "
                                   f"{type(error).__name__}: {error}", _RETRY_AFTER_S)
    if not payload:
        return DecodeError("unknown_schema", f"schema id {schema_id} of the {what} cannot "
                           f"be used: {type(error).__name__}: {error}"[:300])
    return DecodeError("schema_mismatch", f"the {what} does not match schema id "
                       f"{schema_id}: {type(error).__name__}: {error}"[:300])


def _transport_error(error: Exception) -> bool:
    # The client's HTTP library (httpx2 where installed, else httpx) raises its
    # TransportError for refused, reset, timed-out and TLS-failed requests.
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)
        if module is not None:
            kinds.append(module.TransportError)
    return isinstance(error, tuple(kinds))


class _ProtobufClasses:
    """Message classes made from registered Protobuf schemas, by schema id and
    message indexes (see the module docstring)."""

    def __init__(self, client: SchemaRegistryClient) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        # Its own client: the shared one has this id cached in the default format.
        conf: dict[str, Any] = client.config()  # type: ignore[no-untyped-call]  # untyped upstream
        self._client = SchemaRegistryClient(conf)
        self._files: dict[int, tuple[Any, Any]] = {}  # id -> (pool, FileDescriptorProto)
        self._classes: dict[tuple[int, tuple[int, ...]], Any] = {}

    def decoder(self, schema_id: int) -> Decoder:
        self._files[schema_id] = self._load(schema_id)
        return lambda data: self._parse(schema_id, data)

    def _load(self, schema_id: int) -> tuple[Any, Any]:
        from google.protobuf import descriptor_pb2
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool()
        schema = self._client.get_schema(schema_id, fmt="serialized")
        root = self._add(pool, schema, f"embedstream-schema-{schema_id}.proto", set())
        proto = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(root).CopyToProto(proto)
        return pool, proto

    def _add(self, pool: Any, schema: Any, name: str, added: set[str]) -> str:
        """Add ``schema`` (serialized) as file ``name`` to ``pool``, its imports first."""
        from google.protobuf import descriptor_pb2

        try:
            proto = descriptor_pb2.FileDescriptorProto.FromString(
                base64.b64decode(schema.schema_str, validate=True))
        except Exception as error:
            raise ValueError("the registry did not serve the Protobuf schema in the serialized "
                             f"form (a base64 FileDescriptorProto): {error}") from None
        proto.name = name
        references = {ref.name: ref for ref in schema.references or []}
        for dependency in proto.dependency:
            if dependency in added:
                continue
            ref = references.get(dependency)
            if ref is not None and ref.subject is not None and ref.version is not None:
                registered = self._client.get_version(ref.subject, ref.version, True, "serialized")
                self._add(pool, registered.schema, dependency, added)
            else:
                _add_builtin(pool, dependency, added)
        pool.Add(proto)
        added.add(name)
        return name

    def _parse(self, schema_id: int, data: bytes) -> Any:
        indexes, start = _message_indexes(data, FRAME_BYTES)
        cls = self._classes.get((schema_id, indexes))
        if cls is None:
            cls = self._classes[(schema_id, indexes)] = self._class(schema_id, indexes)
        message = cls()
        message.ParseFromString(data[start:])
        return message

    def _class(self, schema_id: int, indexes: tuple[int, ...]) -> Any:
        from google.protobuf.message_factory import GetMessageClass

        pool, proto = self._files[schema_id]
        names, level = [], proto.message_type
        for index in indexes:
            if not 0 <= index < len(level):
                raise ValueError(f"message index {index} is not in schema id {schema_id}")
            names.append(level[index].name)
            level = level[index].nested_type
        full_name = ".".join(([proto.package] if proto.package else []) + names)
        return GetMessageClass(pool.FindMessageTypeByName(full_name))


def _add_builtin(pool: Any, name: str, added: set[str]) -> None:
    """A well-known import (google/protobuf/*, google/type/*, confluent/*), from the
    descriptors the installed protobuf and confluent-kafka hold, imports first."""
    import confluent_kafka.schema_registry.protobuf  # noqa: F401  (registers them)
    from google.protobuf import descriptor_pool

    try:
        found = descriptor_pool.Default().FindFileByName(name)
    except KeyError:
        raise ValueError(f"import {name!r} is neither a schema reference nor a "
                         "well-known file") from None
    for dependency in found.dependencies:
        if dependency.name not in added:
            _add_builtin(pool, dependency.name, added)
    pool.AddSerializedFile(found.serialized_pb)
    added.add(name)


def _message_indexes(data: bytes, start: int) -> tuple[tuple[int, ...], int]:
    """The message indexes after the schema id (zig-zag varints: a count, then the
    path of indexes; a count of 0 means the first message) and where the payload starts."""
    count, at = _zigzag(data, start)
    if count == 0:
        return (0,), at
    if not 0 < count <= 100:
        raise ValueError(f"{count} message indexes")
    indexes = []
    for _ in range(count):
        index, at = _zigzag(data, at)
        indexes.append(index)
    return tuple(indexes), at


def _zigzag(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise struct.error("truncated message indexes")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), at
