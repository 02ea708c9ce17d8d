"""Where the service's clients, model, store and metrics are built (a rebuild
builds its own in :mod:`embedstream.bulk.rebuild`).

Nothing in embedstream creates a client, model or metric at import time; the
functions here build them from a :class:`~embedstream.stream.config.Settings` tree and pass
them in.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from embedstream.sinks.disk import free_bytes
from embedstream.sinks.factory import build_admin, build_sink
from embedstream.stream import __version__
from embedstream.stream.app.kafka_logs import librdkafka_logger
from embedstream.stream.app.query_server import bind_query_port, start_query_server
from embedstream.stream.chunking import TokenChunker
from embedstream.stream.config import RouteSettings, Settings
from embedstream.stream.consumer import AppliedCallback, Route, StreamConsumer
from embedstream.stream.dead_letters import DeadLetters, ensure_topics
from embedstream.stream.embedding import Embedder, chunk_max_tokens
from embedstream.stream.errors import (
    ConfigError,
    KafkaUnavailable,
    SinkUnavailable,
    StoreDiskFull,
)
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.handover import AliasFollower
from embedstream.stream.health import Health, serve_metrics
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.metrics import Metrics
from embedstream.stream.registry import ValueReader, build_registry_client
from embedstream.stream.remote_embedding import OpenAIEmbedder
from embedstream.stream.routing import TopicRouter
from embedstream.stream.sparse import SparseEncoder, build_sparse_encoder, sparse_spec
from embedstream.stream.store import Sink
from embedstream.stream.topic_ids import TopicIds

__all__ = ["Pipeline", "build_consumer", "build_embedder", "build_pipeline", "check_start",
           "run_consumer", "with_pattern_topics"]

log = logging.getLogger("embedstream")
_START_RETRY_S = 5.0  # between attempts to open a store that is unavailable at the start

@dataclass
class Pipeline:
    """The model side and each route's store, ready to use; shared by consume,
    search and export (which narrow the settings to one route first)."""

    settings: Settings
    embedder: Embedder
    chunker: TokenChunker
    fingerprint: Fingerprint
    sinks: dict[str, Sink]  # by route name, in configuration order
    sparse: SparseEncoder | None = None  # document sparse vectors (retrieval.sparse)

    @property
    def sink(self) -> Sink:
        """The first route's store (with one route, the store)."""
        return next(iter(self.sinks.values()))

    @sink.setter
    def sink(self, sink: Sink) -> None:
        self.sinks[next(iter(self.sinks))] = sink

    def close(self) -> None:
        try:
            for sink in self.sinks.values():
                sink.close()
        finally:
            self.embedder.close()


def build_embedder(settings: Settings, metrics: Metrics | None = None) -> Embedder:
    """The ``embed.provider``'s embedder: the local model, or the remote API (which
    answers one probe request before this returns)."""
    embed = settings.embed
    if embed.provider == "openai":
        # Bounded calls: a slow provider must not hold the poll loop (the consumer
        # pauses and retries instead); a rebuild builds its own, without a bound.
        return OpenAIEmbedder(embed, metrics=metrics, call_budget_s=embed.give_up_after_s)
    # The same encoder, backend and forward-pass size as the rebuild (bulk.batch_tokens).
    return LocalEncoder.from_settings(
        embed, batch_tokens=settings.bulk.batch_tokens,
        on_choice=metrics.embed_backend_chosen if metrics is not None else None)


# Told why the store cannot be opened yet (e.g. its disk nearly full); True: wait
# (the callee waits) and try again, False: give up (the error is raised).
OpenWait = Callable[[SinkUnavailable], bool]


def build_pipeline(settings: Settings, sink: Sink | None = None,
                   metrics: Metrics | None = None, wait: OpenWait | None = None) -> Pipeline:
    """Load the model (or reach the API), build the chunker, open each route's
    store under the fingerprint (one model serves every route).

    ``sink`` replaces the one ``settings.sink`` describes, with one route only
    (not yet opened; e.g. several consumers of one process sharing an in-memory
    store). ``metrics``
    receives the remote embedder's request figures. ``wait``: what to do while
    the store is unavailable at the start (default: raise at once)."""
    embedder = build_embedder(settings, metrics)
    try:
        # Leave room for the model's [CLS]/[SEP] and the document prompt, so no chunk
        # is silently truncated.
        chunker = TokenChunker(embedder.tokenizer,
                               max_tokens=chunk_max_tokens(settings.chunk.max_tokens, embedder))
        fingerprint = Fingerprint(
            model=embedder.model_name, revision=embedder.revision,
            dimension=embedder.dimension, normalized=True, chunker=chunker.spec,
            provider=settings.embed.provider, prompt=embedder.document_prompt,
            sparse=sparse_spec(settings.retrieval),
        )
        sparse = build_sparse_encoder(settings.retrieval, settings.embed.device)
    except BaseException:
        embedder.close()
        raise
    pipeline = Pipeline(settings, embedder, chunker, fingerprint, {}, sparse)
    try:
        for route in settings.all_routes():
            narrowed = settings.for_route(route.name)
            if sink is None:
                opening = build_sink(narrowed.sink, filter_fields=route.source.filter_fields)
            elif len(settings.all_routes()) == 1:
                opening = sink
            else:
                raise ValueError("build_pipeline(sink=...) serves one route only")
            pipeline.sinks[route.name] = opening  # closed with the pipeline, opened or not
            while True:
                try:
                    opening.open(fingerprint)
                    break
                except SinkUnavailable as error:
                    if wait is None or not wait(error):
                        raise
    except BaseException:
        pipeline.close()
        raise
    return pipeline


def build_consumer(
    pipeline: Pipeline, metrics: Metrics, on_applied: AppliedCallback | None = None,
    health: Health | None = None, follow_alias: bool = True,
) -> StreamConsumer:
    """The Kafka side: consumer, dead-letter producer, and the loop around them.

    ``follow_alias``: move to the collection a rebuild points ``sink.collection``
    at, taking over at its handover offsets (:mod:`embedstream.stream.handover`)."""
    settings = pipeline.settings

    def config(role: str) -> dict[str, Any]:
        # librdkafka's log lines go through logging (as JSON), served by poll().
        return {**kafka_client_config(settings, role), "logger": librdkafka_logger()}

    admin = AdminClient(config("admin"))  # polled by the loop, through TopicIds
    routes = settings.all_routes()
    try:
        ensure_topics(admin, {settings.kafka.dlq_topic_for(t) for r in routes for t in r.topics})
    except KafkaException as error:
        raise _unreachable(settings, error) from None
    dead_letters = DeadLetters(Producer(config("producer")), settings.kafka)
    consumer = Consumer(config("consumer"))
    metrics.build_info.info({
        "version": __version__,
        "model": pipeline.fingerprint.model,
        "fingerprint": pipeline.fingerprint.to_json(),
    })
    if settings.sink.kind == "qdrant-edge":  # a local store: watch the disk it fills
        store = settings.sink
        metrics.store_free_bytes.set_function(lambda: free_bytes(store.path))
        metrics.store_min_free_bytes.set(store.min_free_bytes)
    registry = build_registry_client(settings.kafka.schema_registry)
    sides = [Route(narrowed, pipeline.sinks[route.name],
                   ValueReader(registry, route.source.encoding),
                   _follower(narrowed, consumer, pipeline) if follow_alias else None)
             for route in routes for narrowed in [settings.for_route(route.name)]]
    return StreamConsumer(
        settings, consumer, dead_letters, pipeline.chunker, pipeline.embedder, sides,
        metrics, on_applied=on_applied, health=health, topic_ids=TopicIds(admin),
        ensure_dlq=lambda topics: ensure_topics(admin, map(settings.kafka.dlq_topic_for, topics)),
        sparse=pipeline.sparse,
    )


def _follower(route: Settings, consumer: Consumer, pipeline: Pipeline) -> AliasFollower:
    """Follows the route's alias (``route``: settings narrowed to it) to a rebuild's collection."""
    def open_sink(physical: str) -> Sink:
        sink = build_sink(route.sink, physical=physical,
                          filter_fields=route.source.filter_fields)
        try:
            sink.open(pipeline.fingerprint)
        except BaseException:
            sink.close()
            raise
        return sink

    return AliasFollower(consumer, build_admin(route.sink), route.sink.collection,
                         route.kafka.group_id, open_sink, time.monotonic)


def _unreachable(settings: Settings, error: KafkaException) -> KafkaUnavailable:
    return KafkaUnavailable(
        f"cannot reach Kafka at {settings.kafka.bootstrap_servers} (kafka.bootstrap_servers,"
        f" kafka.security): {error.args[0].str() if error.args else error}")


def with_pattern_topics(settings: Settings, routes: Sequence[RouteSettings]) -> Settings:
    """Settings narrowed to a route with a ``topic_pattern``, with ``kafka.topics``
    set to the topics of that route now, as the consumer routes them among all the
    configured ``routes`` (a topic another route names, or an earlier pattern
    takes, is not this route's). For the commands that read topics by name: a
    rebuild (its snapshot and handover), the dead-letter commands. Other settings
    as they are."""
    if settings.kafka.topic_pattern is None:
        return settings
    admin = AdminClient(kafka_client_config(settings, "admin"))
    try:
        existing = admin.list_topics(timeout=10).topics
    except KafkaException as error:
        raise KafkaUnavailable(f"cannot list the topics at {settings.kafka.bootstrap_servers}: "
                               f"{error.args[0].str() if error.args else error}") from None
    route = settings.all_routes()[0]
    topics = TopicRouter(routes, settings.kafka).topics_of(route, existing)
    if not topics:
        raise ConfigError(f"no topic matches route {route.name}'s topic_pattern "
                          f"{route.topic_pattern!r} yet")
    log.info("route %s: topics matching %r: %s", route.name, route.topic_pattern, topics)
    kafka = settings.kafka.model_copy(update={"topics": tuple(topics), "topic_pattern": None})
    return settings.model_copy(update={"kafka": kafka})


def check_start(settings: Settings) -> None:
    """What the consumer needs, checked before anything heavy starts (the model
    loads) and creating nothing: Kafka answers, and each route's store can be
    opened (reachable, writable, not held by another process).
    :class:`KafkaUnavailable` or :class:`~embedstream.stream.errors.SinkError` say what failed."""
    stores = build_admin(settings.sink)  # first: local, and quick to say what is wrong
    try:
        for route in settings.all_routes():
            stores.probe(route.collection)
    finally:
        stores.close()
    config: dict[str, Any] = {**kafka_client_config(settings, "admin"),
                              "logger": librdkafka_logger()}
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=10)
    except KafkaException as error:
        raise _unreachable(settings, error) from None
    finally:
        admin.poll(0)  # its queued log lines (why connecting failed), one of a kind


def run_consumer(settings: Settings) -> int:
    """The ``consume`` command: run until SIGTERM/SIGINT, then flush, commit, exit 0."""
    stop_requested: list[str] = []

    # Installed before the (slow) start, so a stop during model loading is clean too.
    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: flushing, committing and stopping", signal.Signals(signum).name)
        stop_requested.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    metrics = Metrics()
    health = Health(settings.metrics.liveness_timeout_s, ready_gauge=metrics.ready)
    # Everything checked before the model loads (seconds to a minute): the metrics port
    # first (a taken one stops us, exit 2, and probes see "starting" from here on),
    # then the store and Kafka; nothing is created until they are known good.
    if settings.metrics.enabled:
        serve_metrics(metrics, health, settings.metrics)
    query_listener = bind_query_port(settings)  # a taken query.port stops us here too
    try:
        check_start(settings)
        return _consume(settings, metrics, health, query_listener, stop_requested)
    finally:
        if query_listener is not None:  # closing it twice is harmless
            query_listener.close()


def _consume(settings: Settings, metrics: Metrics, health: Health,
             query_listener: socket.socket | None, stop_requested: list[str]) -> int:
    """``consume`` once the start-up checks passed: load the model, open the stores,
    run the loop (and the query endpoint) until a stop is requested."""

    def wait_for_store(error: SinkUnavailable) -> bool:
        # A nearly full disk: as in the loop, not ready and try again, rather than exit
        # and be restarted into the same state. A server that cannot be reached at
        # the start is more often a wrong sink.url: that exits 2, naming it.
        if not isinstance(error, StoreDiskFull):
            return False
        health.set_ready(f"store unavailable: {error}")
        log.warning("store unavailable at the start, retrying in %.0fs: %s",
                    _START_RETRY_S, error)
        deadline = time.monotonic() + _START_RETRY_S
        while not stop_requested and time.monotonic() < deadline:
            health.beat()  # alive, only waiting: no liveness restart for this
            time.sleep(0.2)
        return not stop_requested

    try:
        pipeline = build_pipeline(settings, metrics=metrics, wait=wait_for_store)
    except SinkUnavailable:
        if not stop_requested:
            raise
        log.info("stopped before the store could be opened")
        return 0
    if isinstance(pipeline.embedder, LocalEncoder):
        # Measuring the backends (once per machine) runs inside the loop: it beats.
        pipeline.embedder.heartbeat = health.beat
    try:
        stream = build_consumer(pipeline, metrics, health=health)
        for route in settings.all_routes():
            log.info("route %s: consuming %s into %s", route.name,
                     list(route.topics) or f"topics matching {route.topic_pattern!r}",
                     route.collection)
        try:
            # Closed before the stores close.
            with closing(start_query_server(settings, pipeline, stream, query_listener)):
                stream.run(until=lambda: bool(stop_requested))
        finally:
            stream.close()
            pipeline.sinks = stream.sinks  # the ones it followed to, if a rebuild moved an alias
    finally:
        pipeline.close()
    log.info("stopped cleanly")
    sys.stdout.flush()
    return 0
