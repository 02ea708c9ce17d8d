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

The server is one daemon thread with a selector (:class:`HttpServer`): no
thread per connection, a cap on open connections and a deadline on each, so
idle or slow clients cannot pile up threads or starve the loop of the GIL. It
only reads the :class:`Health` fields the loop thread writes. Other paths get
404, methods other than GET and HEAD 405.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import selectors
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from http import HTTPStatus
from threading import Thread
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Gauge, make_wsgi_app

from embedstream.stream.config import MetricsSettings
from embedstream.stream.errors import ConfigError
from embedstream.stream.metrics import Metrics

__all__ = ["HTTP_MAX_CONNECTIONS", "HTTP_TIMEOUT_S", "Health", "HttpServer", "serve_http",
           "serve_metrics"]

log = logging.getLogger("embedstream")


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


HTTP_TIMEOUT_S = 5.0
HTTP_MAX_CONNECTIONS = 64
_MAX_HEAD_BYTES = 8192
_ROUTES = ("/metrics", "/healthz", "/readyz")
_METHODS = ("GET", "HEAD")

# (status, headers, body): what a route answers, before HEAD drops the body.
_Answer = tuple[int, list[tuple[str, str]], bytes]


def serve_http(metrics: Metrics, health: Health, host: str, port: int, *,
               timeout_s: float = HTTP_TIMEOUT_S,
               max_connections: int = HTTP_MAX_CONNECTIONS) -> HttpServer:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` from one daemon thread.

    Raises :class:`OSError` when ``host:port`` cannot be bound (nothing is started
    then). ``port`` 0 picks a free port: the returned thread's ``port`` says which."""
    metrics_app = make_wsgi_app(metrics.registry)

    def route(method: str, path: str, query: str, headers: dict[str, str]) -> _Answer:
        if path not in _ROUTES:
            return _text(404, "not found; this port serves /metrics, /healthz and /readyz")
        if method not in _METHODS:
            code, headers_out, body = _text(405, f"{method} is not allowed; use GET or HEAD")
            return code, [*headers_out, ("Allow", ", ".join(_METHODS))], body
        if path == "/metrics":
            return _call_wsgi(metrics_app, path, query, headers)
        ok, why = health.live() if path == "/healthz" else health.ready()
        body = json.dumps({"status": "ok" if ok else "unavailable", "detail": why}).encode()
        return 200 if ok else 503, [("Content-Type", "application/json")], body

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=128,
                                    dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())
    server = HttpServer(listener, route, timeout_s, max_connections)
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


def _text(code: int, message: str) -> _Answer:
    return code, [("Content-Type", "text/plain; charset=utf-8")], f"{message}\n".encode()


def _call_wsgi(app: Callable[..., Iterable[bytes]], path: str, query: str,
               headers: dict[str, str]) -> _Answer:
    """prometheus-client's own exposition (content negotiation, gzip, ``name[]``
    filters), called as the WSGI app it is; HEAD asks it for GET (it refuses HEAD)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query}
    for name in ("accept", "accept-encoding"):
        if name in headers:
            environ["HTTP_" + name.upper().replace("-", "_")] = headers[name]
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, out, *_: started.extend((status, out))))
    return int(started[0].split()[0]), list(started[1]), body


def _parse(head: bytes) -> tuple[str, str, str, dict[str, str]] | None:
    """Method, path, query and lower-cased headers of a request head; None if malformed."""
    lines = head.decode("latin-1").splitlines()
    parts = lines[0].split() if lines else []
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    target = urlsplit(parts[1])
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return parts[0], target.path, target.query, headers


def _response(answer: _Answer, head_only: bool) -> bytes:
    code, headers, body = answer
    lines = [f"HTTP/1.1 {code} {HTTPStatus(code).phrase}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)


class _Connection:
    __slots__ = ("deadline", "inbox", "outbox", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.inbox = b""
        self.outbox = b""


class HttpServer(Thread):
    """One thread, one selector: every connection is a non-blocking socket, so an
    idle or slow client costs a file descriptor and a few bytes, never a thread.

    Guaranteed: at most ``max_connections`` open at once (a new one past the cap
    closes the oldest, so a flood of idle connections cannot lock out a probe or
    a scrape that sends its request at once); each connection gets ``timeout_s``
    from its accept to the end of its answer (a client that trickles its request
    byte by byte is dropped at that deadline all the same); one request per
    connection (``Connection: close``); request heads up to 8 KiB, no bodies.
    Not guaranteed: service to a client while others open connections faster
    than it sends its request (the cap then turns over before it is served).
    """

    def __init__(self, listener: socket.socket,
                 route: Callable[[str, str, str, dict[str, str]], _Answer],
                 timeout_s: float, max_connections: int) -> None:
        super().__init__(name="embedstream-http", daemon=True)
        self.port: int = listener.getsockname()[1]
        self._listener, self._route = listener, route
        self._timeout_s, self._max = timeout_s, max_connections
        self._open: OrderedDict[socket.socket, _Connection] = OrderedDict()  # oldest first
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = False
        for sock in (listener, self._wake_read):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, None)

    def close(self) -> None:
        """Stop serving, close every connection and the port, and wait for the thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        if self.is_alive():
            self.join(5)

    def run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(self._expire()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.data is not None:
                        self._step(key.data, events)
        finally:
            for sock in list(self._open):
                self._drop(sock)
            self._selector.close()
            for sock in (self._listener, self._wake_read, self._wake_write):
                sock.close()

    def _expire(self) -> float | None:
        """Close the connections past their deadline; seconds until the next one."""
        now = time.monotonic()
        while self._open:
            first = next(iter(self._open.values()))
            if first.deadline > now:
                return first.deadline - now
            self._drop(first.sock)
        return None

    def _accept(self) -> None:
        for _ in range(self._max):  # a bounded batch, then the others get a turn
            try:
                sock, _address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    return  # e.g. ECONNABORTED: that client gave up
                # Out of descriptors: free one, or wait a little rather than spin on
                # a listener that stays readable.
                if self._open:
                    self._drop(next(iter(self._open)))
                else:
                    time.sleep(0.1)
                return
            if len(self._open) >= self._max:
                self._drop(next(iter(self._open)))
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self._timeout_s)
            self._open[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _step(self, conn: _Connection, events: int) -> None:
        if conn.sock not in self._open:
            return  # dropped earlier in this round (evicted by a newer connection)
        try:
            if events & selectors.EVENT_READ and not conn.outbox:
                data = conn.sock.recv(4096)
                if not data:
                    self._drop(conn.sock)
                    return
                conn.inbox += data
                self._answer(conn)
            if conn.outbox:
                sent = conn.sock.send(conn.outbox)
                conn.outbox = conn.outbox[sent:]
                if not conn.outbox:
                    # Read what is left (a body nobody asked for): closing over unread
                    # bytes sends a reset, which may destroy the answer in flight.
                    with contextlib.suppress(OSError):  # BlockingIOError: all read
                        for _ in range(16):
                            if not conn.sock.recv(65536):
                                break
                    self._drop(conn.sock)
        except BlockingIOError:
            pass
        except OSError:  # the client went away
            self._drop(conn.sock)
        except Exception:  # one bad connection must not end the probes' server
            log.exception("HTTP connection failed")
            self._drop(conn.sock)

    def _answer(self, conn: _Connection) -> None:
        """Once the request head is in, the whole answer goes to ``conn.outbox``."""
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0:
            end = conn.inbox.find(b"\n\n")
        if end < 0:
            if len(conn.inbox) > _MAX_HEAD_BYTES:
                conn.outbox = _response(_text(431, "request head over 8 KiB"), False)
            else:
                return
        else:
            request = _parse(conn.inbox[:end])
            if request is None:
                conn.outbox = _response(_text(400, "malformed request line"), False)
            else:
                method, path, query, headers = request
                try:
                    answer = self._route(method, path, query, headers)
                except Exception:  # a failing collector must not end the server
                    log.exception("serving %s failed", path)
                    answer = _text(500, "internal error; see the service log")
                conn.outbox = _response(answer, head_only=method == "HEAD")
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)

    def _drop(self, sock: socket.socket) -> None:
        self._open.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
