"""Configuration: YAML file, environment overrides, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from embedstream.stream.config import load_settings
from embedstream.stream.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "embedstream.yaml"
    path.write_text(text)
    return path


def test_contract_file_loads_and_env_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, """
kafka:
  bootstrap_servers: 10.0.0.1:9092
  topics: [dbserver1.inventory.products]
  group_id: embedstream
  options: {session.timeout.ms: 6000, security.protocol: SASL_SSL}
  dlq_topic: null
source: {format: debezium, id_fields: [id], text_fields: [name, description], version: auto}
embed:
  model: sentence-transformers/all-MiniLM-L6-v2
  device: auto
  max_batch_tokens: 8192
  max_wait_ms: 50
chunk: {max_tokens: 256}
sink: {kind: qdrant-edge, path: ./data, url: null, api_key: null, collection: documents}
metrics: {port: 9108}
""")
    monkeypatch.setenv("EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "broker:9093")
    monkeypatch.setenv("EMBEDSTREAM_SINK__API_KEY", "s3cret-key")
    settings = load_settings(path)
    assert settings.kafka.bootstrap_servers == "broker:9093"
    assert settings.kafka.options["security.protocol"] == "SASL_SSL"
    topic = "dbserver1.inventory.products"
    assert settings.kafka.dlq_topic_for(topic) == f"embedstream.{topic}.dlq"  # per group
    assert settings.source.text_fields == ("name", "description")
    assert settings.sink.api_key is not None
    assert settings.sink.api_key.get_secret_value() == "s3cret-key"
    assert "s3cret-key" not in repr(settings)


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "chunk: {max_tokens: 100}\n"))
    with pytest.raises(ValidationError, match="frozen"):
        settings.chunk.max_tokens = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("chunk: {max_tokens: lots}\n", "chunk.max_tokens"),
        ("sink: {kind: pinecone}\n", "sink.kind"),
        ("kafka: {topics: []}\n", "kafka.topics"),
        ("embed: {device: tpu}\n", "embed.device"),
        ("source: {metadata_fields: [text]}\n", "source.metadata_fields"),
        ("kafka: {bootstrap_server: x}\n", "kafka.bootstrap_server"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(write(tmp_path, yaml_text))


def test_invalid_env_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSTREAM_EMBED__MAX_WAIT_MS", "-1")
    with pytest.raises(ConfigError, match=r"embed\.max_wait_ms"):
        load_settings()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
