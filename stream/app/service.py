"""Where the service's clients, model, store and metrics are built (a rebuild
builds its own in :mod:`embedstream.bulk.rebuild`).

Nothing in embedstream creates a client, model or metric at import time; the
functions here build them from a :class:`~embedstream.stream.config.Settings` tree and pass
them in.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient

from embedstream.sinks.disk import free_bytes
from embedstream.sinks.factory import build_admin, build_sink
from embedstream.stream import __version__
from embedstream.stream.chunking import TokenChunker
from embedstream.stream.config import Settings
from embedstream.stream.consumer import AppliedCallback, StreamConsumer
from embedstream.stream.dead_letters import DeadLetters, ensure_topics
from embedstream.stream.embedding import Embedder, SentenceTransformerEmbedder
from embedstream.stream.errors import KafkaUnavailable, SinkUnavailable, StoreDiskFull
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.handover import AliasFollower
from embedstream.stream.health import Health, serve_metrics
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.metrics import Metrics
from embedstream.stream.remote_embedding import OpenAIEmbedder
from embedstream.stream.store import Sink
from embedstream.stream.topic_ids import TopicIds

__all__ = ["Pipeline", "build_consumer", "build_embedder", "build_pipeline", "run_consumer"]

log = logging.getLogger("embedstream")
_START_RETRY_S = 5.0  # between attempts to open a store that is unavailable at the start
_librdkafka_log = logging.getLogger("embedstream.librdkafka")

@dataclass
class Pipeline:
    """The model side and the store, ready to use; shared by consume, search and export."""

    settings: Settings
    embedder: Embedder
    chunker: TokenChunker
    fingerprint: Fingerprint
    sink: Sink

    def close(self) -> None:
        try:
            self.sink.close()
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
    return SentenceTransformerEmbedder(embed.model, device=embed.device,
                                       max_batch_tokens=embed.max_batch_tokens)


# Told why the store cannot be opened yet (e.g. its disk nearly full); True: wait
# (the callee waits) and try again, False: give up (the error is raised).
OpenWait = Callable[[SinkUnavailable], bool]


def build_pipeline(settings: Settings, sink: Sink | None = None,
                   metrics: Metrics | None = None, wait: OpenWait | None = None) -> Pipeline:
    """Load the model (or reach the API), build the chunker, open the store under
    the fingerprint.

    ``sink`` replaces the one ``settings.sink`` describes (not yet opened; e.g.
    several consumers of one process sharing an in-memory store). ``metrics``
    receives the remote embedder's request figures. ``wait``: what to do while
    the store is unavailable at the start (default: raise at once)."""
    embedder = build_embedder(settings, metrics)
    try:
        # Leave room for the model's [CLS]/[SEP] so no chunk is silently truncated.
        max_tokens = min(settings.chunk.max_tokens, embedder.max_seq_length - 2)
        chunker = TokenChunker(embedder.tokenizer, max_tokens=max_tokens)
        fingerprint = Fingerprint(
            model=embedder.model_name, revision=embedder.revision,
            dimension=embedder.dimension, normalized=True, chunker=chunker.spec,
            provider=settings.embed.provider,
        )
        sink = sink or build_sink(settings.sink, filter_fields=settings.source.filter_fields)
    except BaseException:
        embedder.close()
        raise
    pipeline = Pipeline(settings, embedder, chunker, fingerprint, sink)
    try:
        while True:
            try:
                sink.open(fingerprint)
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
        return {**kafka_client_config(settings, role), "logger": _librdkafka_log}

    # The admin client is never polled: its log lines (e.g. why a connection
    # failed) stay on stderr, where they are seen if the start fails.
    admin = AdminClient(kafka_client_config(settings, "admin"))
    try:
        ensure_topics(admin, {settings.kafka.dlq_topic_for(t) for t in settings.kafka.topics})
    except KafkaException as error:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers} (kafka.bootstrap_servers,"
            f" kafka.security): {error.args[0].str() if error.args else error}") from None
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
    follower = None
    if follow_alias:
        def open_sink(physical: str) -> Sink:
            sink = build_sink(settings.sink, physical=physical,
                              filter_fields=settings.source.filter_fields)
            try:
                sink.open(pipeline.fingerprint)
            except BaseException:
                sink.close()
                raise
            return sink

        follower = AliasFollower(consumer, build_admin(settings.sink), settings.sink.collection,
                                 settings.kafka.group_id, open_sink, time.monotonic)
    return StreamConsumer(
        settings, consumer, dead_letters, pipeline.chunker, pipeline.embedder, pipeline.sink,
        metrics, on_applied=on_applied, health=health, follower=follower,
        topic_ids=TopicIds(admin),
    )


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
    if settings.metrics.enabled:  # up before the model loads: probes see "starting"
        serve_metrics(metrics, health, settings.metrics)  # a taken port stops us (exit 2)

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
    try:
        stream = build_consumer(pipeline, metrics, health=health)
        log.info("consuming %s into %s", list(settings.kafka.topics), settings.sink.collection)
        try:
            stream.run(until=lambda: bool(stop_requested))
        finally:
            stream.close()
            pipeline.sink = stream.sink  # the one it followed to, if a rebuild moved the alias
    finally:
        pipeline.close()
    log.info("stopped cleanly")
    sys.stdout.flush()
    return 0
