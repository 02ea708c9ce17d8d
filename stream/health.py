"""Liveness and readiness, and the one HTTP endpoint that serves them with the metrics.

``/healthz`` answers 200 while the consumer loop keeps turning (it beats once
per poll, also while it backs off from an unavailable store) and 503 once it
has not turned for ``metrics.liveness_timeout_s``: a stuck process, which a
restart may cure. ``/readyz`` answers 200 once the model is loaded, the store
is open and the consumer owns partitions, while the store answers and the loop
is not stalled; 503 otherwise, with the reason: starting, no partitions
assigned (the group is still forming, or there are more replicas than
partitions), the store unavailable (alive and waiting, so a restart would not
help), or stalled. ``/metrics`` is the Prometheus exposition.
``embedstream_ready`` reports the same as ``/readyz`` whenever one of these
changes (a stall shows only in ``/readyz``, as the loop that would set the
gauge is the one stalled).

The server runs in one daemon thread (as prometheus-client's own does); it
only reads the :class:`Health` fields the loop thread writes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from embedstream.stream.metrics import Metrics

__all__ = ["Health", "serve_http"]


class Health:
    """What the loop reports about itself; read by the HTTP endpoint."""

    def __init__(self, liveness_timeout_s: float, ready_gauge: Gauge | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout_s = liveness_timeout_s
        self._clock = clock
        self._gauge = ready_gauge
        self._last_beat = clock()
        self._started = False
        self._not_ready: str | None = "starting"
        self._partitions = -1  # unknown: a caller that never reports them is not held back

    def beat(self) -> None:
        """The loop turned."""
        self._last_beat = self._clock()

    def started(self) -> None:
        self._started = True
        self.set_ready(None)

    def set_ready(self, problem: str | None) -> None:
        """``None``: ready; otherwise why not (e.g. the store is unavailable)."""
        self._not_ready = problem if problem or self._started else "starting"
        self._update_gauge()

    def set_partitions(self, count: int) -> None:
        """How many partitions the consumer owns now (after each rebalance)."""
        self._partitions = count
        self._update_gauge()

    def _update_gauge(self) -> None:
        if self._gauge is not None:
            self._gauge.set(1 if self._why_not_ready() is None else 0)

    def _why_not_ready(self) -> str | None:
        if self._not_ready:
            return self._not_ready
        if self._partitions == 0:
            return "no partitions assigned (group forming, or more replicas than partitions)"
        return None

    def live(self) -> tuple[bool, str]:
        idle = self._clock() - self._last_beat
        if idle > self._timeout_s:
            return False, f"the loop has not turned for {idle:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        why = self._why_not_ready()
        if why is None:
            live, stalled = self.live()
            why = None if live else f"stalled: {stalled}"
        return (False, why) if why else (True, "ok")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass


class _Server(ThreadingWSGIServer):
    daemon_threads = True


def serve_http(metrics: Metrics, health: Health, host: str, port: int) -> Thread:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from one daemon thread."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, why = health.live() if path == "/healthz" else health.ready()
            body = json.dumps({"status": "ok" if ok else "unavailable", "detail": why}).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
            return [body]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    thread = Thread(target=server.serve_forever, name="embedstream-http", daemon=True)
    thread.start()
    return thread
