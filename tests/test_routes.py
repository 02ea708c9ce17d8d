"""Routes: many topics to many collections, one consumer group.

The rules (which route a topic belongs to, what a routes config may say) are
checked directly; the whole is checked through the real broker and store, with
the consumer run as the ``embedstream consume`` command and SIGKILLed mid-stream.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, TopicPartition

from embedstream.sinks.qdrant_edge import QdrantEdgeSink
from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.app.registry_server import SchemaRegistryServer
from embedstream.stream.config import KafkaSettings, RouteSettings, Settings, load_settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.routing import TopicRouter

from .streamkit import create_topic, produce, unique, wait_for
from .test_flat_stream import flattened

Message = tuple[bytes | None, bytes | None]


def route(name: str, **fields: Any) -> RouteSettings:
    return RouteSettings(name=name, collection=fields.pop("collection", name), **fields)


# -- which route a topic belongs to ------------------------------------------------------


def test_a_named_topic_beats_any_pattern_and_the_first_matching_pattern_wins() -> None:
    named = route("named", topics=["db1.shop.orders"])
    first = route("first", topic_pattern=r"db1\.shop\..*")
    second = route("second", topic_pattern=r"^db1\..*$")
    router = TopicRouter([first, second, named], KafkaSettings())
    assert router.route("db1.shop.orders") is named
    assert router.route("db1.shop.items") is first
    assert router.route("db1.crm.notes") is second
    assert router.route("db2.crm.notes") is None
    assert router.route("xdb1.shop.items") is None, "a pattern is anchored at the start"
    assert router.subscription() == ["db1.shop.orders", r"^db1\.shop\..*", r"^db1\..*$"]


def test_dead_letter_and_internal_topics_are_never_routed_by_a_pattern() -> None:
    everything = route("all", topic_pattern=".*")
    router = TopicRouter([everything], KafkaSettings())
    assert router.route("db1.shop.items") is everything
    assert router.route("db1.shop.items.dlq") is None
    assert router.route("__consumer_offsets") is None
    shared = TopicRouter([everything], KafkaSettings(dlq_topic="dead-letters"))
    assert shared.route("dead-letters") is None
    assert shared.route("db1.shop.items.dlq") is None, "default-named ones stay DLQs too"
    assert router.topics_of(everything, ["b", "a", "a.dlq", "__x"]) == ["a", "b"]


def test_a_pattern_routes_topics_resolve_as_the_consumer_routes_them() -> None:
    # What `rebuild --route shop` and the dlq commands read: not the topic another
    # route names, nor one an earlier pattern takes.
    orders = route("orders", topics=["db.shop.orders"])
    audit = route("audit", topic_pattern=r"db\.shop\.audit_.*")
    shop = route("shop", topic_pattern=r"db\.shop\..*")
    router = TopicRouter([orders, audit, shop], KafkaSettings())
    existing = ["db.shop.orders", "db.shop.items", "db.shop.audit_1", "db.shop.items.dlq"]
    assert router.topics_of(shop, existing) == ["db.shop.items"]
    assert router.topics_of(audit, existing) == ["db.shop.audit_1"]


# -- what a routes config may say --------------------------------------------------------


ROUTES = [{"name": "pages", "topics": ["t.pages"], "collection": "pages"},
          {"name": "shop", "topic_pattern": r"db1\.shop\..*", "collection": "products",
           "source": {"format": "debezium-flat", "text_fields": ["title"]}}]


def test_each_route_narrows_the_settings_to_its_topics_source_and_collection() -> None:
    settings = Settings(routes=ROUTES)
    shop = settings.for_route("shop")
    assert shop.for_route(None) == shop, "a narrowed tree serves its one route"
    assert settings.for_route("products") == shop, "a route is also found by its collection"
    assert shop.kafka.topics == () and shop.kafka.topic_pattern == r"db1\.shop\..*"
    assert shop.source.format == "debezium-flat" and shop.sink.collection == "products"
    assert shop.route_name() == "shop"
    pages = settings.for_route("pages")
    assert pages.kafka.topics == ("t.pages",) and pages.source.format == "debezium"
    with pytest.raises(ConfigError, match=r"--route.*pages, shop"):
        settings.for_route(None)
    with pytest.raises(ConfigError, match=r"no route .*'nope'.*shop -> products"):
        settings.for_route("nope")


def test_without_routes_the_top_level_settings_are_the_one_default_route() -> None:
    settings = Settings(kafka={"topics": ["a", "b"]}, sink={"collection": "docs"},
                        source={"text_fields": ["body"]})
    [default] = settings.all_routes()
    assert (default.name, default.topics, default.collection) == ("default", ("a", "b"), "docs")
    assert default.source.text_fields == ("body",)
    assert settings.for_route(None) == settings and settings.route_name() == "default"


@pytest.mark.parametrize(("change", "error"), [
    ({"routes": [ROUTES[0], {**ROUTES[1], "name": "pages"}]}, "name \\['pages'\\]"),
    ({"routes": [ROUTES[0], {**ROUTES[1], "collection": "pages"}]}, "collection \\['pages'\\]"),
    ({"routes": [ROUTES[0], {"name": "b", "topics": ["t.pages"], "collection": "b"}]},
     "'t.pages' is in routes pages and b"),
    ({"routes": [{"name": "x", "collection": "x"}]}, "topics or topic_pattern"),
    ({"routes": [{"name": "x", "collection": "x", "topics": ["a"], "topic_pattern": "a"}]},
     "topics or topic_pattern"),
    ({"routes": [{"name": "x", "collection": "x", "topic_pattern": "a("}]},
     "not a regular expression"),
    ({"routes": [{"name": "a b", "collection": "x", "topics": ["a"]}]}, "routes.0.name"),
    ({"routes": [{"name": "x", "collection": "../x", "topics": ["a"]}]}, "collection name"),
    ({"routes": ROUTES, "kafka": {"topics": ["other"]}}, "kafka.topics in each route"),
    ({"routes": [{"name": "none", "topics": ["a"], "collection": "x"}]},
     "'none' is kept for messages no route takes"),
    ({"routes": [{"name": "x", "topics": ["t" * 240], "collection": "x"}]},
     "the dead-letter topic of 'tttt"),
    ({"routes": ROUTES, "source": {"format": "native"}}, "source in each route"),
    ({"routes": ROUTES, "sink": {"collection": "docs"}}, "sink.collection in each route"),
])
def test_a_routes_config_that_cannot_mean_one_thing_is_refused_at_load(
        tmp_path: Any, change: dict[str, Any], error: str) -> None:
    config = tmp_path / "embedstream.yaml"
    config.write_text(json.dumps(change))
    with pytest.raises(ConfigError, match=error):
        load_settings(config)


# -- change events of three kinds ---------------------------------------------------------


WORDS = ["tide", "moon", "orbit", "salt", "harbour", "river", "delta", "glacier", "basalt",
         "lichen", "fjord", "estuary", "plume", "shoal", "marsh", "reef", "current", "dune",
         "aquifer", "cirque", "moraine"]


def envelope_events(rng: random.Random, prefix: str, n_docs: int, n_events: int,
                    first_lsn: int = 1_000) -> tuple[list[tuple[str, dict[str, Any] | None]],
                                                    dict[str, str]]:
    """Debezium change events (creates, updates, deletes each followed by a tombstone)
    of ``n_docs`` rows, as (doc id, envelope or None for a tombstone); the texts the
    store must hold at the end."""
    events: list[tuple[str, dict[str, Any] | None]] = []
    live: dict[str, str] = {}
    lsn = first_lsn
    for n in range(n_events):
        doc = f"{prefix}{rng.randrange(n_docs)}"
        lsn += rng.randrange(1, 5)
        source = {"connector": "postgresql", "name": "db1", "ts_ms": 1_700_000_000_000 + n,
                  "db": "shop", "schema": "public", "table": prefix, "lsn": lsn}
        if doc in live and rng.random() < 0.2:
            before = {"id": doc, "title": "old", "body": live.pop(doc)}
            events.append((doc, {"before": before, "after": None, "source": source, "op": "d",
                                 "ts_ms": source["ts_ms"]}))
            events.append((doc, None))
            continue
        body = f"{prefix} row {doc}, revision {n}. " + " ".join(rng.sample(WORDS, 8))
        live[doc] = body
        events.append((doc, {"before": None, "after": {"id": doc, "title": f"T{n}", "body": body},
                             "source": source, "op": "u" if n else "c",
                             "ts_ms": source["ts_ms"]}))
    return events, live


def avro_debezium(registry_url: str, topic: str,
                  events: list[tuple[str, dict[str, Any] | None]],
                  extra_field: str | None = None) -> list[Message]:
    """The events as Debezium's AvroConverter writes them for a PostgreSQL table
    (TopicNameStrategy subjects ``<topic>-key`` and ``<topic>-value``);
    ``extra_field``: a column added to the table (a new schema version), null in every row."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    namespace = topic.replace("-", "_")
    row = {"type": "record", "name": "Value", "namespace": namespace, "fields": [
        {"name": "id", "type": "string"},
        {"name": "title", "type": ["null", "string"], "default": None},
        {"name": "body", "type": ["null", "string"], "default": None},
        *([{"name": extra_field, "type": ["null", "string"], "default": None}]
          if extra_field else [])]}
    source = {"type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
              "fields": [{"name": n, "type": "string"} for n in
                         ("connector", "name", "db", "schema", "table")]
              + [{"name": "ts_ms", "type": "long"},
                 {"name": "lsn", "type": ["null", "long"], "default": None}]}
    envelope = {"type": "record", "name": "Envelope", "namespace": namespace, "fields": [
        {"name": "before", "type": ["null", row], "default": None},
        {"name": "after", "type": ["null", f"{namespace}.Value"], "default": None},
        {"name": "source", "type": source},
        {"name": "op", "type": "string"},
        {"name": "ts_ms", "type": ["null", "long"], "default": None}],
        "connect.name": f"{namespace}.Envelope"}
    key_schema = {"type": "record", "name": "Key", "namespace": namespace,
                  "fields": [{"name": "id", "type": "string"}]}
    client = SchemaRegistryClient({"url": registry_url})
    values = AvroSerializer(client, json.dumps(envelope))
    keys = AvroSerializer(client, json.dumps(key_schema))
    value_ctx = SerializationContext(topic, MessageField.VALUE)
    key_ctx = SerializationContext(topic, MessageField.KEY)
    def with_extra(image: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if image is None or not extra_field else {**image, extra_field: None}

    def record(event: dict[str, Any]) -> dict[str, Any]:
        if not extra_field:
            return event
        return {**event, "before": with_extra(event["before"]), "after": with_extra(event["after"])}

    return [(keys({"id": doc}, key_ctx),
             None if event is None else values(record(event), value_ctx))
            for doc, event in events]


def as_json(events: list[tuple[str, dict[str, Any] | None]]) -> list[Message]:
    return [(json.dumps({"id": doc}).encode(),
             None if event is None else json.dumps(event).encode()) for doc, event in events]


# -- three routes over five topics, through the real broker and store -------------------


def stored_texts(store: Path, collection: str) -> dict[str, str]:
    """Each document's chunks, in order, joined: what the store holds of it."""
    sink = QdrantEdgeSink(store, collection)
    sink.open(None)
    try:
        chunks: dict[str, list[tuple[int, int, int, str]]] = {}
        for point in sink.points():
            p = point.payload
            chunks.setdefault(str(p["doc_id"]), []).append(
                (int(p["chunk_index"]), int(p["start"]), int(p["end"]), str(p["text"])))
    finally:
        sink.close()
    return {doc: " ".join(text for *_, text in sorted(parts)) for doc, parts in chunks.items()}


def assert_holds(store: Path, collection: str, live: dict[str, str]) -> None:
    stored = stored_texts(store, collection)
    assert set(stored) == set(live), f"{collection}: exactly the live documents"
    for doc, text in live.items():
        assert " ".join(stored[doc].split()) == " ".join(text.split()), \
            f"{collection}/{doc}: the last revision's text"


class Feed(threading.Thread):
    """Produces each topic's messages in order, interleaved, ``per_s`` a second. The
    last fifth waits for :attr:`release`, so whatever a loaded machine does to the
    timing, the consumer is killed while events are still arriving."""

    def __init__(self, bootstrap: str, messages: dict[str, list[Message]],
                 per_s: float) -> None:
        super().__init__(name="feed", daemon=True)
        self.servers, self.per_s = bootstrap, per_s
        self.items = [(topic, m) for i in range(max(map(len, messages.values())))
                       for topic, ms in messages.items() if i < len(ms) for m in [ms[i]]]
        self.release = threading.Event()

    def run(self) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.servers, "linger.ms": 5})
        hold_at = len(self.items) * 4 // 5
        for index, (topic, (key, value)) in enumerate(self.items):
            if index == hold_at:
                producer.flush(30)
                self.release.wait(300)
            producer.produce(topic, key=key, value=value)
            producer.poll(0)
            time.sleep(1 / self.per_s)
        assert producer.flush(30) == 0


def consume_process(config_file: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "consume",
         "--config", str(config_file)],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def registry() -> Iterator[SchemaRegistryServer]:
    with SchemaRegistryServer() as server:
        yield server


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_three_routes_over_five_topics_each_collection_equals_its_oracle(
        broker: LocalBroker, registry: SchemaRegistryServer, tiny_model_dir: Path,
        tmp_path: Path) -> None:
    bootstrap, rng, prefix = broker.bootstrap_servers, random.Random(5), unique("rt")
    # Route "pages": enveloped JSON on two named topics.
    pages: dict[str, list[Message]] = {}
    pages_live: dict[str, str] = {}
    for part in ("a", "b"):
        events, live = envelope_events(rng, f"page{part}", 8, 70)
        pages[f"{prefix}.pages.{part}"] = as_json(events)
        pages_live.update(live)
    # Route "shop": flattened JSON (ExtractNewRecordState), topics by pattern.
    shop: dict[str, list[Message]] = {}
    shop_live: dict[str, str] = {}
    for table, mode in (("books", "rewrite"), ("films", "drop"), ("music", "rewrite")):
        messages, live = flattened(rng, mode, add_fields=True, n_docs=8, n_events=70)
        shop[f"{prefix}.shop.{table}"] = [
            (json.dumps({"id": f"{table}-{json.loads(k or b'{}')['id']}"}).encode(), v)
            for k, v in messages]
        shop_live.update({f"{table}-{doc}": text for doc, text in live.items()})
    # Route "notes": Debezium's Avro through the Schema Registry.
    note_events, notes_live = envelope_events(rng, "note", 10, 90)
    notes_topic = f"{prefix}.crm.notes"
    late = f"{prefix}.shop.music"  # created once the consumer runs: the pattern picks it up

    produced = {**pages, **shop, notes_topic: avro_debezium(registry.url, notes_topic, note_events)}
    for topic in produced:
        if topic != late:
            create_topic(bootstrap, topic, partitions=2)
    # The stream arrives while the consumer runs (~20 s), so both kills land mid-stream.
    feed = Feed(bootstrap, {t: m for t, m in produced.items() if t != late}, per_s=20.0)
    # Flattened rows keep their ids in the key, which the route reads ids from.
    config = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": unique("g"),
                  "schema_registry": {"url": registry.url},
                  "options": {"session.timeout.ms": 6000,
                              "topic.metadata.refresh.interval.ms": 1000}},
        "routes": [
            {"name": "pages", "topics": sorted(pages), "collection": "pages",
             "source": {"text_fields": ["body"]}},
            {"name": "shop", "topic_pattern": rf"^{re.escape(prefix)}\.shop\.[a-z]+$",
             "collection": "products",
             "source": {"format": "debezium-flat", "text_fields": ["title", "body"],
                        "version": "lsn"}},
            {"name": "notes", "topics": [notes_topic], "collection": "notes",
             "source": {"text_fields": ["body"], "encoding": "schema-registry"}},
        ],
        # A fixed backend: measuring the candidates (embed.backend auto) inside the
        # killed processes would stall them while the paced feed runs out.
        "embed": {"model": str(tiny_model_dir), "max_batch_tokens": 512,
                  "backend": "torch", "precision": "fp32"},
        "sink": {"path": str(tmp_path / "store"), "flush_interval_ms": 100},
        "metrics": {"enabled": True, "port": free_port()},
    }
    config_file = tmp_path / "embedstream.yaml"
    config_file.write_text(yaml.safe_dump(config))
    load_settings(config_file)

    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": config["kafka"]["group_id"]})
    partitions = [TopicPartition(t, p) for t in produced for p in range(2)]

    def progress() -> int:
        return sum(max(tp.offset, 0) for tp in reader.committed(partitions, timeout=10))

    log = tmp_path / "consumer.log"
    total = sum(len(m) for m in produced.values())
    try:
        feed.start()
        for _ in range(2):
            process = consume_process(config_file, log)
            started: tuple[subprocess.Popen[bytes], int] = (process, progress())
            wait_for(lambda run=started: progress() > run[1] or run[0].poll() is not None,
                     120, "the consumer to commit something")
            time.sleep(rng.uniform(0.0, 0.2))
            process.kill()
            process.wait()
            assert feed.is_alive(), "killed mid-stream: events still arriving"
        process = consume_process(config_file, log)
        feed.release.set()
        feed.join()
        create_topic(bootstrap, late, partitions=2)
        produce(bootstrap, late, produced[late])
        wait_for(lambda: progress() >= total, 240,
                 "every topic, the late one too, to be committed")
        url = f"http://127.0.0.1:{config['metrics']['port']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            scraped = answer.read().decode()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    finally:
        reader.close()
    store = tmp_path / "store"
    assert_holds(store, "pages", pages_live)
    assert_holds(store, "products", shop_live)
    assert_holds(store, "notes", notes_live)
    assert any(doc.startswith("music-") for doc in shop_live), "the late topic has rows"
    # The last run's counts are by route: it applied the late topic's rows to "shop".
    assert re.search(r'embedstream_events_total\{op="\w+",outcome="applied",route="shop"\} '
                     r'[1-9]', scraped)
    for name in ("pages", "shop", "notes"):
        assert f'embedstream_source_only_skipped{{route="{name}"}} 0.0' in scraped


# -- the commands, one route at a time ---------------------------------------------------


def test_commands_work_on_one_route_and_collections_list_shows_every_route(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from embedstream.stream.app import cli

    from .test_aliases import FP, write

    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    store = tmp_path / "store"
    config = tmp_path / "embedstream.yaml"
    config.write_text(yaml.safe_dump({"routes": ROUTES, "sink": {"path": str(store)}}))
    for collection, docs in (("pages", 2), ("products", 3)):
        sink = QdrantEdgeSink(store, collection)
        sink.open(FP)
        sink.apply([write(f"{collection}-{n}", 1) for n in range(docs)])
        sink.close()

    assert cli.main(["collections", "list", "--config", str(config)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "POINTS", "ALIASES", "MODEL", "DIM", "ROUTE"]
    routes = {row.split()[-1]: row.split()[1:3] for row in table[1:3]}
    assert {route: points for route, (_, points) in routes.items()} == {"pages": "2",
                                                                         "shop": "3"}
    assert all(row.startswith("*") for row in table[1:3]), "each route's current is marked"
    assert cli.main(["collections", "list", "--json", "--config", str(config)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {row["route"]: row["aliases"] for row in rows} == {"pages": ["pages"],
                                                              "shop": ["products"]}

    for route in ("shop", "products"):  # by name or by collection
        assert cli.main(["export", "--route", route, "--config", str(config)]) == 0
        exported = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sorted(p["payload"]["doc_id"] for p in exported) == [
            "products-0", "products-1", "products-2"]

    # One collection's command without --route: which route is asked, before any work.
    for command in (["export"], ["search", "query"], ["collections", "switch", "x"],
                    ["dlq", "list"], ["rebuild", "--source", "kafka"]):
        assert cli.main([*command, "--config", str(config)]) == 2
        error = capsys.readouterr().err
        assert "several routes are configured" in error and "pages, shop" in error, command
    assert cli.main(["export", "--route", "nope", "--config", str(config)]) == 2
    assert "no route or route collection is named 'nope'" in capsys.readouterr().err
