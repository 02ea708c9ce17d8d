"""Schema Registry framed keys and values (Avro, Protobuf, JSON Schema) written by
confluent-kafka's real serializers, served by embedstream's registry server over
HTTP, read by ValueReader and decoded by the stream's own decoders."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import threading
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField

from embedstream.bulk.kafka_source import take_in_patiently
from embedstream.stream.app.registry_server import SchemaRegistryServer
from embedstream.stream.config import SchemaRegistrySettings, Settings, SourceSettings
from embedstream.stream.errors import ConfigError, DecodeError, RegistryUnavailable
from embedstream.stream.events import ChangeEvent, Op, Position
from embedstream.stream.intake import Rejected, take_in
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.registry import ValueReader, build_reader, build_registry_client
from embedstream.stream.wire import Deserialized, schema_id_of, to_json_like

from .registry_kit import (
    CUSTOMERS,
    TOPIC,
    avro_messages,
    client_for,
    customer_events,
    protobuf_types,
    serializer,
)

AT = Position(TOPIC, 0, 7)


@pytest.fixture
def registry() -> Iterator[SchemaRegistryServer]:
    with SchemaRegistryServer() as server:
        yield server


def decoded(reader: ValueReader | None, key: bytes | None, value: bytes | None,
            source: SourceSettings = CUSTOMERS) -> ChangeEvent:
    taken = take_in(key, value, AT, source, None, reader=reader)
    assert isinstance(taken, PreparedEvent), taken
    return taken.event


# -- the wire format and what deserializers give ------------------------------------


def test_a_frame_is_told_from_json_by_its_first_byte() -> None:
    assert schema_id_of(b"\x00\x00\x01\x02\x03payload") == 0x010203
    assert schema_id_of(b"\x00\x00\x00\x00\x07") == 7  # an empty payload (an empty record)
    for plain in (None, b"", b'{"id": 1}', b"\x00\x00\x01", b"\x01\x00\x00\x00\x07x"):
        assert schema_id_of(plain) is None


def test_deserializer_types_become_what_json_converter_writes() -> None:
    moment = dt.datetime(2024, 5, 1, 12, 30, 15, 250999, tzinfo=dt.UTC)
    got = to_json_like({
        "price": decimal.Decimal("-12.50"), "at": moment, "naive": moment.replace(tzinfo=None),
        "before_epoch": dt.datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=dt.UTC),
        "day": dt.date(1970, 1, 3), "time": dt.time(1, 2, 3, 4999),
        "uuid": uuid.UUID(int=1), "raw": b"\x00\xff", "nan": float("nan"),
        "nested": [{"x": (decimal.Decimal("1E+3"), None, True, 1.5)}]})
    assert got == {
        "price": "-12.50", "at": 1714566615250, "naive": 1714566615250, "before_epoch": -1,
        "day": 2, "time": 3723004, "uuid": "00000000-0000-0000-0000-000000000001",
        "raw": "AP8=", "nan": "nan", "nested": [{"x": ["1E+3", None, True, 1.5]}]}
    json.dumps(got, allow_nan=False)  # strict JSON all through


# -- Avro: Debezium's PostgreSQL events ----------------------------------------------


def test_debezium_avro_events_decode_as_their_json_twins(
        registry: SchemaRegistryServer) -> None:
    reader = ValueReader(client_for(registry), "auto")
    events = customer_events()
    for event, (key, value) in zip(events, avro_messages(registry), strict=True):
        assert decoded(reader, key, value) == decoded(None, event.json_key, event.json_value)
    first = decoded(reader, *avro_messages(registry)[0])
    assert (first.doc_id, first.op, first.version, first.kind) == ("1", Op.UPSERT, 100, "read")
    assert first.text == "Anne\n\nKretchmar\n\nanne@noanswer.org"
    assert first.metadata == {"balance": 12.5, "updated_at": "2024-05-01T12:30:15.250000Z",
                              "created_at": 1559033904863124, "signup_date": 18044}
    kinds = [decoded(reader, k, v).kind for k, v in avro_messages(registry)]
    assert kinds == ["read", "read", "create", "create", "update", "delete", "tombstone",
                     "update", "delete", "tombstone"]


def test_a_decimal_stays_exact_text_without_a_filter_type(
        registry: SchemaRegistryServer) -> None:
    unfiltered = SourceSettings(id_fields=("id",), text_fields=("first_name",),
                                metadata_fields=("balance",))
    reader = ValueReader(client_for(registry), "auto")
    messages = avro_messages(registry)
    assert [decoded(reader, *messages[i], unfiltered).metadata for i in (2, 3, 4)] == [
        {"balance": "99999999.99"}, {"balance": "0.00"}, {"balance": "-0.05"}]


def test_a_schema_is_fetched_once_per_id_and_shared_by_readers_of_one_client(
        registry: SchemaRegistryServer) -> None:
    messages = avro_messages(registry)
    registry.reset_log()
    client = client_for(registry)
    first, second = ValueReader(client, "auto"), ValueReader(client, "schema-registry")
    for key, value in messages:
        first.read(TOPIC, key, value)
    assert [r.path for r in registry.requests()] == ["/schemas/ids/1", "/schemas/ids/2"]
    for key, value in messages:  # another route's reader: the client's cache
        second.read(TOPIC, key, value)
    assert len(registry.requests()) == 2


def test_mongodb_after_as_a_string_is_still_read(registry: SchemaRegistryServer) -> None:
    client = SchemaRegistryClient({"url": registry.url})
    schema = {"type": "record", "name": "Envelope", "namespace": "mongo.shop.items", "fields": [
        {"name": "after", "type": ["null", {"type": "string", "connect.version": 1,
                                            "connect.name": "io.debezium.data.Json"}]},
        {"name": "op", "type": "string"}, {"name": "ts_ms", "type": ["null", "long"]}]}
    value = serializer(AvroSerializer, client, json.dumps(schema))(
        {"after": '{"_id": {"$oid": "5f1e"}, "name": "lamp", "price": {"$numberDecimal": "9.5"}}',
         "op": "c", "ts_ms": 1700000000000})
    source = SourceSettings(id_fields=("_id",), text_fields=("name",),
                            metadata_fields=("price",))
    event = decoded(ValueReader(client_for(registry), "auto"), b'{"id": "5f1e"}', value, source)
    assert (event.doc_id, event.text, event.metadata) == ("5f1e", "lamp", {"price": "9.5"})


# -- Protobuf and JSON Schema ----------------------------------------------------------


def test_protobuf_values_and_keys_decode_with_their_registered_schemas(
        registry: SchemaRegistryServer) -> None:
    types = protobuf_types()
    client = SchemaRegistryClient({"url": registry.url})
    envelope = types["Envelope"](op="u", ts_ms=1700000000123)
    envelope.source.lsn, envelope.source.ts_ms = 2**40, 1700000000000
    after = envelope.after
    after.id, after.title, after.body, after.total_cents = 2**35, "Lamp", "A tall lamp.", -250
    after.status = 1
    after.placed.FromDatetime(dt.datetime(2024, 5, 1, tzinfo=dt.UTC))
    after.tags.extend([7, 2**40])
    after.counts["views"] = 2**33
    value = serializer(ProtobufSerializer, client, types["Envelope"])(envelope)
    key = serializer(ProtobufSerializer, client, types["Key"], field=MessageField.KEY)(
        types["Key"](id=2**35))
    assert value[5] != 0  # Envelope is the second message: indexes follow the id
    registry.reset_log()
    source = SourceSettings(id_fields=("id",), text_fields=("title", "body"),
                            metadata_fields=("status", "placed", "tags", "counts",
                                             "total_cents"))
    reader = ValueReader(client_for(registry), "schema-registry")
    event = decoded(reader, key, value, source)
    assert (event.doc_id, event.op, event.version, event.text) == (
        str(2**35), Op.UPSERT, 2**40, "Lamp\n\nA tall lamp.")
    assert event.metadata == {"status": "SHIPPED", "placed": "2024-05-01T00:00:00Z",
                              "tags": [7, 2**40], "counts": {"views": 2**33},
                              "total_cents": -250}
    fetched = len(registry.requests())  # the schemas, their serialized form, the reference
    assert decoded(reader, key, value, source) == event
    assert len(registry.requests()) == fetched
    assert registry.requests("/subjects/shop/common.proto/versions/")


def test_json_schema_values_are_validated_against_their_schema(
        registry: SchemaRegistryServer) -> None:
    client = SchemaRegistryClient({"url": registry.url})
    schema = json.dumps({"type": "object", "title": "Row", "required": ["id", "title"],
                         "properties": {"id": {"type": "integer"}, "title": {"type": "string"},
                                        "__deleted": {"type": "string"}}})
    write = serializer(JSONSerializer, client, schema)
    flat = SourceSettings(format="debezium-flat", text_fields=("title",))
    reader = ValueReader(client_for(registry), "auto")
    event = decoded(reader, None, write({"id": 5, "title": "Fifth", "__deleted": "false"}), flat)
    assert (event.doc_id, event.op, event.text) == ("5", Op.UPSERT, "Fifth")
    gone = decoded(reader, None, write({"id": 5, "title": "Fifth", "__deleted": "true"}), flat)
    assert gone.op is Op.DELETE
    frame = write({"id": 6, "title": "x"})[:5]
    for payload, reason in ((b'{"id": "six", "title": "x"}', "schema_mismatch"),
                            (b'{"id": 6}', "schema_mismatch"),
                            (b'{"id": 6, "title": NaN}', "invalid_json")):
        with pytest.raises(DecodeError) as failed:
            reader.read(TOPIC, None, frame + payload)
        assert failed.value.reason == reason


# -- what fails, and how ---------------------------------------------------------------


def test_an_unknown_schema_id_is_a_dead_letter_of_its_own(
        registry: SchemaRegistryServer) -> None:
    taken = take_in(None, b"\x00\x00\x00\x03\xe7" + b"\x02", AT, CUSTOMERS, None,
                    reader=ValueReader(client_for(registry), "auto"))
    assert isinstance(taken, Rejected)
    assert (taken.reason, taken.kind) == ("unknown_schema", "undecodable")
    assert "999" in taken.detail


def test_a_payload_that_does_not_match_its_schema_is_schema_mismatch(
        registry: SchemaRegistryServer) -> None:
    key, value = avro_messages(registry)[0]
    assert value is not None
    reader = ValueReader(client_for(registry), "auto")
    for broken in (value[:-9], value[:6]):
        taken = take_in(key, broken, AT, CUSTOMERS, None, reader=reader)
        assert isinstance(taken, Rejected) and taken.reason == "schema_mismatch", taken
    types = protobuf_types()
    client = SchemaRegistryClient({"url": registry.url})
    proto = serializer(ProtobufSerializer, client, types["Envelope"])(
        types["Envelope"](op="c", ts_ms=5))
    with pytest.raises(DecodeError) as failed:
        reader.read(TOPIC, None, proto[:-1])
    assert failed.value.reason == "schema_mismatch"


def test_framed_values_without_a_registry_and_plain_ones_under_schema_registry(
        registry: SchemaRegistryServer) -> None:
    key, value = avro_messages(registry)[0]
    unconfigured = take_in(key, value, AT, CUSTOMERS, None, reader=ValueReader(None, "auto"))
    assert isinstance(unconfigured, Rejected) and unconfigured.reason == "no_schema_registry"
    plain = customer_events()[0]
    strict = ValueReader(client_for(registry), "schema-registry")
    refused = take_in(plain.json_key, plain.json_value, AT, CUSTOMERS, None, reader=strict)
    assert isinstance(refused, Rejected) and refused.reason == "not_framed"
    # auto: plain JSON passes untouched; json: a frame is not read (it fails as JSON).
    auto = ValueReader(client_for(registry), "auto")
    assert auto.read(TOPIC, plain.json_key, plain.json_value) == (plain.json_key,
                                                                   plain.json_value)
    as_json = take_in(key, value, AT, CUSTOMERS, None,
                      reader=ValueReader(client_for(registry), "json"))
    assert isinstance(as_json, Rejected) and as_json.reason in ("not_utf8", "invalid_json")
    # A tombstone is a tombstone under every encoding.
    assert strict.read(TOPIC, key, None)[1] is None
    with pytest.raises(ConfigError, match=r"needs kafka\.schema_registry"):
        ValueReader(None, "schema-registry")


@pytest.mark.parametrize("drop", [False, True], ids=["503", "connection-dropped"])
def test_a_registry_outage_is_unavailable_and_the_message_reads_once_it_is_back(
        registry: SchemaRegistryServer, drop: bool) -> None:
    key, value = avro_messages(registry)[4]
    reader = ValueReader(client_for(registry), "auto")
    registry.outage(True, drop=drop)
    with pytest.raises(RegistryUnavailable) as down:
        take_in(key, value, AT, CUSTOMERS, None, reader=reader)
    assert down.value.retry_after > 0
    registry.outage(False)
    assert decoded(reader, key, value).text == "Anne\n\nKretchmar-Walsh\n\nanne@noanswer.org"


def test_an_unreachable_or_slow_registry_is_unavailable(
        registry: SchemaRegistryServer) -> None:
    key, value = avro_messages(registry)[0]
    registry.delay_s = 1.5
    slow = ValueReader(build_registry_client(SchemaRegistrySettings(
        url=registry.url, timeout_s=0.3)), "auto")
    with pytest.raises(RegistryUnavailable):
        slow.read(TOPIC, key, value)
    registry.delay_s = 0
    with SchemaRegistryServer() as gone:
        url = gone.url
    nobody = ValueReader(build_registry_client(SchemaRegistrySettings(url=url)), "auto")
    with pytest.raises(RegistryUnavailable, match="unreachable"):
        nobody.read(TOPIC, key, value)


def test_basic_auth_credentials_are_sent_and_a_refusal_is_an_outage(
        registry: SchemaRegistryServer) -> None:
    key, value = avro_messages(registry)[0]
    registry.basic_auth = ("reader", "s3cret:with-colon")
    wrong = ValueReader(client_for(registry, basic_auth_user="reader",
                                   basic_auth_password="nope"), "auto")
    with pytest.raises(RegistryUnavailable, match="401"):
        wrong.read(TOPIC, key, value)
    right = ValueReader(client_for(registry, basic_auth_user="reader",
                                   basic_auth_password="s3cret:with-colon"), "auto")
    assert isinstance(right.read(TOPIC, key, value)[1], Deserialized)


def test_the_registry_server_answers_like_confluent(registry: SchemaRegistryServer) -> None:
    client = SchemaRegistryClient({"url": registry.url})
    serializer(AvroSerializer, client, '"string"', topic="t")("x")
    with pytest.raises(Exception) as missing:
        client.get_schema(42)
    assert (missing.value.http_status_code, missing.value.error_code) == (404, 40403)
    latest = client.get_latest_version("t-value")
    assert (latest.schema_id, latest.version, latest.schema.schema_type) == (1, 1, "AVRO")
    assert client.get_subjects() == ["t-value"]
    # Registered directly (the demo does): the same schema keeps its id.
    assert registry.register("u-value", '"long"') == 2
    assert registry.register("v-value", '"long"') == 2
    assert client.get_schema(2).schema_str == '"long"'


def test_a_rebuild_waits_out_a_short_outage_and_stops_resumably_on_a_long_one(
        registry: SchemaRegistryServer) -> None:
    key, value = avro_messages(registry)[0]
    message = Message(topic=TOPIC, partition=0, offset=7, key=key, value=value)
    settings = Settings(kafka={"schema_registry": {"url": registry.url}},
                        source=CUSTOMERS.model_dump(), embed={"give_up_after_s": 1.5})
    registry.outage(True)
    with pytest.raises(RegistryUnavailable, match="run the same rebuild again"):
        take_in_patiently(message, AT, settings, None, build_reader(settings))
    back = threading.Timer(0.5, registry.outage, (False,))
    registry.outage(True)
    back.start()
    taken = take_in_patiently(message, AT, settings, None, build_reader(settings))
    back.join()
    assert isinstance(taken, PreparedEvent) and taken.event.doc_id == "1"


def test_a_wrong_registry_url_is_waited_out_and_named_not_dead_lettered() -> None:
    """A URL answering 404 without the registry's error code (a missing path prefix,
    e.g. Apicurio's /apis/ccompat/v7) is no unknown schema: dead-lettering every
    framed message for it would lose the stream's work; it is an outage naming the URL."""
    from http.server import BaseHTTPRequestHandler

    from embedstream.stream.app._threaded_server import ThreadedServer

    class NotARegistry(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>Not Found</html>")

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadedServer(NotARegistry, "127.0.0.1", 0, "not-a-registry") as server:
        reader = ValueReader(build_registry_client(SchemaRegistrySettings(url=server.address)),
                             "auto")
        framed = b"\x00\x00\x00\x00\x07" + b"\x02"
        with pytest.raises(RegistryUnavailable, match=r"kafka\.schema_registry\.url"):
            reader.read("t", None, framed)
