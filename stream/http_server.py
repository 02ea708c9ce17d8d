"""A small HTTP/1.1 server on one thread: the probes' and metrics' port, and the query port.

:class:`HttpServer` is one daemon thread with a selector: no thread per connection, a
cap on open connections and a deadline on each, so idle or slow clients cannot pile up
threads or starve the consumer loop of the GIL. A *route* (a plain function of a
:class:`Request`) computes each answer on that thread, one request at a time: the
server never runs two routes at once, which is the concurrency bound of whatever the
routes do. An answer's body is bytes, or an iterator of bytes streamed as it is read
(chunked transfer encoding, pulled a little at a time while the client keeps up).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from threading import Thread
from urllib.parse import urlsplit

__all__ = ["HTTP_MAX_CONNECTIONS", "HTTP_TIMEOUT_S", "Answer", "HttpServer", "Request", "Route",
           "listen", "text_answer"]

log = logging.getLogger("embedstream")

HTTP_TIMEOUT_S = 5.0
HTTP_MAX_CONNECTIONS = 64
_MAX_HEAD_BYTES = 8192
_STREAM_BUFFER = 64 * 1024  # bytes of a streamed body pulled ahead of the client


@dataclass(frozen=True, slots=True)
class Request:
    """One request: ``path`` and ``query`` (the raw query string) split from its target,
    header names lower-cased, ``body`` empty unless the server reads bodies."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes = b""


# (status, headers, body): bytes, or an iterator of bytes streamed (chunked).
Answer = tuple[int, list[tuple[str, str]], bytes | Iterator[bytes]]
Route = Callable[[Request], Answer]


def text_answer(code: int, message: str) -> Answer:
    """A plain-text answer: ``message`` and a newline."""
    return code, [("Content-Type", "text/plain; charset=utf-8")], f"{message}\n".encode()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (IPv6 when ``host`` has a colon; ``::`` takes
    IPv4 too where the system can); :class:`OSError` when it cannot be bound. Port 0
    picks a free one (``getsockname()`` says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128,
                                dualstack_ipv6=host == "::" and socket.has_dualstack_ipv6())


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


def _head(code: int, headers: list[tuple[str, str]], length: str) -> bytes:
    lines = [f"HTTP/1.1 {code} {HTTPStatus(code).phrase}", *(f"{k}: {v}" for k, v in headers),
             length, "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1")


class _Connection:
    __slots__ = ("answered", "deadline", "inbox", "lingering", "outbox", "sock", "stream")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline = sock, deadline
        self.inbox = b""
        self.outbox = b""
        self.answered = False
        self.lingering = False  # answered; waiting for the client to close
        self.stream: Iterator[bytes] | None = None  # the rest of a streamed body


class HttpServer(Thread):
    """One thread, one selector: every connection is a non-blocking socket, so an
    idle or slow client costs a file descriptor and a few bytes, never a thread.

    Guaranteed: at most ``max_connections`` open at once (a new one past the cap
    closes the oldest, so a flood of idle connections cannot lock out a probe or
    a scrape that sends its request at once); each connection gets ``timeout_s``
    from its accept to its whole request (a client that trickles its request byte
    by byte is dropped at that deadline all the same), and ``timeout_s`` again from
    each step of its answer (computed, or a part of it sent); one request per
    connection (``Connection: close``), half-closed once answered and read until the
    client closes (within the deadline); request heads up to 8 KiB. Bodies: with
    ``max_body_bytes`` 0 none is read (the answer comes once the head is in);
    otherwise a body needs a ``Content-Length`` of at most ``max_body_bytes`` (413
    when over, before a byte of it is read; 411 for a chunked one).
    Not guaranteed: service to a client while others open connections faster
    than it sends its request (the cap then turns over before it is served); an
    answer to a client whose request waits behind slower routes past its deadline.
    """

    def __init__(self, listener: socket.socket, route: Route, timeout_s: float,
                 max_connections: int, max_body_bytes: int = 0,
                 name: str = "embedstream-http") -> None:
        super().__init__(name=name, daemon=True)
        self.port: int = listener.getsockname()[1]
        self._listener, self._route = listener, route
        self._timeout_s, self._max = timeout_s, max_connections
        self._max_body = max_body_bytes
        self._open: OrderedDict[socket.socket, _Connection] = OrderedDict()  # by deadline
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = False
        for sock in (listener, self._wake_read):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, None)

    def close(self) -> None:
        """Stop serving, close every connection and the port, and wait for the thread
        (at most 5 s: a route computing an answer finishes it first)."""
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

    def _touch(self, conn: _Connection) -> None:
        """A new deadline from now. It is the latest of all (each was set from an
        earlier now), so moving it last keeps ``_open`` ordered by deadline."""
        conn.deadline = time.monotonic() + self._timeout_s
        self._open.move_to_end(conn.sock)

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
            if conn.lingering:
                for _ in range(16):  # a bounded turn, then the others get theirs
                    if not conn.sock.recv(65536):
                        self._drop(conn.sock)
                        return
                return
            if events & selectors.EVENT_READ and not conn.answered:
                data = conn.sock.recv(65536)
                if not data:
                    self._drop(conn.sock)
                    return
                conn.inbox += data
                self._answer(conn)
            if conn.answered:
                self._send(conn)
        except BlockingIOError:
            pass
        except OSError:  # the client went away
            self._drop(conn.sock)
        except Exception:  # one bad connection must not end the server
            log.exception("HTTP connection failed")
            self._drop(conn.sock)

    def _send(self, conn: _Connection) -> None:
        if not conn.outbox and conn.stream is not None and not self._refill(conn):
            return
        if conn.outbox:
            sent = conn.sock.send(conn.outbox)
            conn.outbox = conn.outbox[sent:]
            if conn.stream is not None:
                self._touch(conn)  # a streamed answer has its deadline per step
        if not conn.outbox and conn.stream is None:
            self._linger(conn)

    def _linger(self, conn: _Connection) -> None:
        """The answer is out: half-close, then read and drop what the client still
        sends (a body nobody asked for, or one refused as too large) until it closes
        or the deadline passes. Closing over unread bytes sends a reset, which may
        destroy the answer before the client reads it."""
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.lingering = True
        self._touch(conn)
        self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _refill(self, conn: _Connection) -> bool:
        """Pull the next parts of a streamed body, as chunks; the last chunk once it ends.
        A stream that fails is cut off (no last chunk: the client sees it incomplete)
        and False returned."""
        stream = conn.stream
        assert stream is not None
        parts: list[bytes] = []
        size = 0
        try:
            while size < _STREAM_BUFFER:
                part = next(stream, None)
                if part is None:
                    parts.append(b"0\r\n\r\n")
                    conn.stream = None
                    break
                if part:
                    parts.append(b"%x\r\n%s\r\n" % (len(part), part))
                    size += len(part)
        except Exception:
            log.exception("streaming an answer failed; cut it off")
            self._drop(conn.sock)
            return False
        conn.outbox = b"".join(parts)
        return True

    def _answer(self, conn: _Connection) -> None:
        """Once the request (head, and body when read) is in, the answer goes out."""
        end, gap = conn.inbox.find(b"\r\n\r\n"), 4
        if end < 0:
            end, gap = conn.inbox.find(b"\n\n"), 2
        if end < 0:
            if len(conn.inbox) <= _MAX_HEAD_BYTES:
                return
            answer = text_answer(431, "request head over 8 KiB")
            method = "GET"
        else:
            request = _parse(conn.inbox[:end])
            if request is None:
                answer, method = text_answer(400, "malformed request line"), "GET"
            else:
                method, path, query, headers = request
                length = self._body_length(headers)
                if isinstance(length, tuple):
                    answer = length
                else:
                    start = end + gap
                    if len(conn.inbox) - start < length:
                        return  # more of the body to come
                    answer = self._call(Request(method, path, query, headers,
                                                conn.inbox[start:start + length]))
        self._start_answer(conn, answer, head_only=method == "HEAD")

    def _body_length(self, headers: Mapping[str, str]) -> int | Answer:
        """How many body bytes to wait for, or the refusal."""
        if not self._max_body:
            return 0
        if "transfer-encoding" in headers:
            return text_answer(411, "send the body with a Content-Length (not chunked)")
        given = headers.get("content-length", "0")
        if not given.isdigit():
            return text_answer(400, f"Content-Length {given[:20]!r} is not a number")
        if int(given) > self._max_body:
            return text_answer(413, f"request body of {given} bytes is over this port's limit "
                                    f"of {self._max_body} bytes")
        return int(given)

    def _call(self, request: Request) -> Answer:
        try:
            return self._route(request)
        except Exception:  # a failing route must not end the server
            log.exception("serving %s failed", request.path)
            return text_answer(500, "internal error; see the service log")

    def _start_answer(self, conn: _Connection, answer: Answer, head_only: bool) -> None:
        code, headers, body = answer
        if isinstance(body, bytes):
            conn.outbox = _head(code, headers, f"Content-Length: {len(body)}") + (
                b"" if head_only else body)
        else:
            conn.outbox = _head(code, headers, "Transfer-Encoding: chunked")
            if head_only:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            else:
                conn.stream = body
        conn.answered = True
        self._touch(conn)  # computing the answer may have taken a while
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _drop(self, sock: socket.socket) -> None:
        conn = self._open.pop(sock, None)
        if conn is not None and conn.stream is not None:
            close = getattr(conn.stream, "close", None)
            conn.stream = None
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
