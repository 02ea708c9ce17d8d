"""The ``kafka`` section of the settings: brokers, topics, group, TLS/SASL, the
dead-letter topic, and the Schema Registry that framed values are read with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from embedstream.stream._section import Section
from embedstream.stream.redact import checked_secret, secret_problem

__all__ = ["KafkaOptionValue", "KafkaSecurity", "KafkaSettings", "SchemaRegistrySettings",
           "subscription_pattern"]

KafkaOptionValue = str | int | float | bool

# librdkafka settings that hold secrets: kept as SecretStr when given in
# `kafka.options`, so no repr, log line or error message shows them.
_SECRET_OPTION_MARKERS = ("password", "secret", "sasl.jaas.config", "ssl.key.pem")


def _is_secret_option(key: object) -> bool:
    return isinstance(key, str) and any(m in key for m in _SECRET_OPTION_MARKERS)


def _reveal(value: KafkaOptionValue | SecretStr) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class KafkaSecurity(Section):
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


def checked_pattern(pattern: str | None) -> str | None:
    """``pattern`` if it is a usable topic pattern (or None); else ValueError saying why."""
    if pattern is None:
        return None
    if not pattern:
        raise ValueError("topic_pattern is empty")
    try:
        re.compile(subscription_pattern(pattern))
    except re.error as error:
        raise ValueError(f"topic_pattern is not a regular expression: {error}") from None
    return pattern


class SchemaRegistrySettings(Section):
    """A Confluent-compatible Schema Registry (Confluent, Karapace, Apicurio's ccompat
    API, Redpanda): values and keys framed as magic byte 0 + 4-byte schema id
    (Avro, Protobuf, JSON Schema) are read with the schemas it serves, cached by id."""

    # One URL, or several comma-separated (tried in turn).
    url: str = Field(pattern=r"^https?://")
    basic_auth_user: str | None = None
    basic_auth_password: SecretStr | None = None
    _no_control_characters = field_validator("basic_auth_password")(checked_secret)
    # https: a CA bundle to trust; a client certificate and key (mutual TLS).
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    # Schemas kept by id (a schema is fetched once per process, then read from here).
    cache_capacity: int = Field(default=1000, ge=1)

    def client_config(self) -> dict[str, Any]:
        """``confluent_kafka.schema_registry.SchemaRegistryClient``'s settings,
        the password revealed (for the client only)."""
        config: dict[str, Any] = {"url": self.url, "timeout": self.timeout_s,
                                  "cache.capacity": self.cache_capacity}
        if self.basic_auth_user is not None:
            password = self.basic_auth_password.get_secret_value() \
                if self.basic_auth_password else ""
            config["basic.auth.user.info"] = f"{self.basic_auth_user}:{password}"
        for key, path in (("ssl.ca.location", self.ssl_ca_location),
                          ("ssl.certificate.location", self.ssl_certificate_location),
                          ("ssl.key.location", self.ssl_key_location)):
            if path is not None:
                config[key] = str(path)
        return config


def subscription_pattern(pattern: str) -> str:
    """The pattern as subscribed: librdkafka takes a topic name starting with ``^``
    as a regular expression (searched from the start), so one is added if absent;
    embedstream routes a topic with ``re.search`` on the same text."""
    return pattern if pattern.startswith("^") else f"^{pattern}"


class KafkaSettings(Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    # Instead of topics: every topic whose name matches this regular expression,
    # now and created later (librdkafka checks every topic.metadata.refresh.interval.ms).
    # Write it so that librdkafka and Python read it alike (e.g. ^db1\.shop\.[a-z_]+$).
    topic_pattern: str | None = None
    topics: tuple[str, ...] = ("dbserver1.inventory.products",)
    group_id: str = "embedstream"
    schema_registry: SchemaRegistrySettings | None = None
    # Any librdkafka setting, passed through to consumer and DLQ producer alike.
    # Values of secret settings (passwords, secrets) are held as SecretStr.
    options: dict[str, KafkaOptionValue | SecretStr] = Field(
        default_factory=lambda: dict[str, KafkaOptionValue | SecretStr](
            {"session.timeout.ms": 6000})
    )
    security: KafkaSecurity = KafkaSecurity()
    # One dead-letter topic for every topic; default: one per group and topic,
    # "<group_id>.<topic>.dlq" (see dlq_topic_for).
    dlq_topic: str | None = None
    # `dlq list` and `dlq replay` also read the dead-letter topics under the old
    # default name, "<topic>.dlq" (shared by every group; older records name no group).
    dlq_legacy_topics: bool = False
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

    @model_validator(mode="before")
    @classmethod
    def _pattern_replaces_topics(cls, data: Any) -> Any:
        # The default topic list gives way to a pattern; an explicit one clashes with it.
        if isinstance(data, dict) and data.get("topic_pattern") is not None:
            if data.get("topics"):
                raise ValueError("give topics or topic_pattern, not both")
            data = {**data, "topics": ()}
        return data

    @field_validator("topics")
    @classmethod
    def _non_empty_names(cls, topics: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # topic_pattern is declared first, so it is validated (and seen here) first.
        if (not topics and info.data.get("topic_pattern") is None) or any(not t for t in topics):
            raise ValueError("name at least one non-empty topic (or a topic_pattern)")
        return topics

    _compiles = field_validator("topic_pattern")(checked_pattern)

    def dlq_topic_for(self, topic: str) -> str:
        """Where the dead letters of ``topic`` go: ``kafka.dlq_topic``, else
        ``<group_id>.<topic>.dlq``, so that two groups reading one topic keep theirs
        apart. Characters of the group a topic name cannot hold become ``_``. The
        name ends ``.dlq``, which keeps topic patterns off it (embedstream.stream.routing)."""
        if self.dlq_topic:
            return self.dlq_topic
        return f"{_TOPIC_UNSAFE.sub('_', self.group_id)}.{topic}.dlq"

    def legacy_dlq_topic_for(self, topic: str) -> str | None:
        """The dead-letter topic of ``topic`` under the old default name,
        ``<topic>.dlq``; None when ``kafka.dlq_topic`` names one for all."""
        return None if self.dlq_topic else f"{topic}.dlq"

    @model_validator(mode="after")
    def _dlq_names_fit(self) -> KafkaSettings:
        self.check_dlq_names(self.topics)
        return self

    def check_dlq_names(self, topics: tuple[str, ...]) -> None:
        """Kafka refuses topic names over 249 characters: say so at start, not at the
        first dead letter (topics a pattern finds later are checked by Kafka only).
        ValueError naming the topic."""
        for topic in topics:
            name = self.dlq_topic_for(topic)
            if len(name) > _MAX_TOPIC:
                raise ValueError(
                    f"the dead-letter topic of {topic!r} would be {name[:60]!r}... "
                    f"({len(name)} characters, Kafka takes at most {_MAX_TOPIC}): set "
                    "kafka.dlq_topic, or use a shorter kafka.group_id")


# Kafka topic names: ASCII letters, digits, ".", "_" and "-", at most 249 characters.
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_TOPIC = 249
