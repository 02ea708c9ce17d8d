"""The shared frame of the small HTTP servers embedstream ships for tests, the
demo and trying settings out (an embedding API, a Schema Registry): a
``ThreadingHTTPServer`` on loopback (a free port unless told otherwise), served
from one daemon thread of the calling process, started and stopped as a context.
Not for production."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

__all__ = ["ThreadedServer"]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on its request (cancelled, timed out) is no server error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class ThreadedServer:
    """Serves ``handler`` on ``host:port`` from a thread named ``name`` while entered
    (the servers subclass it, building their handler before calling ``__init__``)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str, port: int,
                 name: str) -> None:
        self._httpd = _QuietServer((host, port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=name,
                                        daemon=True)

    @property
    def address(self) -> str:
        """``http://host:port`` it listens on."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
