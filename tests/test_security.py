"""Security settings reach the clients, and a planted secret never shows up in
logs, metrics, health answers or error messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.sinks import _server_client as server_client_module
from embedstream.sinks.qdrant_server import QdrantServerSink
from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.config import Settings, load_settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.kafka_config import kafka_client_config

from .streamkit import create_topic, produce, unique

SECRET = "PLANTED-s3cr3t-7f1c9a"
ROOT = Path(__file__).resolve().parents[1]

DEAD_LETTERED = 'embedstream_dlq_records_total{reason="invalid_json",route="default"}'


def run_cli(config: dict[str, Any], tmp_path: Path, *args: str,
            timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    config_file = tmp_path / f"{unique('config')}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "embedstream.stream.app.cli", *args, "--config", str(config_file)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def base_config(bootstrap: str, topic: str, store: Path) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "topics": [topic], "group_id": unique("g"),
                  "options": {"session.timeout.ms": 6000}},
        "source": {"format": "native"},
        "sink": {"path": str(store), "collection": "docs", "api_key": SECRET},
        "metrics": {"enabled": False},
    }


def test_config_hides_secrets_and_passes_them_to_the_clients() -> None:
    settings = Settings(kafka={
        "options": {"sasl.oauthbearer.client.secret": SECRET, "ssl.key.password": SECRET,
                    "session.timeout.ms": 6000},
        "security": {"protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                     "sasl_username": "embedder", "sasl_password": SECRET,
                     "ssl_ca_location": "/etc/ssl/ca.pem"},
    }, sink={"api_key": SECRET})
    for shown in (repr(settings), str(settings), settings.model_dump_json(),
                  json.dumps(settings.model_dump(), default=str)):
        assert SECRET not in shown
    for role in ("consumer", "producer", "admin"):
        config = kafka_client_config(settings, role)
        assert config["security.protocol"] == "SASL_SSL"
        assert config["sasl.mechanism"] == "SCRAM-SHA-512"
        assert config["sasl.username"] == "embedder"
        assert config["sasl.password"] == SECRET
        assert config["ssl.ca.location"] == "/etc/ssl/ca.pem"
        assert config["sasl.oauthbearer.client.secret"] == SECRET


def test_invalid_config_errors_name_the_field_but_not_the_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("EMBEDSTREAM_KAFKA__SECURITY__PROTOCOL", "SASL_CARRIER_PIGEON")
    monkeypatch.setenv("EMBEDSTREAM_SINK__API_KEY", SECRET)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "kafka.security.protocol" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_qdrant_tls_settings_reach_the_client(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n")
    made: list[dict[str, Any]] = []
    real_client = server_client_module.QdrantClient

    def client(**kwargs: Any) -> Any:
        made.append(kwargs)
        return real_client(location=":memory:")

    for settings, expected in (
        ({"tls_ca_file": ca}, {"verify": str(ca),
                               "grpc_options": {"root_certificates": ca.read_bytes()}}),
        ({"tls_verify": False}, {"verify": False}),
    ):
        sink = QdrantServerSink.from_settings(Settings(sink={
            "kind": "qdrant", "url": "https://qdrant.example:6333", "api_key": SECRET,
            **settings}).sink)
        monkeypatch.setattr(server_client_module, "QdrantClient", client)
        sink._connect()
        monkeypatch.undo()
        assert {k: made[-1].get(k) for k in expected} == expected
        assert made[-1]["api_key"] == SECRET and made[-1]["url"].startswith("https://")


@pytest.mark.slow
def test_a_running_service_shows_no_secret_in_logs_metrics_or_probes(
        broker: LocalBroker, tmp_path: Path) -> None:
    topic = unique("secrets")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    produce(broker.bootstrap_servers, topic, [
        (b"a", json.dumps({"id": "a", "text": "A document about otters.", "version": 1}).encode()),
        (b"b", b"{not json"),  # a dead letter: its error detail is logged too
    ])
    config = base_config(broker.bootstrap_servers, topic, tmp_path / "store")
    # Secrets the librdkafka client takes but a PLAINTEXT broker never asks for.
    config["kafka"]["options"].update({"sasl.password": SECRET, "ssl.key.password": SECRET,
                                       "debug": "conf,security"})  # librdkafka dumps its config
    port = free_port()
    config["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    config_file = tmp_path / "service.yaml"
    config_file.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "embedstream.stream.app.cli", "--log-level", "DEBUG", "consume",
         "--config", str(config_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    answers: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    metrics = r.read().decode()
                if DEAD_LETTERED in metrics:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        for path in ("/metrics", "/healthz", "/readyz"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as reply:
                answers.append(reply.read().decode())
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output[-2000:]
    assert f"{DEAD_LETTERED} 1.0" in answers[0]
    assert '"logger": "embedstream.librdkafka"' in output and "sasl.password" in output
    for text in (output, *answers):
        assert SECRET not in text


@pytest.mark.slow
def test_sasl_reaches_the_broker_and_a_refusal_names_no_secret(
        broker: LocalBroker, tmp_path: Path) -> None:
    config = base_config(broker.bootstrap_servers, unique("sasl"), tmp_path / "store")
    config["kafka"]["security"] = {"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                   "sasl_username": "embedder", "sasl_password": SECRET}
    result = run_cli(config, tmp_path, "consume")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "cannot reach Kafka" in result.stderr and "kafka.security" in result.stderr
    assert "SASL" in output  # librdkafka tried the SASL handshake: the settings went through
    assert SECRET not in output


@pytest.mark.slow
def test_an_unreachable_qdrant_names_the_url_but_not_the_api_key(
        broker: LocalBroker, tmp_path: Path) -> None:
    config = base_config(broker.bootstrap_servers, unique("qdrant"), tmp_path / "store")
    url = f"http://127.0.0.1:{free_port()}"
    config["sink"] = {"kind": "qdrant", "url": url, "api_key": SECRET, "timeout_s": 2}
    for command in (["consume"], ["export"]):
        result = run_cli(config, tmp_path, *command)
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-2000:]
        assert url in result.stderr
        assert SECRET not in output
