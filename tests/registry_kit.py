"""Debezium's PostgreSQL change events as Avro and as JSON, for the Schema Registry tests.

The schema is the one Debezium documents for a PostgreSQL table
(``../shared/data/debezium/postgresql.adoc...create-event-value.json``: the Kafka
Connect schema of ``inventory.customers``), with columns of the types whose Avro
form differs from their JSON (a ``numeric`` as Connect's ``Decimal``, a
``timestamp`` as Connect's ``Timestamp`` and as Debezium's ``MicroTimestamp``, a
``date``) and the ``transaction`` block, turned into Avro the way Confluent's
``AvroConverter`` (``AvroData``) does. Each event comes twice: the Python object
the ``AvroSerializer`` writes, and its JSON twin as ``JsonConverter`` writes it
(``schemas.enable=false``; decimals as Debezium's ``decimal.handling.mode=string``).
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from embedstream.stream.app.registry_server import SchemaRegistryServer
from embedstream.stream.config import SchemaRegistrySettings, SourceSettings
from embedstream.stream.registry import build_registry_client

TOPIC = "PostgreSQL_server.inventory.customers"
DEBEZIUM = Path(__file__).resolve().parents[1].parent / "shared/data/debezium"
CREATE_EVENT = DEBEZIUM / "postgresql.adoc.L765-L952.create-event-value.json"

_DECIMAL = "org.apache.kafka.connect.data.Decimal"
_LOGICAL = {  # Connect's logical types -> (Avro type, logicalType)
    "org.apache.kafka.connect.data.Timestamp": ("long", "timestamp-millis"),
    "org.apache.kafka.connect.data.Date": ("int", "date"),
    "org.apache.kafka.connect.data.Time": ("int", "time-millis"),
}
_PRIMITIVES = {"int8": "int", "int16": "int", "int32": "int", "int64": "long",
               "float32": "float", "float64": "double", "boolean": "boolean",
               "string": "string", "bytes": "bytes"}

EXTRA_COLUMNS = [
    {"type": "bytes", "optional": True, "name": _DECIMAL, "version": 1,
     "parameters": {"scale": "2", "connect.decimal.precision": "10"}, "field": "balance"},
    {"type": "int64", "optional": True, "name": "org.apache.kafka.connect.data.Timestamp",
     "version": 1, "field": "updated_at"},
    {"type": "int64", "optional": True, "name": "io.debezium.time.MicroTimestamp",
     "version": 1, "field": "created_at"},
    {"type": "int32", "optional": True, "name": "org.apache.kafka.connect.data.Date",
     "version": 1, "field": "signup_date"},
]
TRANSACTION = {"type": "struct", "optional": True, "name": "event.block", "version": 1,
               "field": "transaction", "fields": [
                   {"type": "string", "optional": False, "field": "id"},
                   {"type": "int64", "optional": False, "field": "total_order"},
                   {"type": "int64", "optional": False, "field": "data_collection_order"}]}

# How the customers table is read: text, metadata, filter fields.
CUSTOMERS = SourceSettings(
    id_fields=("id",), text_fields=("first_name", "last_name", "email"),
    metadata_fields=("balance", "updated_at", "created_at", "signup_date"),
    filter_fields={"balance": "float", "updated_at": "datetime"})


def connect_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """The (key, value) Connect schemas of the customers topic."""
    value = copy.deepcopy(json.loads(CREATE_EVENT.read_text())["schema"])
    fields = {f["field"]: f for f in value["fields"]}
    for image in ("before", "after"):
        fields[image]["fields"] += copy.deepcopy(EXTRA_COLUMNS)
    fields["source"]["fields"].insert(7, {"type": "string", "optional": True,
                                          "field": "sequence"})
    value["fields"].append(TRANSACTION)
    key = {"type": "struct", "optional": False,
           "name": "PostgreSQL_server.inventory.customers.Key",
           "fields": [{"type": "int32", "optional": False, "field": "id"}]}
    return key, value


def avro_schema(connect: dict[str, Any], named: set[str] | None = None) -> Any:
    """``connect`` (a Kafka Connect schema as JsonConverter writes it) in Avro, as
    Confluent's AvroData writes it: optional -> a union with null, structs ->
    records named after the Connect name, logical types annotated."""
    named = set() if named is None else named
    name = connect.get("name")
    avro: Any
    if connect["type"] == "struct":
        assert name is not None
        if name in named:  # a record is defined once, then named
            avro = name
        else:
            named.add(name)
            namespace, _, short = name.rpartition(".")
            avro = {"type": "record", "name": short, "namespace": namespace,
                    "fields": [_field(f, named) for f in connect["fields"]],
                    "connect.name": name}
    elif name == _DECIMAL:
        params = connect["parameters"]
        avro = {"type": "bytes", "scale": int(params["scale"]),
                "precision": int(params["connect.decimal.precision"]), "connect.version": 1,
                "connect.parameters": params, "connect.name": name, "logicalType": "decimal"}
    elif name in _LOGICAL:
        kind, logical = _LOGICAL[name]
        avro = {"type": kind, "connect.version": 1, "connect.name": name,
                "logicalType": logical}
    else:
        avro = _PRIMITIVES[connect["type"]]
        if name is not None:
            avro = {"type": avro, "connect.version": connect.get("version", 1),
                    "connect.name": name}
    if connect.get("optional"):
        return [avro, "null"] if connect.get("default") is not None else ["null", avro]
    return avro


def _field(connect: dict[str, Any], named: set[str]) -> dict[str, Any]:
    field = {"name": connect["field"], "type": avro_schema(connect, named)}
    if connect.get("optional"):
        field["default"] = connect.get("default")
    return field


@dataclass(frozen=True)
class Event:
    """One message: its key and value as the Avro serializer takes them and as JSON."""

    key: dict[str, Any]
    value: dict[str, Any] | None  # None: a tombstone
    json_key: bytes
    json_value: bytes | None


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def row(id_: int, first: str, last: str, balance: str | None, updated: dt.datetime | None,
        signup: dt.date | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A customers row for Avro, and as JSON."""
    avro = {"id": id_, "first_name": first, "last_name": last,
            "email": f"{first.lower()}@noanswer.org",
            "balance": None if balance is None else decimal.Decimal(balance),
            "updated_at": updated,
            "created_at": 1559033904863123 + id_, "signup_date": signup}
    as_json = {**avro, "balance": balance,
               "updated_at": None if updated is None else
               (updated - EPOCH) // dt.timedelta(milliseconds=1),
               "signup_date": None if signup is None else (signup - EPOCH.date()).days}
    return avro, as_json


def event(op: str, lsn: int, before: tuple[dict[str, Any], dict[str, Any]] | None,
          after: tuple[dict[str, Any], dict[str, Any]] | None) -> Event:
    """A Debezium change event (op c/r/u/d) of a customers row."""
    ts = 1559033904863 + lsn
    source = {"version": "2.7.0.Final", "connector": "postgresql", "name": "PostgreSQL_server",
              "ts_ms": ts, "ts_us": ts * 1000, "ts_ns": ts * 1_000_000,
              "snapshot": op == "r", "db": "postgres", "sequence": f'["{lsn - 8}","{lsn}"]',
              "schema": "public", "table": "customers", "txId": 555 + lsn, "lsn": lsn,
              "xmin": None}
    images = [image for image in (after, before) if image is not None]
    key = {"id": images[0][0]["id"]}
    transaction = {"id": f"{555 + lsn}:{lsn}", "total_order": 1, "data_collection_order": 1}
    avro = {"before": before and before[0], "after": after and after[0], "source": source,
            "transaction": transaction, "op": op, "ts_ms": ts + 5, "ts_us": (ts + 5) * 1000,
            "ts_ns": (ts + 5) * 1_000_000}
    as_json = {**avro, "before": before and before[1], "after": after and after[1]}
    return Event(key, avro, json.dumps(key).encode(), json.dumps(as_json).encode())


def tombstone(id_: int) -> Event:
    key = {"id": id_}
    return Event(key, None, json.dumps(key).encode(), None)


def customer_events() -> list[Event]:
    """Snapshot reads, creates, updates, deletes each followed by a tombstone."""
    when = dt.datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=dt.UTC)
    anne = row(1, "Anne", "Kretchmar", "12.50", when, dt.date(2019, 5, 28))
    anne2 = row(1, "Anne", "Kretchmar-Walsh", "-0.05", when + dt.timedelta(days=1),
                dt.date(2019, 5, 28))
    bob = row(2, "Bob", "Bailey", None, None, None)
    carla = row(3, "Carla", "Chavez", "99999999.99", when, dt.date(1969, 12, 31))
    dave = row(4, "Dave", "Dunne", "0.00", EPOCH, dt.date(1970, 1, 1))
    dave2 = row(4, "Dave", "Dunne-Dane", "1.10", when, dt.date(1970, 1, 2))
    return [
        event("r", 100, None, anne), event("r", 108, None, bob),
        event("c", 116, None, carla), event("c", 124, None, dave),
        event("u", 132, anne, anne2),
        event("d", 140, bob, None), tombstone(2),
        event("u", 148, dave, dave2),
        event("d", 156, carla, None), tombstone(3),
    ]


def protobuf_types() -> dict[str, Any]:
    """Message classes of two ``.proto`` files built at run time (no protoc here):
    ``shop/common.proto`` (``Source``) and ``shop/orders.proto``, which imports it
    and ``google/protobuf/timestamp.proto`` and holds ``Unused`` (index 0),
    ``Envelope`` (1) with a nested ``Value`` (an enum, a Timestamp, repeated and
    map int64 fields) and ``Key`` (2). By message name."""
    from google.protobuf import descriptor_pb2, timestamp_pb2
    from google.protobuf.descriptor_pool import DescriptorPool
    from google.protobuf.message_factory import GetMessageClass

    field = descriptor_pb2.FieldDescriptorProto
    optional, repeated = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def add(message: Any, name: str, number: int, kind: int, type_name: str = "",
            label: int = optional) -> None:
        added = message.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            added.type_name = type_name

    common = descriptor_pb2.FileDescriptorProto(name="shop/common.proto", package="shop",
                                                syntax="proto3")
    source = common.message_type.add(name="Source")
    add(source, "lsn", 1, field.TYPE_INT64)
    add(source, "ts_ms", 2, field.TYPE_INT64)
    add(source, "connector", 3, field.TYPE_STRING)

    orders = descriptor_pb2.FileDescriptorProto(
        name="shop/orders.proto", package="shop", syntax="proto3",
        dependency=["shop/common.proto", "google/protobuf/timestamp.proto"])
    orders.enum_type.add(name="Status").value.add(name="OPEN", number=0)
    orders.enum_type[0].value.add(name="SHIPPED", number=1)
    add(orders.message_type.add(name="Unused"), "x", 1, field.TYPE_STRING)
    envelope = orders.message_type.add(name="Envelope")
    value = envelope.nested_type.add(name="Value")
    add(value, "id", 1, field.TYPE_INT64)
    add(value, "title", 2, field.TYPE_STRING)
    add(value, "body", 3, field.TYPE_STRING)
    add(value, "status", 4, field.TYPE_ENUM, ".shop.Status")
    add(value, "placed", 5, field.TYPE_MESSAGE, ".google.protobuf.Timestamp")
    add(value, "tags", 6, field.TYPE_INT64, label=repeated)
    entry = value.nested_type.add(name="CountsEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, field.TYPE_STRING)
    add(entry, "value", 2, field.TYPE_INT64)
    add(value, "counts", 7, field.TYPE_MESSAGE, ".shop.Envelope.Value.CountsEntry", repeated)
    add(value, "total_cents", 8, field.TYPE_SINT64)
    add(envelope, "before", 1, field.TYPE_MESSAGE, ".shop.Envelope.Value")
    add(envelope, "after", 2, field.TYPE_MESSAGE, ".shop.Envelope.Value")
    add(envelope, "source", 3, field.TYPE_MESSAGE, ".shop.Source")
    add(envelope, "op", 4, field.TYPE_STRING)
    add(envelope, "ts_ms", 5, field.TYPE_INT64)
    add(orders.message_type.add(name="Key"), "id", 1, field.TYPE_INT64)

    pool = DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(common)
    pool.Add(orders)
    return {name: GetMessageClass(pool.FindMessageTypeByName(f"shop.{name}"))
            for name in ("Envelope", "Envelope.Value", "Key", "Source")}


# -- the registry and the serializers ---------------------------------------------------


def client_for(server: SchemaRegistryServer, **settings: Any) -> Any:
    return build_registry_client(SchemaRegistrySettings(url=server.url, timeout_s=2,
                                                        **settings))


def serializer(kind: type, client: Any, schema: Any, topic: str = TOPIC,
               field: str = MessageField.VALUE) -> Any:
    """Serialize as a producer would: ``serializer(obj)`` -> framed bytes."""
    serde = kind(schema, client) if kind is JSONSerializer else \
        kind(schema, client, {"use.deprecated.format": False}) if kind is ProtobufSerializer \
        else kind(client, schema)
    context = SerializationContext(topic, field)
    return lambda obj: serde(obj, context)


def avro_messages(server: SchemaRegistryServer,
                  topic: str = TOPIC) -> list[tuple[bytes | None, bytes | None]]:
    """The customer events, keys and values framed Avro, as AvroConverter writes them."""
    client = SchemaRegistryClient({"url": server.url})
    key_schema, value_schema = connect_schemas()
    key = serializer(AvroSerializer, client, json.dumps(avro_schema(key_schema)), topic,
                     MessageField.KEY)
    value = serializer(AvroSerializer, client, json.dumps(avro_schema(value_schema)), topic)
    return [(key(e.key), None if e.value is None else value(e.value))
            for e in customer_events()]
