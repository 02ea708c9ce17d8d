"""An OpenAI-compatible ``/v1/embeddings`` server over a local sentence-transformers model,
with scriptable failures and rate limits: for trying a deployment's remote-provider
settings (``embed.provider: openai``) without a provider, and for the tests and benchmarks.

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

It is a plain ``http.server.ThreadingHTTPServer`` (loopback, a free port unless
told otherwise), serving from a thread of the calling process; every answered
request is recorded in ``log`` (time, status, inputs) for assertions. Not for
production. From a shell::

    python -m embedstream.stream.app.embedding_server --port 8080 [--requests-per-second 2]

then ``embed.provider: openai`` with ``embed.api_base: http://127.0.0.1:8080/v1``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.stream.app._threaded_server import ThreadedServer
from embedstream.stream.embedding import resolve_model_path

__all__ = ["Answered", "EmbeddingServer", "main"]

#: ``encode(texts) -> (normalised float32 vectors, prompt tokens)``.
Encode = Callable[[list[str]], tuple[npt.NDArray[np.float32], int]]



@dataclass(frozen=True, slots=True)
class Answered:
    at: float  # time.monotonic()
    status: int
    inputs: int


class EmbeddingServer(ThreadedServer):
    """See the module docstring. ``encode(texts) -> (vectors, tokens)``."""

    def __init__(self, encode: Encode, model: str = "sentence-transformers/all-MiniLM-L6-v2",
                 host: str = "127.0.0.1", port: int = 0) -> None:
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
        super().__init__(self._handler(), host, port, "embedding-server")

    @classmethod
    def with_model(cls, model: str, host: str = "127.0.0.1", port: int = 0) -> EmbeddingServer:
        """Serving ``model`` (a local directory, or a name as ``embed.model`` takes it)
        on the CPU."""
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(resolve_model_path(model), device="cpu")

        def encode(texts: list[str]) -> tuple[npt.NDArray[np.float32], int]:
            vectors = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
            tokens = sum(len(ids) for ids in st.tokenizer(texts)["input_ids"])
            return np.asarray(vectors, np.float32), tokens

        return cls(encode, model=model, host=host, port=port)

    @property
    def url(self) -> str:
        return f"{self.address}/v1"

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


def main(argv: list[str] | None = None) -> int:
    """Serve until interrupted (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m embedstream.stream.app.embedding_server",
        description="An OpenAI-compatible /v1/embeddings server over a local "
                    "sentence-transformers model (not for production).")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="a local model directory or a name (default: the bundled model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--requests-per-second", type=float, default=None,
                        help="answer 429 with Retry-After above this rate")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to each answer")
    args = parser.parse_args(argv)
    server = EmbeddingServer.with_model(args.model, host=args.host, port=args.port)
    server.api_key, server.delay_s = args.api_key, args.delay
    server.rate_limit(args.requests_per_second)
    with server:
        print(f"serving {args.model} at {server.url}/embeddings (Ctrl-C stops it)",
              file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
