"""``embedstream dev``: the whole loop on one machine, nothing to install.

Starts the bundled broker on a free port, replays real page revisions as
Debezium events into it, runs the consumer on an embedded Qdrant Edge store
until it has caught up, then shows a search, and an update and a delete
changing what the search returns. Beside the pages it runs two more routes
(:mod:`embedstream.stream.app.dev_routes`): a shop's flattened rows by topic
pattern and support tickets in Avro through a Schema Registry, each into its
own collection. Last, it rebuilds the pages topic into a new collection with
the bulk engine, moves the alias, and shows the running consumer following it:
a page written after the rebuild is found there.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from embedstream.stream.app import dev_routes
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.devdata import (
    BUILTIN_PAGES,
    DevMessage,
    debezium_value,
    load_revisions,
    revision_events,
)
from embedstream.stream.app.query_jobs import QueryJob, search_jobs
from embedstream.stream.app.service import Pipeline, build_consumer, build_pipeline
from embedstream.stream.config import (
    KafkaSettings,
    MetricsSettings,
    RetrievalSettings,
    RouteSettings,
    SchemaRegistrySettings,
    Settings,
    SinkSettings,
)
from embedstream.stream.consumer import StreamConsumer
from embedstream.stream.dead_letters import ensure_topics
from embedstream.stream.events import ChangeEvent
from embedstream.stream.filters import Filter
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.metrics import Metrics
from embedstream.stream.retrieval import resolve_mode

__all__ = ["run_dev"]

TOPIC = "dev.public.pages"
# Pages of the shared history that make a small, varied demo (prose and code).
_DEMO_PAGES = ("operations/logging.adoc", "architecture.adoc", "features.adoc",
               "transformations/index.adoc", "integrations/testcontainers.adoc",
               "transformations/event-changes.adoc")
_NEW_SECTION = (
    "\n\n== Vector search over these pages\n\n"
    "embedstream keeps a vector index of these pages in step with every change: it "
    "re-chunks each changed page, embeds only the chunks whose text is new, and deletes "
    "the vectors of removed pages."
)


def _select_rows(revisions: Path | None, pages: int, per_page: int) -> list[dict[str, Any]]:
    if revisions is None:
        # The package ships no third-party data: `make demo` passes the shared
        # revision history with --revisions when it is beside the checkout.
        print("(no --revisions given: using the built-in sample pages)")
        return [{"doc_id": doc_id, "text": text, "committed_at": "2024-01-01T00:00:00+00:00",
                 "commit": "builtin"} for doc_id, text in BUILTIN_PAGES.items()]
    rows = load_revisions(revisions)
    by_page: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_page[row["doc_id"]].append(row)
    preferred = [p for p in by_page if p.endswith(_DEMO_PAGES)]
    chosen = (preferred + [p for p in by_page if p not in preferred])[:pages]
    selected = [row for page in chosen for row in by_page[page][-per_page:]]
    return sorted(selected, key=lambda row: row["committed_at"])


class _Progress:
    def __init__(self, target: dict[tuple[str, int], int]) -> None:
        self.target = target
        self.stream: StreamConsumer | None = None
        self.started = time.monotonic()
        self.applied = 0

    def _committed(self) -> dict[tuple[str, int], int]:
        return self.stream.committed if self.stream else {}

    def caught_up(self) -> bool:
        return all(self._committed().get(k, 0) >= v for k, v in self.target.items())

    def on_applied(self, events: Sequence[ChangeEvent], acked_at: float) -> None:
        self.applied += len(events)
        done = sum(min(self._committed().get(k, 0), v) for k, v in self.target.items())
        total = sum(self.target.values())
        rate = done / max(time.monotonic() - self.started, 1e-9)
        line = (f"  {done}/{total} messages committed, {self.applied} document writes, "
                f"{rate:.1f} msg/s")
        # Redraw one line on a terminal; a line per batch in a log.
        if sys.stdout.isatty():
            print(f"\r{line}", end="", flush=True)
        else:
            print(line, flush=True)


def _produce(producer: Producer, messages: Iterable[DevMessage | tuple[str, DevMessage]]
             ) -> dict[tuple[str, int], int]:
    """Produce (to the pages topic, or the topic given with a message) and return,
    per partition, the offset after the last message."""
    ends: dict[tuple[str, int], int] = {}

    def delivered(error: Any, message: Any) -> None:
        if error is not None:
            raise RuntimeError(f"produce failed: {error}")
        key = (message.topic(), message.partition())
        ends[key] = max(ends.get(key, 0), message.offset() + 1)

    for item in messages:
        topic, message = item if isinstance(item, tuple) else (TOPIC, item)
        producer.produce(topic, key=message.key, value=message.value, on_delivery=delivered)
    producer.flush(30)
    return ends


def _consume_until_caught_up(stream: StreamConsumer, progress: _Progress) -> None:
    stream.run(until=progress.caught_up)
    if sys.stdout.isatty():
        print()


def _search(pipeline: Pipeline, query: str, k: int = 3) -> list[str]:
    """The top ``k`` documents as ``embedstream search`` ranks them (hybrid: the pages'
    BM25 vectors and their best chunks fused), printed with each one's best chunk."""
    [(_, hits)] = search_jobs(pipeline.embedder, pipeline.sink, [QueryJob(None, query, Filter())],
                              k, None, pipeline.sparse, pipeline.settings.retrieval)
    print(f'\n  search: "{query}" ({resolve_mode(None, pipeline.sink)})')
    for hit in hits:
        text = " ".join(str(hit.payload["text"]).split())
        print(f"    {hit.score:.3f}  {hit.payload['doc_id']}  {text[:100]}")
    return [str(hit.payload["doc_id"]) for hit in hits]


def run_dev(revisions: Path | None, data_dir: Path | None, pages: int,
            revisions_per_page: int) -> int:
    rows = _select_rows(revisions, pages, revisions_per_page)
    messages = list(revision_events(rows))
    latest = {m.doc_id: m.text for m in messages}
    registry = _registry()
    with LocalBroker() as broker, tempfile.TemporaryDirectory() as scratch, registry:
        print(f"broker: Tansu on {broker.bootstrap_servers} (in memory)")
        registry_url = getattr(registry, "url", None)
        if registry_url:
            print(f"schema registry: {registry_url} (in memory)")
        routes = dev_routes.routes_config(TOPIC, avro=registry_url is not None)
        dev_routes.print_config(routes, registry_url)
        settings = Settings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers,
                                group_id="embedstream-dev",
                                schema_registry=SchemaRegistrySettings(url=registry_url)
                                if registry_url else None,
                                options={"session.timeout.ms": 6000}),
            routes=tuple(RouteSettings.model_validate(route) for route in routes),
            sink=SinkSettings(kind="qdrant-edge", path=data_dir or Path(scratch) / "store"),
            retrieval=RetrievalSettings.model_validate(dev_routes.RETRIEVAL),
            metrics=MetricsSettings(enabled=False),
        )
        others = dev_routes.flattened_rows()
        if registry_url:
            others += dev_routes.avro_tickets(registry_url)
        ensure_topics(AdminClient(kafka_client_config(settings, "admin")),
                      [TOPIC, *{topic for topic, _ in others}], partitions=2)
        producer = Producer(kafka_client_config(settings, "producer"))
        print(f"replaying {len(messages)} change events for {len(latest)} pages "
              f"into topic {TOPIC}, and {len(others)} into the other routes' topics ...")
        target = _produce(producer, [*messages, *others])
        expected: dict[str, dict[str, str | None]] = {"shop": {}, "tickets": {}}
        for topic, message in others:
            expected["tickets" if topic == dev_routes.TICKETS_TOPIC else "shop"][
                message.doc_id] = message.text
        print(f"store: Qdrant Edge at {settings.sink.path}; loading the model ...")
        pipeline = build_pipeline(settings)
        try:
            return _demo(pipeline, producer, target, latest, expected)
        finally:
            pipeline.close()
            producer.close()


def _registry() -> Any:
    """The in-memory Schema Registry for the Avro route, or a null context when the
    ``schema-registry`` extra is not installed (the demo then runs without that route)."""
    try:
        import confluent_kafka.schema_registry.avro  # noqa: F401
    except ImportError:
        print("(the schema-registry extra is not installed: no Avro route)")
        return contextlib.nullcontext()
    from embedstream.stream.app.registry_server import SchemaRegistryServer

    return SchemaRegistryServer()


def _demo(pipeline: Pipeline, producer: Producer, target: dict[tuple[str, int], int],
          latest: dict[str, str | None], expected: dict[str, dict[str, str | None]]) -> int:
    progress = _Progress(target)
    stream = progress.stream = build_consumer(pipeline, Metrics(), on_applied=progress.on_applied)
    try:
        _consume_until_caught_up(stream, progress)
        print("\nroutes: the shop's flattened rows and the Avro tickets, each in its collection")
        routed = dev_routes.show_routes(pipeline.sinks, pipeline.embedder.embed_queries, expected)
        print("\n" + ("each route's collection holds exactly its live rows" if routed
                      else "unexpected documents in a route's collection"))
        print("\nroute pages:")
        top = _search(pipeline, "How do I change the log level of the connector?")
        question = "Which tool keeps a vector index of these pages in step with every change?"
        _search(pipeline, question)

        updated = next(doc for doc, text in latest.items() if text and doc != top[0])
        new_text = str(latest[updated]) + _NEW_SECTION
        key = json.dumps({"id": updated}).encode()
        after = {"id": updated, "text": new_text, "commit": "demo"}
        now = int(time.time() * 1000)
        update = DevMessage(updated, key, debezium_value(
            "u", None, after, lsn=10**12, source_ts_ms=now), new_text)
        deleted = top[0]
        dkey = json.dumps({"id": deleted}).encode()
        delete = DevMessage(deleted, dkey, debezium_value(
            "d", {"id": deleted}, None, lsn=10**12 + 8, source_ts_ms=now), None)
        tombstone = DevMessage(deleted, dkey, None, None)
        print(f"\nupdate: appending a section to {updated}")
        print(f"delete: {deleted} (op d, then a tombstone)")
        progress.target.update(_produce(producer, [update, delete, tombstone]))
        _consume_until_caught_up(stream, progress)
        after_log = _search(pipeline, "How do I change the log level of the connector?")
        after_new = _search(pipeline, question)
        ok = deleted not in after_log and after_new[:1] == [updated]
        print("\n" + ("the update and the delete show in the search results"
                      if ok else "unexpected search results after the update and delete"))
        return 0 if ok and routed and _rebuild_and_follow(pipeline, stream, producer, progress,
                                               updated, question) else 1
    finally:
        stream.close()
        pipeline.sink = stream.sink  # closed by the caller, whichever collection it is


def _rebuild_and_follow(pipeline: Pipeline, stream: StreamConsumer, producer: Producer,
                        progress: _Progress, updated: str, question: str) -> bool:
    """Rebuild the topic into a new collection, swap the alias, then show one more
    change reaching the new collection through the stream that followed it."""
    from embedstream.bulk.rebuild import RebuildOptions, rebuild

    print("\nrebuild: re-embedding the whole topic into a new collection, then moving "
          f"the alias {pipeline.settings.for_route('pages').sink.collection!r} ...")
    report = rebuild(pipeline.settings.for_route("pages"), RebuildOptions(source="kafka"))
    print(f"  {report.records} records read, {report.superseded} superseded: "
          f"{report.documents} documents, {report.chunks} chunks into {report.target} "
          f"({report.backend} {report.precision}, {report.padding_fraction:.1%} padding); "
          f"snapshot up to "
          f"{report.covered}, handover at {report.handover}; previous: {report.previous}")
    text = "A page written after the rebuild, about vector search that follows every change."
    page = "demo/after-the-rebuild.adoc"
    message = DevMessage(page, json.dumps({"id": page}).encode(), debezium_value(
        "c", None, {"id": page, "text": text, "commit": "demo"}, lsn=10**12 + 16,
        source_ts_ms=int(time.time() * 1000)), text)
    progress.target.update(_produce(producer, [message]))
    stream.run(until=lambda: progress.caught_up() and stream.sink.collection == report.target)
    if sys.stdout.isatty():
        print()
    pipeline.sink = stream.sink
    print(f"stream: now writing to {stream.sink.collection} through the alias")
    hits = _search(pipeline, "Which page was written after the rebuild?")
    found = _search(pipeline, question)
    ok = page in hits and updated in found
    print("\n" + ("the rebuilt collection serves the search and the stream keeps it current"
                  if ok else "unexpected search results after the rebuild"))
    return ok
