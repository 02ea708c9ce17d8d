"""``search`` and ``export`` through the running consumer that holds the store.

A Qdrant Edge collection opens in one process at a time. When another process holds
the collection a command needs, :func:`live_service` finds where that process said it
answers queries (:mod:`embedstream.sinks.edge_holder`), and :func:`search_live` and
:func:`export_live` ask it (:mod:`embedstream.stream.app.query_server`) instead: no
model loads here, and the answer is what the consumer has applied so far. A Qdrant
server sink is never held: there the commands read the store themselves.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

from embedstream.sinks.edge_holder import holder, served_at
from embedstream.stream.app.query_jobs import EMBED_BATCH, QueryJob
from embedstream.stream.config import Settings
from embedstream.stream.errors import QueryError, SinkError

__all__ = ["LiveService", "export_live", "live_service", "search_live"]

log = logging.getLogger("embedstream")

_TIMEOUT_S = 300.0  # a batch waits behind others' on the consumer's one query thread


@dataclass(frozen=True, slots=True)
class LiveService:
    """The process holding a route's collection, where it answers, and the
    collection (the alias) to name in requests."""

    pid: str
    url: str
    collection: str

    def where(self) -> str:
        return f"the running consumer (pid {self.pid}) at {self.url}"


def live_service(settings: Settings) -> LiveService | None:
    """The process to ask for the route of ``settings`` (narrowed to one route), or
    ``None`` when the command opens the store itself (nobody holds it, or it is not
    a Qdrant Edge store). :class:`SinkError` when the holder answers no queries."""
    sink = settings.sink
    if sink.kind != "qdrant-edge":
        return None
    pid = holder(sink.path, sink.collection)
    if pid is None:
        return None
    url = served_at(sink.path, pid)
    if url is None:
        raise SinkError(
            f"collection {sink.collection!r} at {sink.path} is in use by another process "
            f"(pid {pid}), which answers no queries: a rebuild, another command, or a "
            "consumer with query.enabled false. Wait for it, or stop it and try again.")
    service = LiveService(pid, url, sink.collection)
    log.info("asking %s: it holds collection %r", service.where(), sink.collection)
    return service


def search_live(service: LiveService, jobs: Sequence[QueryJob], common: Sequence[str],
                k: int, batch: bool, mode: str | None = None
                ) -> Iterator[tuple[QueryJob, list[dict[str, Any]]]]:
    """Each job with its hits (``{"doc_id", "chunk_index", "score", "text"}``), in
    order: one request for a single query, else :data:`EMBED_BATCH` jobs a request.
    ``common``: the ``--filter`` expressions, applied to every job by the service."""
    if not batch:
        [job] = jobs
        answer = _post(service, {"query": job.text, "k": k, "filter": list(common),
                                 "route": service.collection, **_mode(mode)})
        yield job, answer["hits"]
        return
    for start in range(0, len(jobs), EMBED_BATCH):
        part = jobs[start:start + EMBED_BATCH]
        items = [{"id": job.id, "text": job.text,
                  **({"filter": job.spec} if job.spec is not None else {})} for job in part]
        answer = _post(service, {"queries": items, "k": k, "filter": list(common),
                                 "route": service.collection, **_mode(mode)})
        for job, result in zip(part, answer["results"], strict=True):
            yield job, result["hits"]


def _mode(mode: str | None) -> dict[str, str]:
    return {} if mode is None else {"mode": mode}


def export_live(service: LiveService, out: TextIO) -> int:
    """Every point of the collection, as the service streams it, one JSON line each
    to ``out``; how many. :class:`SinkError` when the stream is cut off (the lines
    written so far are then all there is)."""
    connection = _connect(service)
    count = 0
    try:
        connection.request("GET", f"/export?route={quote(service.collection)}")
        response = connection.getresponse()
        _check(service, response)
        for line in response:
            out.write(line.decode())
            count += 1
    except http.client.IncompleteRead:
        raise SinkError(f"the export from {service.where()} was cut off after {count} "
                        "points (it stopped, or moved to a rebuilt collection); run it "
                        "again") from None
    except (OSError, http.client.HTTPException) as error:
        raise _unreachable(service, error) from None
    finally:
        connection.close()
    return count


def _connect(service: LiveService) -> http.client.HTTPConnection:
    # http.client, not urllib: no proxy from the environment between us and loopback.
    address = urlsplit(service.url)
    return http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port,
                                      timeout=_TIMEOUT_S)


def _post(service: LiveService, body: dict[str, Any]) -> dict[str, Any]:
    connection = _connect(service)
    try:
        connection.request("POST", "/search", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        _check(service, response)
        answer: dict[str, Any] = json.loads(response.read())
        return answer
    except (OSError, http.client.HTTPException) as error:
        raise _unreachable(service, error) from None
    finally:
        connection.close()


def _check(service: LiveService, response: http.client.HTTPResponse) -> None:
    if response.status == 200:
        return
    reason = response.read().decode(errors="replace").strip()
    if 400 <= response.status < 500:
        raise QueryError(f"{service.where()} refused the query ({response.status}): {reason}")
    raise SinkError(f"{service.where()} failed ({response.status}): {reason}")


def _unreachable(service: LiveService, error: Exception) -> SinkError:
    return SinkError(f"collection {service.collection!r} is held by {service.where()}, "
                     f"which does not answer: {error}. If that process is gone or hung, "
                     "stop it and run the command again.")
