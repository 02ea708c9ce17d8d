"""The one configuration tree: YAML file, then ``EMBEDSTREAM_`` environment.

Environment variables override the file and nest with ``__``
(``EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS``). The tree is frozen: it is built once
at start and passed to whatever needs it. An invalid value fails at start with
:class:`~embedstream.stream.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from embedstream.stream._config_sources import read_config_file, unparsable_environment
from embedstream.stream._embed_settings import EmbedSettings, QualityGuardSettings
from embedstream.stream._index_settings import (
    HnswSettings,
    IndexSettings,
    MaintenanceSettings,
    OptimizerSettings,
    QuantizationSettings,
)
from embedstream.stream._kafka_settings import (
    KafkaSecurity,
    KafkaSettings,
    SchemaRegistrySettings,
)
from embedstream.stream._prompt_settings import InputTypeSettings, PromptSettings
from embedstream.stream._retrieval_settings import Bm25Settings, RetrievalSettings
from embedstream.stream._section import Section
from embedstream.stream._source_settings import (
    RESERVED_PAYLOAD_FIELDS,
    RouteSettings,
    SourceSettings,
    check_routes,
)
from embedstream.stream.errors import ConfigError
from embedstream.stream.names import checked_alias
from embedstream.stream.redact import checked_header_secret

__all__ = [
    "DEFAULT_ROUTE",
    "RESERVED_PAYLOAD_FIELDS",
    "Bm25Settings",
    "BulkSettings",
    "ChunkSettings",
    "EmbedSettings",
    "HnswSettings",
    "IndexSettings",
    "InputTypeSettings",
    "KafkaSecurity",
    "KafkaSettings",
    "MaintenanceSettings",
    "MetricsSettings",
    "OptimizerSettings",
    "PromptSettings",
    "QualityGuardSettings",
    "QuantizationSettings",
    "QuerySettings",
    "RetrievalSettings",
    "RouteSettings",
    "SchemaRegistrySettings",
    "Settings",
    "SinkSettings",
    "SourceSettings",
    "load_settings",
]

# The name of the one route that kafka.topics, source and sink.collection make.
DEFAULT_ROUTE = "default"


class ChunkSettings(Section):
    max_tokens: int = Field(default=256, ge=8)


class SinkSettings(Section):
    kind: Literal["qdrant-edge", "qdrant"] = "qdrant-edge"
    path: Path = Path("./embedstream-data")
    url: str | None = None
    api_key: SecretStr | None = None
    _usable_key = field_validator("api_key")(checked_header_secret)
    collection: str = "documents"  # an alias; embedstream.stream.names says what names fit
    prefer_grpc: bool = False
    timeout_s: float = Field(default=30.0, gt=0)
    shard_number: int | None = Field(default=None, ge=1)
    replication_factor: int | None = Field(default=None, ge=1)
    write_consistency_factor: int | None = Field(default=None, ge=1)
    # qdrant over https: a CA bundle to trust (REST and gRPC), or no verification.
    tls_ca_file: Path | None = None
    tls_verify: bool = True
    # How often the consumer makes applied writes durable and then commits
    # their offsets. Writes are searchable as soon as they are applied; this
    # bounds only how much a crash replays. 0: after every batch.
    flush_interval_ms: int = Field(default=1000, ge=0)
    # qdrant-edge: below this much free space on the filesystem of `path`, writes
    # wait (the consumer pauses, reports not ready, commits nothing) instead of
    # risking a full disk, on which Qdrant Edge dies with SIGBUS. It must cover the
    # largest write made at once; see the README's "Disk". 0: never wait.
    min_free_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # How the chunk vectors are indexed and searched, and kept optimized (see
    # embedstream.stream._index_settings).
    index: IndexSettings = IndexSettings()

    # The one rule of every name, checked here before any path is built from it.
    _valid_collection = field_validator("collection")(checked_alias)


class BulkSettings(Section):
    """The bulk rebuild (``embedstream rebuild``): engine sizes, file reading, checkpoints."""

    @model_validator(mode="before")
    @classmethod
    def _moved_to_embed(cls, data: Any) -> Any:
        moved = {"precision": "embed.precision", "min_cosine": "embed.quality_guard"}
        if isinstance(data, dict) and (found := [k for k in moved if k in data]):
            raise ValueError("; ".join(
                f"bulk.{k} has moved to {moved[k]} (one backend and precision for the "
                "stream and the rebuild)" for k in found))
        return data

    # Padded tokens (rows x longest) per forward pass; 0 picks 4096 on a CPU
    # (larger spills out of cache there) and 65536 on a GPU.
    batch_tokens: int = Field(default=0, ge=0)
    # Threads that chunk and tokenize (HF fast tokenizers release the GIL).
    tokenizer_workers: int = Field(default=2, ge=1)
    # Texts gathered, sorted by length and packed into batches at a time.
    bucket_texts: int = Field(default=4096, ge=1)
    # Depth of each queue between stages (bounds memory; a full queue blocks its producer).
    queue_depth: int = Field(default=8, ge=1)
    # Documents per store write.
    write_documents: int = Field(default=256, ge=1)
    # Seconds between durable checkpoints a killed rebuild resumes from.
    checkpoint_interval_s: float = Field(default=10.0, gt=0)
    # Where checkpoints and failure lists live; default <sink.path>/.rebuild.
    state_dir: Path | None = None
    # Column names of TSV files that have no header row (e.g. ["id", "text"]);
    # empty: the first row of each TSV file names the columns.
    tsv_columns: tuple[str, ...] = ()
    # Seconds between progress log lines when stderr is not a terminal.
    progress_interval_s: float = Field(default=10.0, gt=0)


class MetricsSettings(Section):
    """The HTTP endpoint: ``/metrics``, ``/healthz`` (the loop is turning) and
    ``/readyz`` (started and the store is answering)."""

    enabled: bool = True
    # Loopback unless asked: /metrics names topics and collections. A container
    # sets 0.0.0.0 (the image and the Helm chart do), as probes and scrapes come
    # to the pod's address.
    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535)
    # /healthz fails when the loop has not turned for this long.
    liveness_timeout_s: float = Field(default=120.0, gt=0)


class QuerySettings(Section):
    """The running consumer's query endpoint: ``POST /search`` and ``GET /export``
    (see :mod:`embedstream.stream.app.query_server`), on a port of its own."""

    enabled: bool = True
    # Loopback unless asked, also in a container: it answers with the indexed texts,
    # and has no authentication. It is not the metrics port, which the image and the
    # chart open to the pod network.
    host: str = "127.0.0.1"
    # 0: a free port, chosen at start; logged, and written where `search` and
    # `export` look for the consumer holding the store.
    port: int = Field(default=0, ge=0, le=65535)
    # Larger request bodies are refused (413) before they are read.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="EMBEDSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    kafka: KafkaSettings = KafkaSettings()
    source: SourceSettings = SourceSettings()
    embed: EmbedSettings = EmbedSettings()
    chunk: ChunkSettings = ChunkSettings()
    sink: SinkSettings = SinkSettings()
    metrics: MetricsSettings = MetricsSettings()
    query: QuerySettings = QuerySettings()
    bulk: BulkSettings = BulkSettings()
    retrieval: RetrievalSettings = RetrievalSettings()
    # Many topics to many collections, each route with its own source settings and
    # collection. Without it, kafka.topics (or kafka.topic_pattern), source and
    # sink.collection are one route, named "default".
    routes: tuple[RouteSettings, ...] = ()

    # The config file's contents, below the arguments and the environment; set on a
    # subclass by load_settings (a class per file: pydantic asks the class for sources).
    file_data: ClassVar[dict[str, Any] | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: explicit arguments, then environment, then the file.
        if cls.file_data is None:
            return init_settings, env_settings
        return init_settings, env_settings, InitSettingsSource(settings_cls, cls.file_data)


    @model_validator(mode="after")
    def _routes_alone(self) -> Settings:
        if not self.routes:
            return self
        check_routes(self.routes)
        for route in self.routes:  # their topics, as kafka.topics' are
            self.kafka.check_dlq_names(route.topics)
        # With routes, each names its own; a top-level value would be silently unused.
        unused = [name for name, given in (
            ("kafka.topics", "topics" in self.kafka.model_fields_set),
            ("kafka.topic_pattern", self.kafka.topic_pattern is not None),
            ("source", "source" in self.model_fields_set),
            ("sink.collection", "collection" in self.sink.model_fields_set)) if given]
        if unused:
            raise ValueError(f"with routes, give {', '.join(unused)} in each route instead")
        return self

    def all_routes(self) -> tuple[RouteSettings, ...]:
        """Every route: ``routes``, or the one that kafka.topics, source and
        sink.collection make (named ``default``)."""
        if self.routes:
            return self.routes
        return (RouteSettings(name=DEFAULT_ROUTE, topics=self.kafka.topics,
                              topic_pattern=self.kafka.topic_pattern, source=self.source,
                              collection=self.sink.collection),)

    def for_route(self, name: str | None) -> Settings:
        """These settings narrowed to one route (by name or collection):
        kafka.topics (or topic_pattern), source and sink.collection are the
        route's, ``routes`` holds it alone. ``None`` picks the only route; with
        several, :class:`ConfigError` asks which."""
        routes = self.all_routes()
        if name is None:
            if len(routes) > 1:
                raise ConfigError("several routes are configured: name one with --route "
                                  f"(one of {', '.join(r.name for r in routes)})")
            route = routes[0]
        else:
            found = [r for r in routes if name in (r.name, r.collection)]
            if not found:
                raise ConfigError(f"no route or route collection is named {name!r} (routes: "
                                  f"{', '.join(f'{r.name} -> {r.collection}' for r in routes)})")
            route = found[0]
        kafka = self.kafka.model_copy(update={"topics": route.topics,
                                              "topic_pattern": route.topic_pattern})
        sink = self.sink.model_copy(update={"collection": route.collection})
        return self.model_copy(update={"kafka": kafka, "source": route.source, "sink": sink,
                                       "routes": (route,) if self.routes else ()})

    def route_name(self) -> str:
        """The name of the route these settings serve (after :meth:`for_route`)."""
        return self.routes[0].name if len(self.routes) == 1 else DEFAULT_ROUTE


def _format_validation_error(error: ValidationError, origin: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(root)"
        lines.append(f"  {where}: {item['msg']}")
    return f"invalid configuration ({origin}):\n" + "\n".join(lines)


def _with_file(data: dict[str, Any]) -> type[Settings]:
    """Settings that take what neither the arguments nor the environment set from ``data``."""
    return type("FileSettings", (Settings,), {"file_data": data})


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings tree, or raise :class:`ConfigError` naming the bad field
    (or the file, or the environment variable, that cannot be read); no message
    quotes a value."""
    settings_cls: type[Settings] = Settings
    origin = "environment"
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        origin = f"{path} and environment"
        settings_cls = _with_file(read_config_file(path))
    try:
        return settings_cls(**overrides)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, origin)) from None
    except SettingsError as error:
        # Raised for an environment value a JSON-taking field cannot parse; its
        # message names the top-level field only ('error parsing value for field "kafka"').
        field = str(error).split('"')[1] if str(error).count('"') >= 2 else None
        prefix = Settings.model_config.get("env_prefix") or ""
        named = unparsable_environment(Settings, prefix, field)
        raise ConfigError(f"invalid configuration: {named or error}") from None
