"""The one configuration tree: YAML file, then ``EMBEDSTREAM_`` environment.

Environment variables override the file and nest with ``__``
(``EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS``). The tree is frozen: it is built once
at start and passed to whatever needs it. An invalid value fails at start with
:class:`~embedstream.stream.errors.ConfigError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from embedstream.stream._config_sources import read_config_file, unparsable_environment
from embedstream.stream.errors import ConfigError
from embedstream.stream.filters import FieldType
from embedstream.stream.names import name_error
from embedstream.stream.redact import checked_header_secret, checked_secret, secret_problem
from embedstream.stream.templates import template_parts

__all__ = [
    "RESERVED_PAYLOAD_FIELDS",
    "BulkSettings",
    "ChunkSettings",
    "EmbedSettings",
    "KafkaSecurity",
    "KafkaSettings",
    "MetricsSettings",
    "Settings",
    "SinkSettings",
    "SourceSettings",
    "load_settings",
]

# Payload keys embedstream writes itself; a metadata field may not shadow one.
RESERVED_PAYLOAD_FIELDS = frozenset(
    {"doc_id", "chunk_index", "text", "start", "end", "version", "content_hash"}
)

KafkaOptionValue = str | int | float | bool

# librdkafka settings that hold secrets: kept as SecretStr when given in
# `kafka.options`, so no repr, log line or error message shows them.
_SECRET_OPTION_MARKERS = ("password", "secret", "sasl.jaas.config", "ssl.key.pem")


def _is_secret_option(key: object) -> bool:
    return isinstance(key, str) and any(m in key for m in _SECRET_OPTION_MARKERS)


def _reveal(value: KafkaOptionValue | SecretStr) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSecurity(_Section):
    """TLS and SASL for every Kafka client (consumer, DLQ producer, admin).

    Each field maps to the librdkafka setting of the same name with dots;
    anything not here can still go through ``kafka.options``."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_endpoint_identification_algorithm: Literal["https", "none"] | None = None

    _no_control_characters = field_validator("sasl_password", "ssl_key_password")(checked_secret)

    def librdkafka(self) -> dict[str, str]:
        """The librdkafka settings, secrets revealed (for the client only)."""
        pairs: dict[str, str | SecretStr | None] = {
            "security.protocol": self.protocol,
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
            "ssl.endpoint.identification.algorithm": self.ssl_endpoint_identification_algorithm,
        }
        return {k: _reveal(v) for k, v in pairs.items() if v is not None}


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topics: tuple[str, ...] = ("dbserver1.inventory.products",)
    group_id: str = "embedstream"
    # Any librdkafka setting, passed through to consumer and DLQ producer alike.
    # Values of secret settings (passwords, secrets) are held as SecretStr.
    options: dict[str, KafkaOptionValue | SecretStr] = Field(
        default_factory=lambda: dict[str, KafkaOptionValue | SecretStr](
            {"session.timeout.ms": 6000})
    )
    security: KafkaSecurity = KafkaSecurity()
    dlq_topic: str | None = None
    # Most messages taken from the client per poll; bounds per-iteration work.
    poll_max_messages: int = Field(default=1000, ge=1)
    # A dead-letter record's value is cut to this many bytes (the header
    # `embedstream.dlq.truncated` then holds the original size; the whole
    # message stays in the source topic at the offset the headers name).
    # Kafka refuses records over the broker's message.max.bytes (1 MB default).
    dlq_max_value_bytes: int = Field(default=900_000, ge=0)

    @field_validator("options", mode="before")
    @classmethod
    def _hide_secret_options(cls, options: Any) -> Any:
        if not isinstance(options, dict):
            return options
        hidden = {key: value if not _is_secret_option(key) or isinstance(value, SecretStr)
                  else SecretStr(str(value)) for key, value in options.items()}
        for key, value in hidden.items():
            # A PEM key (ssl.key.pem) is lines of text: its newlines belong to it.
            if isinstance(value, SecretStr) and not str(key).endswith(".pem") and (
                    problem := secret_problem(value.get_secret_value())):
                raise ValueError(f"{key}: {problem}")
        return hidden

    def librdkafka_options(self) -> dict[str, KafkaOptionValue]:
        """``options`` as librdkafka takes them, secrets revealed (for the client only)."""
        return {k: _reveal(v) for k, v in self.options.items()}

    @field_validator("topics")
    @classmethod
    def _at_least_one_topic(cls, topics: tuple[str, ...]) -> tuple[str, ...]:
        if not topics or any(not t for t in topics):
            raise ValueError("name at least one non-empty topic")
        return topics

    def dlq_topic_for(self, topic: str) -> str:
        return self.dlq_topic or f"{topic}.dlq"


class SourceSettings(_Section):
    # debezium: the change envelope; debezium-flat: rows flattened by Debezium's
    # ExtractNewRecordState (__deleted, __op, __lsn, __source_ts_ms); native.
    format: Literal["debezium", "debezium-flat", "native"] = "debezium"
    id_fields: tuple[str, ...] = ("id",)
    text_fields: tuple[str, ...] = ("name", "description")
    # Instead of text_fields: "{title}\n\n{body}", fields by name (absent or null: "").
    text_template: str | None = None
    metadata_fields: tuple[str, ...] = ()
    # Filterable fields and their types (keyword, integer, float, bool, datetime):
    # copied into the payload as that type, payload-indexed in the store, usable in
    # `search --filter` (see embedstream.stream.filters). Not in the fingerprint.
    filter_fields: dict[str, FieldType] = Field(default_factory=dict)
    version: Literal["auto", "lsn", "ts_ms", "offset"] = "auto"
    # Limits: a message or document over them is dead-lettered (reasons
    # `message_too_large`, `document_too_large`), never a crash.
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    # About 250k tokens: embedding more on a CPU takes longer than
    # max.poll.interval.ms (300 s); raise it with a GPU.
    max_document_chars: int = Field(default=1_000_000, ge=1)

    @field_validator("text_template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        if template is not None:
            template_parts(template)  # raises ValueError naming what is wrong
        return template

    @field_validator("id_fields", "text_fields")
    @classmethod
    def _not_empty(cls, fields: tuple[str, ...]) -> tuple[str, ...]:
        if not fields:
            raise ValueError("name at least one field")
        return fields

    @field_validator("metadata_fields", "filter_fields")
    @classmethod
    def _not_reserved(cls, fields: Any) -> Any:
        clash = sorted(set(fields) & RESERVED_PAYLOAD_FIELDS)
        if clash:
            raise ValueError(f"{clash} are payload fields embedstream writes itself")
        return fields


class EmbedSettings(_Section):
    """Where vectors come from: a local sentence-transformers model (``provider: local``,
    the default) or an OpenAI-compatible ``/embeddings`` API (``provider: openai``:
    OpenAI, Azure OpenAI, TEI, vLLM, Infinity, Ollama). The fields after
    ``max_wait_ms`` apply to ``openai`` only."""

    provider: Literal["local", "openai"] = "local"
    # local: a sentence-transformers name or directory; openai: the API's model name.
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    # Tokens per stream micro-batch (and per local forward pass).
    max_batch_tokens: int = Field(default=8192, ge=16)
    max_wait_ms: int = Field(default=50, ge=0)
    # -- openai ------------------------------------------------------------------
    # Base URL up to the API version ("/embeddings" is appended), e.g.
    # https://api.openai.com/v1, http://tei:8080/v1, or for Azure
    # https://RESOURCE.openai.azure.com/openai/deployments/DEPLOYMENT.
    api_base: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    _usable_key = field_validator("api_key")(checked_header_secret)
    # Header the key goes in: "Authorization" sends "Bearer KEY"; Azure wants "api-key".
    api_key_header: str = Field(default="Authorization", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    # Query parameters on every request (Azure: {"api-version": "2024-10-21"}).
    query_params: dict[str, str] = Field(default_factory=dict)
    # Output size for models that can shorten their vectors (Matryoshka, e.g.
    # text-embedding-3-*); unset: the model's own, asked once at start.
    dimensions: int | None = Field(default=None, ge=1)
    # Tokenizer for chunking and for counting tokens against the limits (a Hugging
    # Face name or directory); unset: the bundled all-MiniLM-L6-v2 one. Counts from
    # another tokenizer are estimates; the usage the API reports corrects them.
    tokenizer: str | None = None
    # Longest input the model takes, in tokens (chunks are cut below it).
    max_input_tokens: int = Field(default=8191, ge=8)
    # Request size limits: inputs and (estimated) tokens per request.
    request_max_inputs: int = Field(default=96, ge=1)
    request_max_tokens: int = Field(default=300_000, ge=1)
    # Requests in flight at once.
    max_concurrency: int = Field(default=4, ge=1)
    # Client-side rate limits (token buckets holding one second's worth); unset: none.
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    # Retries of a request that got 429, 5xx, a timeout or no connection: backoff
    # from backoff_initial_s doubling up to backoff_max_s, with full jitter, or the
    # server's Retry-After when it sends one.
    max_retries: int = Field(default=8, ge=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=20.0, gt=0)
    # The provider counts as down when nothing has succeeded for this long while
    # requests keep failing: the stream pauses and re-reads the batch later, a
    # rebuild stops (resumable). It is also the longest one stream micro-batch may
    # spend embedding, rate-limit waits included (the poll loop must keep turning).
    give_up_after_s: float = Field(default=60.0, gt=0)


class ChunkSettings(_Section):
    max_tokens: int = Field(default=256, ge=8)


class SinkSettings(_Section):
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

    @field_validator("collection")
    @classmethod
    def _valid_collection(cls, name: str) -> str:
        # The one rule of every name, checked here before any path is built from it.
        problem = name_error(name, alias=True)
        if problem:
            raise ValueError(problem)
        return name


class BulkSettings(_Section):
    """The bulk rebuild (``embedstream rebuild``): engine sizes, file reading, checkpoints."""

    # Padded tokens (rows x longest) per forward pass; 0 picks 4096 on a CPU
    # (larger spills out of cache there) and 65536 on a GPU.
    batch_tokens: int = Field(default=0, ge=0)
    # "auto" runs bf16 (fp16 on GPUs without bf16) when a calibration batch is
    # faster and every vector keeps cosine >= min_cosine with fp32; else fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    min_cosine: float = Field(default=0.99, gt=0, le=1)
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


class MetricsSettings(_Section):
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
    bulk: BulkSettings = BulkSettings()

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
