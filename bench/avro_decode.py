"""The cost of Avro decoding against JSON, on the same Debezium events (issue 15).

``--events`` (default 20,000) Debezium PostgreSQL change events of a ``docs`` table
(``id``, ``title``, ``text`` from the BEIR SciFact corpus in ../shared/data, a
``numeric`` column as Connect's ``Decimal``, a ``timestamp`` as Connect's
``Timestamp``), creates then updates then deletes with their tombstones, each made
twice: the JSON ``JsonConverter`` writes (``schemas.enable=false``), and framed
Avro written by confluent-kafka's ``AvroSerializer`` (key and value) against
embedstream's Schema Registry server (in-process, loopback).

Measured in the same run, decode only (no chunking, no embedding), each case
``--rounds`` times over all events in turn, the best round kept:

* ``json``: ``take_in`` on the JSON bytes (strict JSON parse + the Debezium decoder);
* ``avro``: ``take_in`` with a ``ValueReader`` (the registry's schemas already
  cached: one warm-up pass first) on the Avro bytes: ``AvroDeserializer`` for key
  and value, normalisation to JSON-like values, the same decoder;
* ``avro_read``: ``ValueReader.read`` alone (the deserializing part of ``avro``).

Every decoded event of both cases is checked to be the same change. Figures:
events/s per case and ``avro_over_json`` (Avro events/s / JSON events/s; below 1:
Avro is slower). The last stdout line is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import decimal
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from embedstream.stream.app.registry_server import SchemaRegistryServer
from embedstream.stream.config import SchemaRegistrySettings, SourceSettings
from embedstream.stream.events import Position
from embedstream.stream.intake import take_in
from embedstream.stream.plan import PreparedEvent
from embedstream.stream.registry import ValueReader, build_registry_client

from _common import SHARED_DATA, OtherLoad, log, machine

SCIFACT = SHARED_DATA / "beir" / "scifact" / "corpus.jsonl"
TOPIC = "pg.public.docs"
SOURCE = SourceSettings(id_fields=("id",), text_fields=("title", "text"),
                        metadata_fields=("price", "updated_at"),
                        filter_fields={"price": "float", "updated_at": "datetime"})
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _optional(avro: Any) -> Any:
    return ["null", avro]


# The Avro schemas Confluent's AvroConverter writes for Debezium's Connect schemas.
VALUE = {"type": "record", "name": "Value", "namespace": "pg.public.docs",
         "connect.name": "pg.public.docs.Value", "fields": [
             {"name": "id", "type": "int"}, {"name": "title", "type": "string"},
             {"name": "text", "type": _optional("string"), "default": None},
             {"name": "price", "default": None, "type": _optional({
                 "type": "bytes", "scale": 2, "precision": 10, "connect.version": 1,
                 "connect.parameters": {"scale": "2", "connect.decimal.precision": "10"},
                 "connect.name": "org.apache.kafka.connect.data.Decimal",
                 "logicalType": "decimal"})},
             {"name": "updated_at", "default": None, "type": _optional({
                 "type": "long", "connect.version": 1,
                 "connect.name": "org.apache.kafka.connect.data.Timestamp",
                 "logicalType": "timestamp-millis"})}]}
SOURCE_BLOCK = {"type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
                "connect.name": "io.debezium.connector.postgresql.Source", "fields": [
                    *({"name": n, "type": "string"} for n in ("version", "connector", "name")),
                    {"name": "ts_ms", "type": "long"},
                    {"name": "snapshot", "type": ["boolean", "null"], "default": False},
                    *({"name": n, "type": "string"} for n in ("db", "schema", "table")),
                    *({"name": n, "type": _optional("long"), "default": None}
                      for n in ("txId", "lsn", "xmin"))]}
ENVELOPE = {"type": "record", "name": "Envelope", "namespace": "pg.public.docs",
            "connect.name": "pg.public.docs.Envelope", "fields": [
                {"name": "before", "type": _optional(VALUE), "default": None},
                {"name": "after", "type": _optional("pg.public.docs.Value"), "default": None},
                {"name": "source", "type": SOURCE_BLOCK}, {"name": "op", "type": "string"},
                {"name": "ts_ms", "type": _optional("long"), "default": None}]}
KEY = {"type": "record", "name": "Key", "namespace": "pg.public.docs",
       "connect.name": "pg.public.docs.Key", "fields": [{"name": "id", "type": "int"}]}


def changes(n: int) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """``n`` (key, value) Debezium events over the SciFact documents: each document
    created, then updated (its text cut), then deleted and tombstoned, in turn."""
    with SCIFACT.open(encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle]
    lsn, made = 1000, 0
    when = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    for round_ in range(n):
        for i, doc in enumerate(docs):
            row = {"id": int(doc["_id"]), "title": doc["title"],
                   "text": doc["text"] if round_ % 3 == 0 else doc["text"][: len(doc["text"]) // 2],
                   "price": decimal.Decimal(i % 10_000) / 100,
                   "updated_at": when + dt.timedelta(seconds=lsn)}
            op = ("c", "u", "d")[round_ % 3]
            lsn += 8
            source = {"version": "2.7.0.Final", "connector": "postgresql", "name": "pg",
                      "ts_ms": 1714521600000 + lsn, "snapshot": False, "db": "docs",
                      "schema": "public", "table": "docs", "txId": lsn // 8, "lsn": lsn,
                      "xmin": None}
            yield {"id": row["id"]}, {"before": row if op == "d" else None,
                                      "after": None if op == "d" else row, "source": source,
                                      "op": op, "ts_ms": source["ts_ms"] + 3}
            made += 1
            if op == "d" and made < n:
                yield {"id": row["id"]}, None
                made += 1
            if made >= n:
                return


def as_json(obj: Any) -> Any:
    """What JsonConverter writes (decimal.handling.mode=string, Timestamp as ms)."""
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if isinstance(obj, decimal.Decimal):
        return str(obj)
    if isinstance(obj, dt.datetime):
        return (obj - _EPOCH) // dt.timedelta(milliseconds=1)
    return obj


Message = tuple[bytes | None, bytes | None]


def best_rate(messages: list[Message], run: Callable[[bytes | None, bytes | None, int], Any],
              rounds: int) -> float:
    """Events/s of the fastest of ``rounds`` passes of ``run`` over ``messages``."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for offset, (key, value) in enumerate(messages):
            run(key, value, offset)
        best = min(best, time.perf_counter() - started)
    return len(messages) / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    started, other = time.perf_counter(), OtherLoad()
    events = list(changes(args.events))
    json_messages: list[Message] = [
        (json.dumps(key).encode(), None if value is None else json.dumps(as_json(value)).encode())
        for key, value in events]
    with SchemaRegistryServer() as registry:
        producer_client = SchemaRegistryClient({"url": registry.url})
        write_key = AvroSerializer(producer_client, json.dumps(KEY))
        write_value = AvroSerializer(producer_client, json.dumps(ENVELOPE))
        key_ctx = SerializationContext(TOPIC, MessageField.KEY)
        value_ctx = SerializationContext(TOPIC, MessageField.VALUE)
        avro_messages: list[Message] = [
            (write_key(key, key_ctx), None if value is None else write_value(value, value_ctx))
            for key, value in events]
        log(f"{len(events):,} events: JSON {sum(len(v or b'') for _, v in json_messages):,} "
            f"bytes, Avro {sum(len(v or b'') for _, v in avro_messages):,} bytes (values)")
        reader = ValueReader(build_registry_client(
            SchemaRegistrySettings(url=registry.url)), "auto")

        def from_json(key: bytes | None, value: bytes | None, offset: int) -> Any:
            return take_in(key, value, Position(TOPIC, 0, offset), SOURCE, None)

        def from_avro(key: bytes | None, value: bytes | None, offset: int) -> Any:
            return take_in(key, value, Position(TOPIC, 0, offset), SOURCE, None, reader=reader)

        def read_only(key: bytes | None, value: bytes | None, offset: int) -> Any:
            return reader.read(TOPIC, key, value)

        for offset, (plain, framed) in enumerate(zip(json_messages, avro_messages, strict=True)):
            one, other_one = from_json(*plain, offset), from_avro(*framed, offset)
            assert isinstance(one, PreparedEvent) and one == other_one, (offset, one, other_one)
        fetched = len(registry.requests("/schemas/ids/"))
        log("checked: every event decodes alike; measuring")
        rates = {"json": best_rate(json_messages, from_json, args.rounds),
                 "avro": best_rate(avro_messages, from_avro, args.rounds),
                 "avro_read": best_rate(avro_messages, read_only, args.rounds)}
        assert len(registry.requests("/schemas/ids/")) == fetched == 2  # cached by id
    for name, rate in rates.items():
        log(f"  {name}: {rate:,.0f} events/s")
    result = {
        "events": len(events), "rounds": args.rounds,
        "json_events_per_s": round(rates["json"]), "avro_events_per_s": round(rates["avro"]),
        "avro_read_events_per_s": round(rates["avro_read"]),
        "avro_over_json": round(rates["avro"] / rates["json"], 3),
        "json_value_bytes": round(sum(len(v or b"") for _, v in json_messages) / len(events)),
        "avro_value_bytes": round(sum(len(v or b"") for _, v in avro_messages) / len(events)),
        "schema_fetches": fetched, "other_load_cores": other.cores(),
        "wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
