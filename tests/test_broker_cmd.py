"""``embedstream broker``: the bundled Kafka-protocol broker for local use, run as
a user runs it (a subprocess of the command line): it prints its address, serves
a producer and a consumer, stops cleanly on SIGTERM or Ctrl-C; a taken port and
``--data-dir`` are clear errors, never a Rust backtrace."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from embedstream.stream.app import cli
from embedstream.stream.app.broker import port_in_use

from .streamkit import unique

COMMAND = [sys.executable, "-m", "embedstream.stream.app.cli", "broker"]


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something else already listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def start(*args: str) -> tuple[subprocess.Popen[str], str, str]:
    """The command started; (process, bootstrap address, hint line)."""
    process = subprocess.Popen([*COMMAND, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process, process.stdout.readline().strip(), process.stdout.readline().strip()


def round_trip(bootstrap: str) -> bytes | None:
    topic = unique("hello")
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello, broker")
    assert producer.flush(15) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("g"),
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                return message.value()
    finally:
        consumer.close()
    return None


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_the_broker_serves_clients_and_stops_cleanly(stop: signal.Signals) -> None:
    process, address, hint = start()
    try:
        host, port = address.split(":")
        assert host == "127.0.0.1" and port.isdigit(), address
        assert "kafka.bootstrap_servers" in hint and address in hint
        assert round_trip(address) == b"hello, broker"
        process.send_signal(stop)  # Ctrl-C sends SIGINT
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()
    assert not port_in_use(int(port)), "the broker went with the command"


@pytest.mark.slow
def test_a_given_port_is_used() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, address, _ = start("--port", str(port))
    try:
        assert address == f"127.0.0.1:{port}"
        assert round_trip(address) == b"hello, broker"
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_a_taken_port_is_a_clear_error(listening: int) -> None:
    done = subprocess.run([*COMMAND, "--port", str(listening)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert f"embedstream: error: port {listening} is already in use" in done.stderr
    assert "panicked" not in done.stderr and "backtrace" not in done.stderr


def test_data_dir_is_refused_saying_why(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        cli_logging: None) -> None:
    assert cli.main(["broker", "--data-dir", str(tmp_path / "kafka")]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "in memory only" in err
    assert not (tmp_path / "kafka").exists()


@pytest.mark.parametrize("port", ["0", "65536", "x"])
def test_a_port_must_be_a_port(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["broker", "--port", port]) == 2
    assert "is not a port number" in capsys.readouterr().err
