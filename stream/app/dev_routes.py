"""The routes of ``embedstream dev``: beside the pages (enveloped JSON), a shop's
tables as rows flattened by ExtractNewRecordState (one topic per table, read by
a topic pattern) and support tickets as Debezium's Avro through a Schema
Registry (the small one in :mod:`embedstream.stream.app.registry_server`), each
into its own collection, all served by one consumer group.

The rows are made up here (a handful each); the change events are the ones the
connectors would write: creates, an update and a delete in each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import yaml  # type: ignore[import-untyped]  # from pydantic-settings[yaml]; no stubs here

from embedstream.stream.app.devdata import DevMessage
from embedstream.stream.filters import FieldType, parse_filter
from embedstream.stream.store import Sink

__all__ = ["SHOP_TOPICS", "TICKETS_TOPIC", "avro_tickets", "flattened_rows", "routes_config",
           "show_routes"]

SHOP_TOPICS = ("dev.shop.products", "dev.shop.books")
TICKETS_TOPIC = "dev.crm.tickets"
_FILTERS: dict[str, FieldType] = {"category": "keyword", "price": "float"}

# (table, id, name, description, category, price)
_ROWS = [
    ("products", "p1", "Storm shell jacket", "A waterproof, breathable jacket for hiking in "
     "heavy rain, with taped seams and a hood.", "outdoor", 89.0),
    ("products", "p2", "Alpine down parka", "A warm waterproof parka for winter "
     "mountaineering, filled with goose down.", "outdoor", 249.0),
    ("products", "p3", "Espresso grinder", "A burr grinder for espresso, 40 grind settings.",
     "kitchen", 129.0),
    ("products", "p4", "Trail running shoes", "Light shoes with a grippy sole for muddy "
     "trails.", "outdoor", 74.5),
    ("books", "b1", "Designing Data-Intensive Applications", "Replication, partitioning, "
     "stream processing and change data capture, explained.", "books", 42.0),
    ("books", "b2", "The Rain Walker's Handbook", "Hiking in wet weather: clothing, "
     "layering and waterproof gear.", "books", 18.0),
]
_TICKETS = [
    ("t1", "Refund for a damaged order", "My parcel arrived crushed and the grinder inside is "
     "broken. I would like a refund or a replacement."),
    ("t2", "Change my delivery address", "Please send my order to my office instead of my "
     "home address."),
    ("t3", "Jacket leaks at the seams", "After two hours of rain the jacket let water in at "
     "the shoulder seams."),
    ("t4", "Invoice with VAT number", "I need an invoice with our company's VAT number for "
     "the last order."),
]


def routes_config(pages_topic: str, avro: bool) -> list[dict[str, Any]]:
    """The demo's routes (as in a config file)."""
    routes: list[dict[str, Any]] = [
        {"name": "pages", "topics": [pages_topic], "collection": "pages",
         "source": {"format": "debezium", "text_fields": ["text"], "metadata_fields": ["commit"]}},
        {"name": "shop", "topic_pattern": r"^dev\.shop\.[a-z_]+$", "collection": "products",
         "source": {"format": "debezium-flat", "text_fields": ["name", "description"],
                    "filter_fields": _FILTERS, "version": "lsn"}},
    ]
    if avro:
        routes.append({"name": "tickets", "topics": [TICKETS_TOPIC], "collection": "tickets",
                       "source": {"encoding": "schema-registry",
                                  "text_template": "{subject}\n\n{body}"}})
    return routes


# Document BM25 vectors beside the chunks in every collection: searches fuse both.
RETRIEVAL: dict[str, Any] = {"sparse": "bm25"}


def print_config(routes: list[dict[str, Any]], registry_url: str | None) -> None:
    shown: dict[str, Any] = {"routes": routes, "retrieval": RETRIEVAL}
    if registry_url:
        shown = {"kafka": {"schema_registry": {"url": registry_url}}, **shown}
    class Dumper(yaml.SafeDumper):  # type: ignore[misc]  # untyped base
        pass

    def text(dumper: Any, value: str) -> Any:
        # "{subject}\n\n{body}" on one line, as it would be written in a config file.
        return dumper.represent_scalar("tag:yaml.org,2002:str", value,
                                       style='"' if "\n" in value else None)

    Dumper.add_representer(str, text)
    print(f"config (one consumer group, {len(routes)} routes, {len(routes)} collections):")
    dumped = yaml.dump(shown, Dumper=Dumper, sort_keys=False, width=100,
                       default_flow_style=None)
    for line in dumped.splitlines():
        print(f"  {line}")


def flattened_rows() -> list[tuple[str, DevMessage]]:
    """(topic, message) of the shop's rows as ExtractNewRecordState writes them
    (``delete.handling.mode=rewrite``, ``add.fields=op,lsn,source.ts_ms``): creates,
    a price change, and a product withdrawn (``__deleted``, then a tombstone)."""
    lsn, now = 5_000, int(time.time() * 1000)
    out: list[tuple[str, DevMessage]] = []

    def row(table: str, doc: str, values: dict[str, Any], op: str, deleted: bool) -> None:
        nonlocal lsn
        lsn += 8
        value = {"id": doc, **values, "__op": op, "__lsn": lsn, "__source_ts_ms": now,
                 "__table": table, "__deleted": "true" if deleted else "false"}
        key = json.dumps({"id": doc}).encode()
        text = None if deleted else f"{values['name']}\n\n{values['description']}"
        out.append((f"dev.shop.{table}", DevMessage(doc, key, json.dumps(value).encode(), text)))
        if deleted:
            out.append((f"dev.shop.{table}", DevMessage(doc, key, None, None)))

    for table, doc, name, description, category, price in _ROWS:
        row(table, doc, {"name": name, "description": description, "category": category,
                         "price": price}, "c", False)
    _, doc, name, description, category, price = _ROWS[0]
    row("products", doc, {"name": name, "description": description, "category": category,
                          "price": 79.0}, "u", False)  # on sale
    _, doc, name, description, category, price = _ROWS[2]
    row("products", doc, {"name": name, "description": description, "category": category,
                          "price": price}, "d", True)  # withdrawn
    return out


_TICKET_SCHEMA = {"type": "record", "name": "Value", "namespace": "dev.crm.tickets", "fields": [
    {"name": "id", "type": "string"}, {"name": "subject", "type": "string"},
    {"name": "body", "type": ["null", "string"], "default": None}]}
_SOURCE_SCHEMA = {
    "type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
    "fields": [{"name": "connector", "type": "string"}, {"name": "db", "type": "string"},
               {"name": "table", "type": "string"}, {"name": "ts_ms", "type": "long"},
               {"name": "lsn", "type": ["null", "long"], "default": None}]}
_ENVELOPE = {"type": "record", "name": "Envelope", "namespace": "dev.crm.tickets", "fields": [
    {"name": "before", "type": ["null", _TICKET_SCHEMA], "default": None},
    {"name": "after", "type": ["null", "dev.crm.tickets.Value"], "default": None},
    {"name": "source", "type": _SOURCE_SCHEMA}, {"name": "op", "type": "string"},
    {"name": "ts_ms", "type": ["null", "long"], "default": None}]}
_KEY = {"type": "record", "name": "Key", "namespace": "dev.crm.tickets",
        "fields": [{"name": "id", "type": "string"}]}


def avro_tickets(registry_url: str) -> list[tuple[str, DevMessage]]:
    """The tickets as Debezium's AvroConverter writes them (schemas registered under
    ``dev.crm.tickets-key``/``-value``): creates, an update, a delete and its tombstone."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    client = SchemaRegistryClient({"url": registry_url})
    values, keys = (AvroSerializer(client, json.dumps(schema)) for schema in (_ENVELOPE, _KEY))
    value_ctx = SerializationContext(TICKETS_TOPIC, MessageField.VALUE)
    key_ctx = SerializationContext(TICKETS_TOPIC, MessageField.KEY)
    lsn, now = 9_000, int(time.time() * 1000)
    out: list[tuple[str, DevMessage]] = []

    def event(op: str, doc: str, after: dict[str, Any] | None) -> None:
        nonlocal lsn
        lsn += 8
        envelope = {"before": None if op != "d" else {"id": doc, "subject": "", "body": None},
                    "after": after, "op": op, "ts_ms": now,
                    "source": {"connector": "postgresql", "db": "crm", "table": "tickets",
                               "ts_ms": now, "lsn": lsn}}
        key = keys({"id": doc}, key_ctx)
        text = f"{after['subject']}\n\n{after['body']}" if after else None
        out.append((TICKETS_TOPIC, DevMessage(doc, key, values(envelope, value_ctx), text)))
        if op == "d":
            out.append((TICKETS_TOPIC, DevMessage(doc, key, None, None)))

    for doc, subject, body in _TICKETS:
        event("c", doc, {"id": doc, "subject": subject, "body": body})
    doc, subject, body = _TICKETS[2]
    event("u", doc, {"id": doc, "subject": subject,
                     "body": f"{body} Update: the replacement jacket is dry."})
    event("d", _TICKETS[3][0], None)  # closed and removed
    return out


def show_routes(sinks: dict[str, Sink], embed: Any,
                expected: dict[str, dict[str, str | None]]) -> bool:
    """Search the shop (with a filter) and the tickets; True when each collection
    holds exactly its live rows."""
    ok = True
    for route, collection in (("shop", "products"), ("tickets", "tickets")):
        if route not in sinks:
            continue
        live = {doc for doc, text in expected[route].items() if text is not None}
        held = {str(point.payload["doc_id"]) for point in sinks[route].points()}
        print(f"\n  {collection}: {len(held)} documents (expected {len(live)})")
        ok &= held == live
    queries: list[tuple[str, str, Sequence[str]]] = [
        ("shop", "waterproof jacket for rain", ()),
        ("shop", "waterproof jacket for rain", ("category=outdoor", "price<100")),
        ("tickets", "customer wants their money back", ()),
    ]
    for route, query, filters in queries:
        if route not in sinks:
            continue
        [vector] = embed([query])
        found = parse_filter(filters, _FILTERS) if filters else None
        hits = sinks[route].search(vector.tolist(), limit=3, filter=found)
        shown = f" --filter {' --filter '.join(filters)}" if filters else ""
        print(f'\n  search --route {route} "{query}"{shown}')
        for hit in hits:
            text = " ".join(str(hit.payload["text"]).split())
            extra = ("" if "price" not in hit.payload else
                     f"  [{hit.payload.get('category')}, {hit.payload.get('price')}]")
            print(f"    {hit.score:.3f}  {hit.payload['doc_id']}  {text[:70]}{extra}")
    return ok
