"""The HTTP port under 1,000 idle and 50 slow clients: no thread per connection, a
bounded number of connections, every connection dropped at its deadline, probes and
scrapes still answered at once, and the loop (stood in for by a thread that ticks
every 10 ms, contending for the GIL as the real one would) not held up. Also where
the port listens by default and in the Helm chart.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from embedstream.stream.config import MetricsSettings
from embedstream.stream.health import Health

IDLE, SLOW = 1000, 50
# The promised limits (stream/health.py HTTP_MAX_CONNECTIONS and HTTP_TIMEOUT_S).
MAX_CONNECTIONS, TIMEOUT_S = 64, 5.0
SLOW_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: embedstream\r\n\r\n"
SLOW_BYTE_EVERY_S = 0.2  # the whole request would take ~9 s, past the 5 s deadline
CHART = Path(__file__).resolve().parents[1] / "helm" / "embedstream"


@pytest.fixture
def enough_descriptors() -> Iterator[None]:
    """Room for this test's 1,050 client sockets and the server's, in one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 3 * (IDLE + SLOW)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the open-files limit is {hard}; this test needs {needed}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Ticker(threading.Thread):
    """Stands in for the consumer loop: wakes every 10 ms; the longest gap between two
    wakes is how long something else (holding the GIL, or a CPU) held it up."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.worst_gap_s = 0.0

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.01):
            now = time.monotonic()
            self.worst_gap_s = max(self.worst_gap_s, now - last)
            last = now


class SlowClients(threading.Thread):
    """Sends ``SLOW_REQUEST`` on each of its connections a byte at a time."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.sockets = sockets
        self.stop = threading.Event()
        self.dropped = 0  # connections the server closed while we were still sending

    def run(self) -> None:
        sending = list(self.sockets)
        for i in range(len(SLOW_REQUEST)):
            if self.stop.wait(SLOW_BYTE_EVERY_S):
                return
            for conn in list(sending):
                try:
                    conn.send(SLOW_REQUEST[i:i + 1])
                except OSError:  # reset or broken pipe: the server dropped it
                    sending.remove(conn)
                    self.dropped += 1


def server_connections(port: int) -> int:
    """Established TCP connections whose local end is ``port`` (the server's side)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def closed_by_server(sockets: list[socket.socket], deadline: float) -> int:
    """How many of ``sockets`` see the server's end of the connection by ``deadline``."""
    waiting = selectors.DefaultSelector()
    for conn in sockets:
        conn.setblocking(False)
        waiting.register(conn, selectors.EVENT_READ)
    closed = 0
    while closed < len(sockets) and time.monotonic() < deadline:
        for key, _ in waiting.select(max(0.0, deadline - time.monotonic())):
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            try:
                if conn.recv(65536):
                    continue  # an answer (none expected, but not a failure here)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                pass
            waiting.unregister(conn)
            closed += 1
    waiting.close()
    return closed


def timed_get(port: int, path: str) -> tuple[int, float]:
    start = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        reply.read()
        return int(reply.status), time.monotonic() - start


@pytest.mark.timeout(90)
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts connections in /proc")
def test_idle_and_slow_clients_cost_no_threads_and_do_not_stall_the_loop(
        enough_descriptors: None, served: tuple[int, Health]) -> None:
    port, _ = served
    ticker = Ticker()
    ticker.start()
    threads_before = threading.active_count()  # the server's and the ticker's included
    fds_before = len(os.listdir("/proc/self/fd"))
    clients: list[socket.socket] = []
    try:
        for i in range(IDLE):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            if i % 100 == 99:  # a thread per connection shows at once
                assert threading.active_count() <= threads_before, (
                    f"{threading.active_count() - threads_before} threads more for {i + 1} "
                    "idle connections")
        slow = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(SLOW)]
        clients += slow
        last_connect = time.monotonic()
        slow_clients = SlowClients(slow)
        slow_clients.start()
        threads_before += 1
        latencies, threads, connections, server_fds = [], [], [], []
        for i in range(30):  # ~3 s of probes and scrapes while the load is on
            status, took = timed_get(port, "/metrics" if i % 2 else "/readyz")
            assert status == 200
            latencies.append(took)
            threads.append(threading.active_count())
            connections.append(server_connections(port))
            server_fds.append(len(os.listdir("/proc/self/fd")) - fds_before - len(clients))
            time.sleep(0.1)

        assert max(threads) <= threads_before, (
            f"{max(threads) - threads_before} threads more under {IDLE} idle and {SLOW} "
            "slow connections")
        assert max(connections) <= MAX_CONNECTIONS + 2, (
            f"the server held {max(connections)} connections open")
        assert max(latencies) < 1.0, f"a request took {max(latencies):.2f} s under load"
        # Every idle and slow connection is closed by the server, at the latest at its
        # deadline (the slow ones mid-request).
        deadline = last_connect + TIMEOUT_S + 3
        assert closed_by_server(clients, deadline) == len(clients), (
            f"connections still open {TIMEOUT_S + 3:g} s after they were made")
        slow_clients.stop.set()
        slow_clients.join(5)
        assert ticker.worst_gap_s < 0.2, (
            f"the loop stand-in stalled {ticker.worst_gap_s * 1000:.0f} ms")
        status, took = timed_get(port, "/metrics")
        assert status == 200 and took < 1.0
    finally:
        ticker.stop.set()
        for conn in clients:
            conn.close()
    measured = (f"worst tick gap {ticker.worst_gap_s * 1000:.0f} ms, request p50 "
                f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, max "
                f"{max(latencies) * 1000:.1f} ms, threads {max(threads)} "
                f"(before {threads_before}), server connections {max(connections)}, "
                f"accepted sockets held {max(server_fds)}")
    print(measured)


def test_the_port_listens_on_loopback_unless_configured() -> None:
    # /metrics names topics and collections: nothing outside the host by default.
    assert MetricsSettings().host == "127.0.0.1"
    assert MetricsSettings(host="0.0.0.0").host == "0.0.0.0"


def test_the_chart_listens_on_the_pod_address() -> None:
    helm = pytest.importorskip("helm_python")
    for values in ({}, {"config": {"metrics": {"host": None}}}):
        with helm.Chart.load(CHART) as chart:
            manifests = chart.render(values, name="es", namespace="search")
        config_map = next(doc for path, text in manifests.items() if not path.endswith(".txt")
                          for doc in yaml.safe_load_all(text)
                          if doc and doc["kind"] == "ConfigMap" and "config.yaml" in doc["data"])
        config = yaml.safe_load(config_map["data"]["config.yaml"])
        # The kubelet's probes and Prometheus come to the pod IP, not to loopback.
        assert config["metrics"]["host"] == "0.0.0.0", values
