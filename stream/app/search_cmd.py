"""The ``search`` command: one query, or a batch of them from a JSONL file, filtered.

One query: ``embedstream search "q" [--filter EXPR]... [-k N] [--mode M] [--json]``.

A hit is a document with its best chunk; ``--mode dense|sparse|hybrid`` ranks the
documents by their best chunk, by their sparse vector, or by both fused (default:
hybrid where the collection holds sparse vectors, else dense; see
:mod:`embedstream.stream.retrieval`).

A batch: ``embedstream search --queries FILE.jsonl --json [-k N] [--filter EXPR]...``;
each line ``{"id": ..., "text": "...", "filter": ...}`` (``filter`` optional: an
object or a list of expressions, see :mod:`embedstream.stream.filters`; the
``--filter`` expressions apply to every query as well). Out: one line per query, in
input order, ``{"id": ..., "hits": [{"doc_id", "chunk_index", "score", "text"}]}``.
The model is loaded once and the queries embedded 64 at a time.

The whole file is read and checked before the model loads: a line that is not a
JSON object with an ``id`` and a string ``text``, or whose filter cannot be used,
stops the command (exit 2) naming the file and line, having written nothing.

When a running consumer holds the Qdrant Edge collection (its lock), the command
asks that consumer (:mod:`embedstream.stream.app.query_client`) and loads no model;
otherwise it opens the store itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from embedstream.stream.app.query_client import live_service, search_live
from embedstream.stream.app.query_jobs import QueryJob, hit_json, job_of, search_jobs
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.errors import QueryError, SinkError
from embedstream.stream.filters import FieldType, Filter, parse_filter

__all__ = ["run_search"]


def run_search(settings: Settings, out: TextIO, *, query: str | None,
               queries: Path | None, filters: Sequence[str], k: int,
               as_json: bool, mode: str | None = None) -> int:
    """Run the command; :class:`QueryError` (exit 2) for a request it cannot run."""
    if (query is None) == (queries is None):
        raise QueryError("search: give a query or --queries FILE.jsonl (not both)")
    if queries is not None and not as_json:
        raise QueryError("search --queries writes JSON lines: add --json")
    fields = settings.source.filter_fields
    common = parse_filter(filters, fields)  # before the model loads: fail fast
    jobs = (_read_queries(queries, common, fields) if queries is not None
            else [QueryJob(None, str(query), common)])
    live = live_service(settings)
    if live is None:
        try:
            pipeline = build_pipeline(settings)
        except SinkError:
            live = live_service(settings)  # a consumer took the store while the model loaded
            if live is None:
                raise
    if live is not None:
        _write(out, search_live(live, jobs, filters, k, batch=queries is not None, mode=mode),
               batch=queries is not None, as_json=as_json)
        return 0
    try:
        answers = ((job, [hit_json(hit) for hit in hits])
                   for job, hits in search_jobs(pipeline.embedder, pipeline.sink, jobs, k, mode,
                                                pipeline.sparse, settings.retrieval))
        _write(out, answers, batch=queries is not None, as_json=as_json)
    finally:
        pipeline.close()
    return 0


def _write(out: TextIO, answers: Iterator[tuple[QueryJob, list[dict[str, Any]]]], *,
           batch: bool, as_json: bool) -> None:
    for job, hits in answers:
        if batch:
            out.write(json.dumps({"id": job.id, "hits": hits}) + "\n")
            continue
        for hit in hits:
            if as_json:
                out.write(json.dumps(hit) + "\n")
            else:
                text = " ".join(str(hit.get("text") or "").split())
                out.write(f"{hit['score']:.3f}  {hit.get('doc_id')}  {text[:160]}\n")


def _read_queries(path: Path, common: Filter,
                  fields: Mapping[str, FieldType]) -> list[QueryJob]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise QueryError(f"search --queries {str(path)!r}: cannot be read: {error}") from None
    jobs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except ValueError as error:
            raise QueryError(f"{where}: not JSON ({error})") from None
        try:
            jobs.append(job_of(item, common, fields))
        except QueryError as error:
            raise QueryError(f"{where}{' ' if str(error).startswith('(') else ': '}{error}"
                             ) from None
    return jobs
