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

The server is one daemon thread with a selector
(:class:`~embedstream.stream.http_server.HttpServer`): no thread per connection,
a cap on open connections and a deadline on each, so idle or slow clients cannot
pile up threads or starve the loop of the GIL. It reads no request bodies and
only reads the :class:`Health` fields the loop thread writes. Other paths get
404, methods other than GET and HEAD 405.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import Gauge, make_wsgi_app

from embedstream.stream.config import MetricsSettings
from embedstream.stream.errors import ConfigError
from embedstream.stream.http_server import (
    HTTP_MAX_CONNECTIONS,
    HTTP_TIMEOUT_S,
    Answer,
    HttpServer,
    Request,
    listen,
    text_answer,
)
from embedstream.stream.metrics import Metrics

# The server's names stay importable from here, where they were first.
__all__ = ["HTTP_MAX_CONNECTIONS", "HTTP_TIMEOUT_S", "Health", "HttpServer", "serve_http",
           "serve_metrics"]


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


_ROUTES = ("/metrics", "/healthz", "/readyz")
_METHODS = ("GET", "HEAD")


def serve_http(metrics: Metrics, health: Health, host: str, port: int, *,
               timeout_s: float = HTTP_TIMEOUT_S,
               max_connections: int = HTTP_MAX_CONNECTIONS) -> HttpServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from one daemon thread.

    Raises :class:`OSError` when ``host:port`` cannot be bound (nothing is started
    then). ``port`` 0 picks a free port: the returned thread's ``port`` says which."""
    metrics_app = make_wsgi_app(metrics.registry)

    def route(request: Request) -> Answer:
        method, path = request.method, request.path
        if path not in _ROUTES:
            return text_answer(404, "not found; this port serves /metrics, /healthz and /readyz")
        if method not in _METHODS:
            code, headers_out, body = text_answer(405, f"{method} is not allowed; use GET or HEAD")
            return code, [*headers_out, ("Allow", ", ".join(_METHODS))], body
        if path == "/metrics":
            return _call_wsgi(metrics_app, path, request.query, request.headers)
        ok, why = health.live() if path == "/healthz" else health.ready()
        body = json.dumps({"status": "ok" if ok else "unavailable", "detail": why}).encode()
        return 200 if ok else 503, [("Content-Type", "application/json")], body

    server = HttpServer(listen(host, port), route, timeout_s, max_connections)
    server.start()
    return server


def serve_metrics(metrics: Metrics, health: Health, settings: MetricsSettings) -> HttpServer:
    """:func:`serve_http` on ``metrics.host:metrics.port``; :class:`ConfigError`
    naming the address and the settings when it cannot be bound (the port taken,
    the host not this machine's), for the consumer to stop on and a rebuild to log."""
    try:
        return serve_http(metrics, health, settings.host, settings.port)
    except OSError as error:
        raise ConfigError(
            f"cannot serve /metrics on {settings.host}:{settings.port} (metrics.port, "
            f"metrics.host): {error.strerror or error}; free the port or set another"
        ) from None


def _call_wsgi(app: Callable[..., Iterable[bytes]], path: str, query: str,
               headers: Mapping[str, str]) -> Answer:
    """prometheus-client's own exposition (content negotiation, gzip, ``name[]``
    filters), called as the WSGI app it is; HEAD asks it for GET (it refuses HEAD)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query}
    for name in ("accept", "accept-encoding"):
        if name in headers:
            environ["HTTP_" + name.upper().replace("-", "_")] = headers[name]
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, out, *_: started.extend((status, out))))
    return int(started[0].split()[0]), list(started[1]), body
