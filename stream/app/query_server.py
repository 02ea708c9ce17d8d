"""The running consumer's query endpoint: search and export what it is writing, live.

``consume`` answers on ``query.host:query.port`` (loopback and a free port by
default; a port of its own, never the metrics port, which containers open to the pod
network):

* ``POST /search`` with a JSON body: ``{"query": "text", "k": 5, "filter": ..., "route":
  "name", "mode": "hybrid"}``, or a batch, ``{"queries": [{"id": ..., "text": "...",
  "filter"?: ...}, ...], ...}`` (at most :data:`MAX_QUERIES`). ``filter`` is an object
  or a list of ``--filter`` expressions (:mod:`embedstream.stream.filters`); a batch's
  top-level ``filter`` applies to every query. ``k`` is 1 to :data:`MAX_K` (default 5).
  ``route`` names a route or its collection; without it, the only route. ``mode``:
  ``dense``, ``sparse`` or ``hybrid`` (default: hybrid where the collection holds sparse
  vectors, see :mod:`embedstream.stream.retrieval`). The answer (a hit: a document, with
  its best chunk): ``{"route", "collection", "hits": [{"doc_id", "chunk_index", "score",
  "text"}]}``, or for a batch ``"results": [{"id", "hits"}, ...]`` in request order;
  ``collection`` is the physical collection searched.
* ``GET /export?route=name``: every point of the route's collection as JSON lines
  ``{"id", "vector", "payload"}``, then (a collection with sparse vectors) every
  document's ``{"doc_id", "sparse": {"indices", "values"}, "fields"}``, streamed
  (chunked; a stream cut off, e.g. by the consumer stopping or following a rebuild to
  a new collection, ends without the last chunk, which HTTP clients report as
  incomplete).

Refusals are 4xx with a plain-text reason: 400 (not JSON, unknown fields, a bad ``k``
or filter), 404 (unknown path or route), 405, 411, 413 (a body over
``query.max_body_bytes``, refused before it is read). 503: the store failed.

Guaranteed: a search reads the collection the stream writes now (after a rebuild's
alias move, the new one: a search caught by the move is retried there); one request is
computed at a time, on the server's one thread (connections as in
:class:`~embedstream.stream.http_server.HttpServer`), so queries add at most one
thread's work beside the consumer loop. The queries' embedder is the loop's model with
a tokenizer of its own (a remote provider: a client of its own). Not guaranteed: a
consistent snapshot across an export's pages (writes made meanwhile may or may not be
in it), or an answer to a connection kept waiting past the deadline by a long batch.
For ``search`` and ``export`` to find it, the consumer records its address in each
Qdrant Edge store it holds (:mod:`embedstream.sinks.edge_holder`).
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from embedstream.sinks.edge_holder import announce, withdraw
from embedstream.stream.app.query_jobs import (
    QueryJob,
    embed_jobs,
    export_lines,
    hit_json,
    job_of,
    search_job,
)
from embedstream.stream.config import RouteSettings, Settings
from embedstream.stream.consumer import StreamConsumer
from embedstream.stream.embedding import Embedder
from embedstream.stream.errors import (
    ConfigError,
    EmbedderError,
    EmbedFailures,
    QueryError,
    SinkError,
)
from embedstream.stream.filters import Filter, parse_filter_json
from embedstream.stream.http_server import (
    HTTP_MAX_CONNECTIONS,
    HTTP_TIMEOUT_S,
    Answer,
    HttpServer,
    Request,
    listen,
    text_answer,
)
from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.retrieval import MODES, resolve_mode
from embedstream.stream.sparse import SparseEncoder
from embedstream.stream.store import Hit, Sink

if TYPE_CHECKING:
    from embedstream.stream.app.service import Pipeline

__all__ = ["MAX_K", "MAX_QUERIES", "QueryServer", "start_query_server"]

log = logging.getLogger("embedstream")

MAX_K = 1000
MAX_QUERIES = 256  # per request: `search --queries` sends larger batches in parts
_FIELDS = frozenset({"query", "queries", "k", "filter", "route", "mode"})
_MOVE_WAIT_S = 2.0  # how long a search waits for the loop to finish following an alias


class _Refused(Exception):
    """A request refused: its status and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class QueryServer:
    """The query endpoint of a running consumer (see the module docstring); ``url`` is
    where it answers, ``None`` when ``query.enabled`` is false (then it serves nothing).
    ``close`` stops it and removes its address records: call it before the store closes."""

    def __init__(self, settings: Settings, embedder: Embedder,
                 sinks: Callable[[], Mapping[str, Sink]], *, own_embedder: bool = False,
                 listener: socket.socket | None = None,
                 sparse: SparseEncoder | None = None) -> None:
        self._routes = settings.all_routes()
        self._retrieval, self._sparse = settings.retrieval, sparse
        self._embedder, self._own_embedder = embedder, own_embedder
        self._sinks = sinks
        self._stores: list[Path] = []  # where the address records are
        self._server: HttpServer | None = None
        self.url: str | None = None
        query = settings.query
        if not query.enabled:
            return
        listener = listener or bind_query_port(settings)
        assert listener is not None
        self._server = HttpServer(listener, self._answer, HTTP_TIMEOUT_S, HTTP_MAX_CONNECTIONS,
                                  max_body_bytes=query.max_body_bytes, name="embedstream-query")
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(query.host, query.host)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self._server.port}"
        self._server.start()
        try:
            for route in self._routes:
                store = settings.for_route(route.name).sink
                if store.kind == "qdrant-edge" and store.path not in self._stores:
                    announce(store.path, self.url)
                    self._stores.append(store.path)
        except BaseException:
            self.close()
            raise
        log.info("answering queries at %s (POST /search, GET /export)", self.url)

    def close(self) -> None:
        """Stop answering (a request being computed finishes first), remove the
        address records. Safe to call twice."""
        for path in self._stores:
            withdraw(path)
        self._stores.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._own_embedder:
            self._own_embedder = False
            self._embedder.close()

    # -- the routes --------------------------------------------------------------

    def _answer(self, request: Request) -> Answer:
        try:
            if request.path == "/search":
                return self._search(request)
            if request.path == "/export":
                return self._export(request)
            raise _Refused(404, "not found; this port serves POST /search and GET /export")
        except _Refused as refused:
            code, headers, body = text_answer(refused.code, str(refused))
            if refused.code == 405:
                headers.append(("Allow", "POST" if request.path == "/search" else "GET"))
            return code, headers, body
        except EmbedFailures as refused:  # the provider refused the query text itself
            reasons = "; ".join(f"{reason}: {detail}"[:200]
                                for reason, detail in refused.failed.values())
            return text_answer(422, f"the embedding provider refused the query: {reasons}")
        except (SinkError, EmbedderError) as error:
            log.warning("query failed: %s", error)
            return text_answer(503, f"the store or the model failed: {error}")

    def _search(self, request: Request) -> Answer:
        if request.method != "POST":
            raise _Refused(405, f"{request.method} is not allowed; POST a JSON body")
        try:
            body = json.loads(request.body)
        except ValueError as error:
            raise _Refused(400, f"the body is not JSON: {error}") from None
        if not isinstance(body, dict):
            raise _Refused(400, 'expected a JSON object: {"query": "...", "k"?, "filter"?, '
                                '"route"?} or {"queries": [...], ...}')
        if unknown := sorted(set(body) - _FIELDS):
            raise _Refused(400, f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(sorted(_FIELDS))}")
        route = self._route(body.get("route"))
        k = body.get("k", 5)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise _Refused(400, f"k must be an integer from 1 to {MAX_K}")
        mode = body.get("mode")
        if mode is not None and mode not in MODES:
            raise _Refused(400, f"mode must be one of {', '.join(MODES)}")
        jobs = self._jobs(body, route)
        collection, answers = self._run(route.name, jobs, k, mode)
        out: dict[str, Any] = {"route": route.name, "collection": collection}
        if "queries" in body:
            out["results"] = [{"id": job.id, "hits": [hit_json(h) for h in hits]}
                              for job, hits in zip(jobs, answers, strict=True)]
        else:
            out["hits"] = [hit_json(h) for h in answers[0]]
        return 200, [("Content-Type", "application/json")], json.dumps(out).encode()

    def _jobs(self, body: dict[str, Any], route: RouteSettings) -> list[QueryJob]:
        fields = route.source.filter_fields
        try:
            common = (Filter() if body.get("filter") is None
                      else parse_filter_json(body["filter"], fields))
        except QueryError as error:
            raise _Refused(400, f"filter: {error}") from None
        if ("query" in body) == ("queries" in body):
            raise _Refused(400, 'give "query" (one text) or "queries" (a batch), not both')
        if "query" in body:
            if not isinstance(body["query"], str):
                raise _Refused(400, '"query" must be a string')
            return [QueryJob(None, body["query"], common)]
        items = body["queries"]
        if not isinstance(items, list) or len(items) > MAX_QUERIES:
            raise _Refused(400 if not isinstance(items, list) else 413,
                           f'"queries" must be a list of at most {MAX_QUERIES} queries')
        jobs = []
        for index, item in enumerate(items):
            try:
                jobs.append(job_of(item, common, fields))
            except QueryError as error:
                raise _Refused(400, f"queries[{index}]: {error}") from None
        return jobs

    def _route(self, name: Any) -> RouteSettings:
        if name is None:
            if len(self._routes) > 1:
                raise _Refused(400, "several routes are served: name one with \"route\" (one "
                                    f"of {', '.join(r.name for r in self._routes)})")
            return self._routes[0]
        found = [r for r in self._routes if isinstance(name, str) and name in (r.name,
                                                                                r.collection)]
        if not found:
            raise _Refused(404, f"no route or route collection is named {name!r} (routes: "
                                + ", ".join(f"{r.name} -> {r.collection}" for r in self._routes)
                                + ")")
        return found[0]

    def _run(self, route: str, jobs: list[QueryJob], k: int, mode: str | None
             ) -> tuple[str, list[list[Hit]]]:
        """Search the route's sink now; a search caught by the loop following an
        alias to a new collection (the old sink closed under it) is run again there."""
        try:
            resolve_mode(mode, self._sinks()[route])
        except QueryError as error:
            raise _Refused(400, str(error)) from None
        vectors = embed_jobs(self._embedder, jobs)
        while True:
            sink = self._sinks()[route]
            try:
                chosen = resolve_mode(mode, sink)
                return sink.collection, [
                    search_job(sink, job, vector, k, chosen, self._sparse, self._retrieval)
                    for job, vector in zip(jobs, vectors, strict=True)]
            except SinkError:
                if not self._wait_for_another(route, sink):
                    raise

    def _wait_for_another(self, route: str, sink: Sink) -> bool:
        deadline = time.monotonic() + _MOVE_WAIT_S
        while time.monotonic() < deadline:
            if self._sinks()[route] is not sink:
                return True
            time.sleep(0.02)
        return False

    def _export(self, request: Request) -> Answer:
        if request.method not in ("GET", "HEAD"):
            raise _Refused(405, f"{request.method} is not allowed; use GET")
        names = parse_qs(request.query).get("route", [])
        route = self._route(names[-1] if names else None)
        found = export_lines(self._sinks()[route.name])
        first = next(found, None)  # the store's errors before the answer starts: a 503
        lines = (json.dumps(line).encode() + b"\n"
                 for line in chain([] if first is None else [first], found))
        return 200, [("Content-Type", "application/x-ndjson")], lines


def bind_query_port(settings: Settings) -> socket.socket | None:
    """The query endpoint's listening socket (None with ``query.enabled`` false), bound
    early (before the model loads) so a taken ``query.port`` stops the start before
    anything is created: :class:`ConfigError` naming it."""
    query = settings.query
    if not query.enabled:
        return None
    try:
        return listen(query.host, query.port)
    except OSError as error:
        raise ConfigError(
            f"cannot serve queries on {query.host}:{query.port} (query.port, query.host): "
            f"{error.strerror or error}; free the port, set another (0: any free one) "
            "or set query.enabled: false") from None


def start_query_server(settings: Settings, pipeline: Pipeline, stream: StreamConsumer,
                       listener: socket.socket | None = None) -> QueryServer:
    """The query endpoint of ``consume`` over ``stream``'s stores (the ones it writes
    now), embedding with ``pipeline``'s model. Call it once the consumer is built and
    close it before the stream and the pipeline close. :class:`ConfigError` naming
    ``query.port`` when its address cannot be bound. With ``query.enabled`` false, a
    server that serves nothing (``url`` None)."""
    if not settings.query.enabled:
        return QueryServer(settings, pipeline.embedder, lambda: stream.sinks)
    embedder, own = _query_embedder(settings, pipeline.embedder)
    try:
        return QueryServer(settings, embedder, lambda: stream.sinks, own_embedder=own,
                           listener=listener, sparse=pipeline.sparse)
    except BaseException:
        if own:
            embedder.close()
        raise


def _query_embedder(settings: Settings, embedder: Embedder) -> tuple[Embedder, bool]:
    """An embedder the query thread may use while the loop uses ``embedder``, and
    whether it is a new one (to close): the local model's twin, or for a remote
    provider a client of its own (one probe request)."""
    if isinstance(embedder, LocalEncoder):
        return embedder.twin(), False
    if settings.embed.provider == "openai":
        from embedstream.stream.app.service import build_embedder

        return build_embedder(settings), True
    return embedder, False  # a stand-in (tests): used as it is
