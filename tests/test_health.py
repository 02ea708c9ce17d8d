"""Readiness: started, owning partitions, the store answering and the loop turning;
and the HTTP endpoint that serves it: its paths, methods and refusals."""

from __future__ import annotations

import gzip
import json
import socket
import urllib.error
import urllib.request

from embedstream.stream.health import Health
from embedstream.stream.metrics import Metrics


def test_ready_only_when_started_assigned_answering_and_turning() -> None:
    now = [0.0]
    metrics = Metrics()
    health = Health(30.0, ready_gauge=metrics.ready, clock=lambda: now[0])

    def gauge() -> float | None:
        return metrics.registry.get_sample_value("embedstream_ready")

    assert health.ready() == (False, "starting") and gauge() == 0
    health.set_partitions(0)
    health.started()
    ok, why = health.ready()
    assert not ok and "no partitions assigned" in why and gauge() == 0
    health.set_partitions(2)
    assert health.ready() == (True, "ok") and gauge() == 1
    health.set_ready("store unavailable: timed out")
    assert health.ready() == (False, "store unavailable: timed out") and gauge() == 0
    health.set_ready(None)
    assert health.ready() == (True, "ok")
    now[0] = 45.0  # the loop has not turned for longer than the liveness timeout
    ok, why = health.ready()
    assert not ok and why.startswith("stalled") and not health.live()[0]
    health.beat()
    assert health.ready() == (True, "ok")
    health.set_partitions(0)  # e.g. all revoked to another replica
    assert not health.ready()[0] and gauge() == 0


# ======================================================================================
# The HTTP endpoint: three paths, GET and HEAD, one answer per connection
# ======================================================================================

def request(port: int, path: str, method: str = "GET",
            data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body, whatever the status."""
    asked = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(asked, timeout=5) as reply:
            return int(reply.status), dict(reply.headers), reply.read()
    except urllib.error.HTTPError as error:
        return int(error.code), dict(error.headers), error.read()


def raw(port: int, sent: bytes) -> bytes:
    """What the server answers ``sent``, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(sent)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def test_probes_and_metrics_answer_on_their_paths(served: tuple[int, Health]) -> None:
    port, health = served
    status, headers, body = request(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"embedstream_ready 1.0" in body
    assert request(port, "/healthz")[::2] == (200, b'{"status": "ok", "detail": "ok"}')
    assert request(port, "/readyz")[0] == 200
    health.set_ready("store unavailable: timed out")
    status, _, body = request(port, "/readyz")
    assert status == 503 and json.loads(body)["detail"] == "store unavailable: timed out"
    # prometheus-client's own options still work: a filter on names, gzip, OpenMetrics.
    _, _, body = request(port, "/metrics?name[]=embedstream_ready")
    assert [line for line in body.decode().splitlines() if not line.startswith("#")] == [
        "embedstream_ready 0.0"]
    answer = raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n"
                       b"Accept: application/openmetrics-text; version=1.0.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"openmetrics-text" in head
    assert gzip.decompress(body).endswith(b"# EOF\n")


def test_unknown_paths_get_404_not_the_metrics(served: tuple[int, Health]) -> None:
    port, _ = served
    for path in ("/", "/metricsx", "/favicon.ico", "/healthz/extra", "/admin?x=1"):
        status, _, body = request(port, path)
        assert status == 404, path
        assert b"embedstream_" not in body and b"/metrics, /healthz and /readyz" in body


def test_methods_other_than_get_and_head_get_405(served: tuple[int, Health]) -> None:
    port, _ = served
    for method, data in (("POST", b"x" * 100_000), ("PUT", b"{}"), ("DELETE", None),
                         ("OPTIONS", None)):
        for path in ("/metrics", "/readyz"):
            status, headers, body = request(port, path, method, data)
            assert (status, headers.get("Allow")) == (405, "GET, HEAD"), (method, path)
            assert b"embedstream_" not in body
    status, headers, body = request(port, "/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


def test_malformed_or_oversized_requests_are_refused(served: tuple[int, Health]) -> None:
    port, _ = served
    assert raw(port, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET /" + b"a" * 10_000).startswith(b"HTTP/1.1 431 ")
    assert raw(port, b"GET /readyz HTTP/1.0\n\n").startswith(b"HTTP/1.1 200 ")
    assert request(port, "/healthz")[0] == 200  # and it goes on serving
