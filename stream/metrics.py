"""Prometheus metrics, built in one place and passed to whoever records them.

Every name starts with ``embedstream_`` and is in base units (seconds, bytes).
Labels are bounded: topic, partition, route (a configured name), op kind, outcome,
reason code, sink
operation; never a document id.
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FRESHNESS_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
_RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class ChosenBackend(Protocol):
    """What :meth:`Metrics.embed_backend_chosen` reads of an encoder."""

    @property
    def backend(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def variant(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def calibration(self) -> dict[str, float]: ...


class Metrics:
    """All of embedstream's metrics, on a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info(
            "embedstream_build", "Version and model fingerprint of this process", registry=r
        )
        self.events = Counter(
            "embedstream_events_total",
            "Messages read, by kind of change and outcome "
            "(applied, moved, stale, skipped, dead_lettered), by route",
            ["op", "outcome", "route"],
            registry=r,
        )
        self.skipped = Counter(
            "embedstream_skipped_total",
            "Messages with no document change in them, by reason (schema_change, transaction, "
            "heartbeat, no_op, truncate, message; unrouted: a topic no route takes), by route",
            ["reason", "route"],
            registry=r,
        )
        self.only_skipped = Gauge(
            "embedstream_source_only_skipped",
            "1 while more than 1,000 messages were read since the start and all were skipped "
            "(e.g. flattened rows read as source.format: debezium): nothing is indexed, by route",
            ["route"],
            registry=r,
        )
        self.empty_documents = Counter(
            "embedstream_empty_documents_total",
            "Upserts stored with no chunks, by reason (no_text: the route's text_fields or "
            "text_template gave no text) and route",
            ["reason", "route"],
            registry=r,
        )
        self.no_chunks = Gauge(
            "embedstream_route_without_chunks",
            "1 while a route has taken more than 100 upserts since the start and not one "
            "gave a chunk (e.g. text_fields that name no field of the rows), by route",
            ["route"],
            registry=r,
        )
        self.dlq_records = Counter(
            "embedstream_dlq_records_total",
            "Messages written to the dead-letter topic, by reason and route",
            ["reason", "route"],
            registry=r,
        )
        self.dlq_truncated = Counter(
            "embedstream_dlq_truncated_records_total",
            "Dead-letter records cut to fit the topic (value over kafka.dlq_max_value_bytes, "
            "or headers, key, value over message.max.bytes)",
            registry=r,
        )
        self.chunks = Counter(
            "embedstream_chunks_total",
            "Chunks written, by whether their vector was embedded or reused",
            ["outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "embedstream_tokens_total",
            "Tokens in chunks written, by whether they were embedded or reused",
            ["outcome"],
            registry=r,
        )
        self.batch_events = Histogram(
            "embedstream_batch_events",
            "Messages per micro-batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )
        self.batch_token_fill = Histogram(
            "embedstream_batch_token_fill_ratio",
            "Tokens in a micro-batch over embed.max_batch_tokens",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.5),
            registry=r,
        )
        self.embed_seconds = Histogram(
            "embedstream_embed_duration_seconds",
            "Time to embed one micro-batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_seconds = Histogram(
            "embedstream_sink_operation_duration_seconds",
            "Time of sink operations",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_errors = Counter(
            "embedstream_sink_errors_total", "Failed sink operations", ["op"], registry=r
        )
        self.freshness = Histogram(
            "embedstream_freshness_seconds",
            "Source event time to the store acknowledging the write, by route",
            ["route"],
            buckets=_FRESHNESS_BUCKETS,
            registry=r,
        )
        self.commits = Counter(
            "embedstream_commits_total", "Offset commits after a sink flush", registry=r
        )
        self.last_commit = Gauge(
            "embedstream_last_commit_timestamp_seconds",
            "Unix time of the last offset commit",
            registry=r,
        )
        self.lag = Gauge(
            "embedstream_consumer_lag_messages",
            "High watermark minus the consumer position",
            ["topic", "partition"],
            registry=r,
        )
        self.paused_partitions = Gauge(
            "embedstream_paused_partitions", "Partitions paused for backpressure", registry=r
        )
        self.ready = Gauge(
            "embedstream_ready", "1 when started and the store is answering (as /readyz)",
            registry=r,
        )
        # A local store (sink.kind qdrant-edge) only: below the minimum, writes wait.
        self.store_free_bytes = Gauge(
            "embedstream_store_free_bytes",
            "Free space on the filesystem of the Qdrant Edge store (sink.path), read when scraped",
            registry=r,
        )
        self.store_min_free_bytes = Gauge(
            "embedstream_store_min_free_bytes",
            "sink.min_free_bytes: with less free space the consumer pauses (not ready)",
            registry=r,
        )
        self.rebalances = Counter(
            "embedstream_rebalance_partitions_total",
            "Partitions assigned, revoked (committed first) or lost (dropped) in rebalances",
            ["event"],
            registry=r,
        )
        self.embed_splits = Counter(
            "embedstream_embed_splits_total",
            "Embedding calls (out of memory) or remote requests (rejected, or failing with 500)"
            " retried as two halves to find the texts at fault",
            registry=r,
        )
        self.embed_padding = Histogram(
            "embedstream_embed_padding_ratio",
            "Share of the model's input positions that were padding, per stream embedding call",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        # The remote embedder (``embed.provider: openai``; zero with a local model).
        self.embed_requests = Counter(
            "embedstream_embed_requests_total",
            "Requests to the remote embedding API by outcome: ok, throttled (429), unavailable"
            " (408, 502-504), server_error (other 5xx), timeout, connection_error, invalid"
            " (unusable answer), rejected (other 4xx), refused (401/403/404, no quota)",
            ["outcome"],
            registry=r,
        )
        self.embed_retries = Counter(
            "embedstream_embed_retries_total",
            "Remote embedding requests sent again after a 429, 5xx, timeout or lost connection",
            registry=r,
        )
        self.embed_throttled = Counter(
            "embedstream_embed_throttled_seconds_total",
            "Time remote embedding requests waited, summed over requests, by cause: rate_limit"
            " (the client's buckets), retry_after (the provider's), backoff (after an error)",
            ["cause"],
            registry=r,
        )
        self.embed_tokens_sent = Counter(
            "embedstream_embed_tokens_sent_total",
            "Tokens sent to the remote embedding API (its own count where it reports usage)",
            registry=r,
        )
        self.embed_request_seconds = Histogram(
            "embedstream_embed_request_duration_seconds",
            "Time from sending a remote embedding request to its answer",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.embed_backend_info = Gauge(
            "embedstream_embed_backend_info",
            "1 for the backend, precision and device the local model runs on (auto: the "
            "fastest that passed the quality guard on this machine); 0 for one left",
            ["backend", "precision", "device"],
            registry=r,
        )
        self.embed_backend_speedup = Gauge(
            "embedstream_embed_backend_speedup_ratio",
            "Speed of the chosen backend over torch fp32, as measured when it was chosen "
            "(full batches and the stream's small ones; 1 when nothing was measured)",
            registry=r,
        )
        self.embed_backend_cosine = Gauge(
            "embedstream_embed_backend_cosine",
            "Cosine of the chosen backend's vectors to torch fp32's on the calibration "
            "texts, by statistic (mean, p01, min); 1 for torch fp32 itself",
            ["statistic"],
            registry=r,
        )
        # Rebuild progress (``embedstream rebuild``; zero in the consumer).
        self.rebuild_records = Counter(
            "embedstream_rebuild_records_total",
            "Source records a rebuild has read and written (or failed or skipped)",
            registry=r,
        )
        self.rebuild_chunks = Counter(
            "embedstream_rebuild_chunks_total", "Chunks a rebuild has written", registry=r
        )
        self.rebuild_failures = Counter(
            "embedstream_rebuild_failures_total",
            "Records a rebuild could not turn into a document (listed in its failures file)",
            registry=r,
        )
        self.rebuild_progress = Gauge(
            "embedstream_rebuild_progress_ratio",
            "Records done over records to do, resumed work included (0 while the total is unknown)",
            registry=r,
        )
        self.rebuild_padding = Gauge(
            "embedstream_rebuild_padding_ratio",
            "Share of the rebuild's model input positions that were padding, so far",
            registry=r,
        )

    def embed_backend_chosen(self, encoder: ChosenBackend) -> None:
        """Record the backend a local encoder settled on (called by the encoder)."""
        for labels in list(self.embed_backend_info._metrics):
            self.embed_backend_info.labels(*labels).set(0)
        self.embed_backend_info.labels(
            backend=encoder.backend, precision="-".join(
                p for p in (encoder.precision, encoder.variant) if p),
            device=encoder.device).set(1)
        figures = encoder.calibration
        self.embed_backend_speedup.set(figures.get("speedup", 1.0))
        for statistic in ("mean", "p01", "min"):
            self.embed_backend_cosine.labels(statistic=statistic).set(
                figures.get(f"{statistic}_cos", 1.0))
