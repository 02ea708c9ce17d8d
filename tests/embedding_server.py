"""A real OpenAI-compatible embeddings server for tests and benchmarks.

``POST /v1/embeddings`` (``{"model", "input", "dimensions"?, "encoding_format"?}``)
answers like the OpenAI API, from a local sentence-transformers model. On
demand it misbehaves the way providers do:

* ``fail_next(status, count, retry_after)``: the next ``count`` requests get
  ``status`` (e.g. 429 with ``Retry-After``, or 500);
* ``rate_limit(per_second)``: a server-side limit (a token bucket of one
  request); a request over it gets 429 with ``Retry-After`` set to when the
  next one would be admitted (a "429 storm" for a client sending faster);
* ``reject_marker``: a request with an input containing it gets 400 (like an
  input over the model's context length); ``fail_marker``: 500 every time;
* ``api_key``: requests without ``Authorization: Bearer <key>`` get 401;
* ``delay_s``: every answer comes that much later (a slow provider).

It is a plain ``http.server.ThreadingHTTPServer`` on a loopback port, serving
from a thread of the test process; every answered request is recorded in
``log`` (time, status, inputs) for assertions.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up on its request (cancelled, timed out) is no server error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass(frozen=True, slots=True)
class Answered:
    at: float  # time.monotonic()
    status: int
    inputs: int


class EmbeddingServer:
    """See the module docstring. ``encode(texts) -> (vectors, tokens)``."""

    def __init__(self, encode: Callable[[list[str]], tuple[np.ndarray, int]],
                 model: str = "sentence-transformers/all-MiniLM-L6-v2") -> None:
        self.model = model
        self._encode = encode
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()  # one forward at a time, like one GPU
        self._scripted: list[tuple[int, float | None]] = []
        self._per_second: float | None = None
        self._next_slot = 0.0
        self.reject_marker: str | None = None
        self.fail_marker: str | None = None
        self.api_key: str | None = None
        self.delay_s = 0.0  # added to every answer: a slow provider
        self.log: list[Answered] = []
        self._httpd = _QuietServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="embedding-server", daemon=True)

    @classmethod
    def with_model(cls, model_path: str) -> EmbeddingServer:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(model_path, device="cpu")

        def encode(texts: list[str]) -> tuple[np.ndarray, int]:
            vectors = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
            tokens = sum(len(ids) for ids in st.tokenizer(texts)["input_ids"])
            return np.asarray(vectors, np.float32), tokens

        return cls(encode)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> EmbeddingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- misbehaviour on demand ----------------------------------------------------

    def fail_next(self, status: int, count: int = 1, retry_after: float | None = None) -> None:
        with self._lock:
            self._scripted += [(status, retry_after)] * count

    def rate_limit(self, per_second: float | None) -> None:
        with self._lock:
            self._per_second = per_second
            self._next_slot = 0.0

    def reset(self) -> None:
        with self._lock:
            self._scripted.clear()
            self._per_second = None
            self.reject_marker = self.fail_marker = self.api_key = None
            self.delay_s = 0.0
            self.log = []

    def count(self, status: int) -> int:
        with self._lock:
            return sum(1 for entry in self.log if entry.status == status)

    # -- serving -------------------------------------------------------------------

    def _admit(self, headers: Any, texts: list[str]) -> tuple[int, float | None, str]:
        """(status, retry_after, message) for a request; 200 when it is to be served."""
        with self._lock:
            if self.api_key is not None and \
                    headers.get("Authorization") != f"Bearer {self.api_key}":
                return 401, None, "Incorrect API key provided"
            if self._scripted:
                status, retry_after = self._scripted.pop(0)
                return status, retry_after, f"scripted {status}"
            if self._per_second is not None:
                now = time.monotonic()
                if now < self._next_slot:
                    return 429, self._next_slot - now, "Rate limit reached for requests"
                self._next_slot = max(now, self._next_slot) + 1.0 / self._per_second
        if self.reject_marker and any(self.reject_marker in t for t in texts):
            return 400, None, "This model's maximum context length is exceeded"
        if self.fail_marker and any(self.fail_marker in t for t in texts):
            return 500, None, "The server had an error while processing your request"
        return 200, None, ""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any],
                       retry_after: float | None = None) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                if retry_after is not None:
                    self.send_header("Retry-After", f"{retry_after:.3f}")
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length) or b"{}")
                if self.path.split("?")[0] != "/v1/embeddings":
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})
                    return
                texts = request.get("input")
                if isinstance(texts, str):
                    texts = [texts]
                if not isinstance(texts, list) or not texts:
                    self._reply(400, {"error": {"message": "input must be a non-empty list"}})
                    return
                status, retry_after, message = server._admit(self.headers, texts)
                time.sleep(server.delay_s)
                if status == 200:
                    with server._encode_lock:
                        vectors, tokens = server._encode(texts)
                    dimensions = request.get("dimensions")
                    if dimensions:  # Matryoshka-style: cut, then normalise again
                        vectors = vectors[:, :dimensions]
                        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                    base64_out = request.get("encoding_format") == "base64"
                    data = [{"object": "embedding", "index": i,
                             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                             if base64_out else v.tolist()} for i, v in enumerate(vectors)]
                    body = {"object": "list", "data": data, "model": request.get("model"),
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
                else:
                    body = {"error": {"message": message, "type": "test", "code": None}}
                with server._lock:
                    server.log.append(Answered(time.monotonic(), status, len(texts)))
                self._reply(status, body, retry_after)

        return Handler
