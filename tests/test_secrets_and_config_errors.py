"""Secrets never shown, and configuration mistakes as one clear line, exit 2.

A secret with a control character (a trailing newline copied into a Kubernetes
secret) is refused at load, naming the field and not the value; a secret an HTTP
client or a provider quotes back is masked wherever the text goes (exceptions,
dead-letter details, log lines). A config file that is not UTF-8, not YAML or not
a mapping, an environment override that is not the JSON its field takes, and a
taken metrics port each stop the command with one line naming the file, the
variable or the setting, never a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.stream.app.cli import main
from embedstream.stream.config import EmbedSettings, load_settings
from embedstream.stream.errors import ConfigError, EmbedderError, EmbedFailures
from embedstream.stream.remote_embedding import OpenAIEmbedder

KEY = "sk-live-7f1c9a2b4d6e8f00"
COMMANDS = [["consume"], ["rebuild", "--source", "kafka"], ["dlq", "list"],
            ["search", "anything"]]


pytestmark = pytest.mark.usefixtures("cli_logging")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def one_clear_line(err: str) -> str:
    """The error line of a command that stopped on a configuration mistake."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("embedstream: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- configuration files and the environment --------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(("content", "says"), [
    (b"kafka:\n  group_id: caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 2)"),
    (b"kafka:\n  topics: [a, b\nsink: {}\n", "not valid YAML"),
    (b"kafka:\n\tgroup_id: x\n", "not valid YAML"),
    (b"- kafka\n- sink\n", "must be a mapping of sections"),
    (b"just a sentence\n", "must be a mapping of sections"),
], ids=["latin-1", "unclosed-list", "tab", "top-level-list", "scalar"])
def test_an_unreadable_config_file_is_one_line_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str],
        content: bytes, says: str) -> None:
    path = tmp_path / "embedstream.yaml"
    path.write_bytes(content)
    code, err = run(capsys, *command, "--config", str(path))
    assert code == 2
    line = one_clear_line(err)
    assert str(path) in line and says in line


def test_a_yaml_error_says_where_without_quoting_the_line(tmp_path: Path) -> None:
    path = tmp_path / "embedstream.yaml"
    path.write_text(f"embed:\n  api_key: {KEY}\n  model: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "line 4" in str(caught.value) and KEY not in str(caught.value)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(("variable", "value", "field"), [
    ("EMBEDSTREAM_KAFKA__TOPICS", "[orders, products", "kafka.topics"),
    ("EMBEDSTREAM_KAFKA__TOPICS", "orders,products", "kafka.topics"),
    ("EMBEDSTREAM_EMBED__QUERY_PARAMS", "{api-version: 2024-10-21}", "embed.query_params"),
    ("EMBEDSTREAM_KAFKA__OPTIONS", '{"sasl.password": "' + KEY + '"', "kafka.options"),
])
def test_an_environment_override_that_is_not_json_names_the_variable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        command: list[str], variable: str, value: str, field: str) -> None:
    monkeypatch.setenv(variable, value)
    code, err = run(capsys, *command)
    assert code == 2
    line = one_clear_line(err)
    assert variable in line and f"({field})" in line and "not valid JSON" in line
    assert KEY not in err


# -- secrets at load ----------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "field"), [
    ("EMBEDSTREAM_EMBED__API_KEY", KEY + "\n", "embed.api_key"),
    ("EMBEDSTREAM_EMBED__API_KEY", KEY + "\r\n", "embed.api_key"),
    ("EMBEDSTREAM_SINK__API_KEY", "\t" + KEY, "sink.api_key"),
    ("EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD", KEY + "\n", "kafka.security.sasl_password"),
    ("EMBEDSTREAM_KAFKA__SECURITY__SSL_KEY_PASSWORD", KEY + "\x7f",
     "kafka.security.ssl_key_password"),
    ("EMBEDSTREAM_KAFKA__OPTIONS", json.dumps({"sasl.password": KEY + "\n"}),
     "kafka.options"),
])
def test_a_secret_with_a_control_character_is_refused_naming_the_field_not_the_value(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match="control character") as caught:
        load_settings()
    assert field in str(caught.value) and KEY not in str(caught.value)


def test_the_command_line_refuses_it_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMBEDSTREAM_EMBED__API_KEY", KEY + "\n")
    monkeypatch.setenv("EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")
    code, err = run(capsys, "dlq", "list")
    assert code == 2
    assert "embed.api_key" in err and "control character" in err
    assert KEY not in err and "Traceback" not in err


def test_a_secret_in_the_file_is_refused_the_same_way(tmp_path: Path) -> None:
    path = tmp_path / "embedstream.yaml"
    path.write_text(yaml.safe_dump({"embed": {"provider": "openai", "api_key": KEY + "\n"}}))
    with pytest.raises(ConfigError, match=r"embed\.api_key: .*control character") as caught:
        load_settings(path)
    assert KEY not in str(caught.value)


def test_an_api_key_an_http_header_cannot_carry_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"embed\.api_key: .*non-ASCII"):
        load_settings(embed={"api_key": "sk-live-caf\u00e9"})


@pytest.mark.parametrize("header", ["api key", "api-key\n", "Authorization:"])
def test_an_api_key_header_that_is_no_header_name_is_refused(header: str) -> None:
    with pytest.raises(ConfigError, match=r"embed\.api_key_header"):
        load_settings(embed={"api_key_header": header})


def test_a_pem_key_keeps_its_newlines() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
    settings = load_settings(kafka={"options": {"ssl.key.pem": pem}})
    assert settings.kafka.librdkafka_options()["ssl.key.pem"] == pem


# -- secrets quoted back ---------------------------------------------------------------


class EchoingProvider:
    """An OpenAI-style API that quotes the Authorization header back in its errors (some
    gateways do): 401 for everything when ``refuse`` is set, else 400 for an input
    containing "ECHO" (padded so that the key starts 10 characters before the 300th,
    where a message cut to 300 characters would end) and 4-dimensional vectors for
    the rest."""

    def __init__(self) -> None:
        self.refuse = False
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                echo = f"invalid credentials {self.headers.get('Authorization')!r}"
                if provider.refuse:
                    status, body = 401, {"error": {"message": echo}}
                elif any("ECHO" in text for text in request["input"]):
                    padding = "x" * (290 - len("invalid credentials 'Bearer "))
                    status, body = 400, {"error": {"message": padding + echo}}
                else:
                    status, body = 200, {"data": [
                        {"index": i, "embedding": [1.0, 0.5, 0.25, float(i + 1)]}
                        for i in range(len(request["input"]))]}
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture()
def provider() -> Iterator[EchoingProvider]:
    server = EchoingProvider()
    yield server
    server.close()


def embed_settings(provider: EchoingProvider) -> EmbedSettings:
    return EmbedSettings(provider="openai", model="echo", api_base=provider.url, api_key=KEY,
                         max_retries=0, timeout_s=5)


def no_part_of_the_key(text: str) -> bool:
    return not any(KEY[i:i + 8] in text for i in range(len(KEY) - 7))


def test_a_provider_echoing_the_key_in_a_refusal_shows_no_part_of_it(
        provider: EchoingProvider, caplog: pytest.LogCaptureFixture) -> None:
    provider.refuse = True
    with caplog.at_level(logging.DEBUG), pytest.raises(EmbedderError) as caught:
        OpenAIEmbedder(embed_settings(provider))
    assert "invalid credentials" in str(caught.value) and "***" in str(caught.value)
    assert no_part_of_the_key(str(caught.value)) and no_part_of_the_key(caplog.text)


def test_a_provider_echoing_the_key_for_a_rejected_text_shows_no_part_of_it(
        provider: EchoingProvider, caplog: pytest.LogCaptureFixture) -> None:
    embedder = OpenAIEmbedder(embed_settings(provider))
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(EmbedFailures) as caught:
            embedder.embed(["a fine text", "ECHO this one back", "another fine one"])
    finally:
        embedder.close()
    [(reason, detail)] = caught.value.failed.values()  # the dead-letter detail
    assert reason == "embed_rejected" and "HTTP 400" in detail
    assert no_part_of_the_key(detail) and no_part_of_the_key(caplog.text)


def test_the_command_line_masks_the_key_in_its_error(
        provider: EchoingProvider, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    provider.refuse = True
    path = tmp_path / "embedstream.yaml"
    path.write_text(yaml.safe_dump({
        "embed": {"provider": "openai", "model": "echo", "api_base": provider.url,
                  "api_key": KEY, "max_retries": 0},
        "sink": {"path": str(tmp_path / "store")}, "metrics": {"enabled": False}}))
    code, err = run(capsys, "search", "otters", "--config", str(path))
    assert code == 2
    line = one_clear_line(err)
    assert "invalid credentials" in line and "***" in line
    assert no_part_of_the_key(err)


def test_log_lines_and_tracebacks_are_masked_whoever_writes_them() -> None:
    from embedstream.stream.redact import RedactingFilter, Redactor

    secret = "pa'ss\\word-42"  # quoted and escaped differently by str, repr and JSON
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter(Redactor([secret])))
    logger = logging.getLogger(f"{__name__}.masked")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("refused header %r (json %s)", ("Bearer " + secret).encode(),
                       json.dumps(secret))
        try:
            raise ValueError(f"bad password {secret}")
        except ValueError:
            logger.exception("connecting failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "refused header" in text and "ValueError: bad password ***" in text
    assert "pa'ss" not in text and "pa\\'ss" not in text and "word-42" not in text


# -- the metrics port ------------------------------------------------------------------


@pytest.fixture()
def signal_handlers() -> Iterator[None]:
    """``consume`` installs its own SIGTERM/SIGINT handlers; put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_consume_on_a_taken_metrics_port_stops_with_one_line_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], signal_handlers: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "embedstream.yaml"
        path.write_text(yaml.safe_dump({
            "kafka": {"bootstrap_servers": "127.0.0.1:1"},
            "sink": {"path": str(tmp_path / "store")},
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": port}}))
        code, err = run(capsys, "consume", "--config", str(path))
    assert code == 2
    line = one_clear_line(err)
    assert f"127.0.0.1:{port}" in line and "metrics.port" in line
