"""The ``search`` command: one query, or a batch of them from a JSONL file, filtered.

One query: ``embedstream search "q" [--filter EXPR]... [-k N] [--json]``.

A batch: ``embedstream search --queries FILE.jsonl --json [-k N] [--filter EXPR]...``;
each line ``{"id": ..., "text": "...", "filter": ...}`` (``filter`` optional: an
object or a list of expressions, see :mod:`embedstream.stream.filters`; the
``--filter`` expressions apply to every query as well). Out: one line per query, in
input order, ``{"id": ..., "hits": [{"doc_id", "chunk_index", "score", "text"}]}``.
The model is loaded once and the queries embedded ``_EMBED_BATCH`` at a time.

The whole file is read and checked before the model loads: a line that is not a
JSON object with an ``id`` and a string ``text``, or whose filter cannot be used,
stops the command (exit 2) naming the file and line, having written nothing. A
batch is then all or nothing: no half-written output to reconcile.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from embedstream.stream.app.service import Pipeline, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.errors import QueryError
from embedstream.stream.filters import FieldType, Filter, parse_filter, parse_filter_json
from embedstream.stream.store import Hit

__all__ = ["run_search"]

_EMBED_BATCH = 64  # queries embedded at once: one forward pass, bounded memory


@dataclass(frozen=True, slots=True)
class _Query:
    id: Any
    text: str
    filter: Filter


def run_search(settings: Settings, out: TextIO, *, query: str | None,
               queries: Path | None, filters: Sequence[str], k: int,
               as_json: bool) -> int:
    """Run the command; :class:`QueryError` (exit 2) for a request it cannot run."""
    if (query is None) == (queries is None):
        raise QueryError("search: give a query or --queries FILE.jsonl (not both)")
    if queries is not None and not as_json:
        raise QueryError("search --queries writes JSON lines: add --json")
    fields = settings.source.filter_fields
    common = parse_filter(filters, fields)  # before the model loads: fail fast
    jobs = (_read_queries(queries, common, fields) if queries is not None
            else [_Query(None, str(query), common)])
    pipeline = build_pipeline(settings)
    try:
        if queries is not None:
            for job, hits in _answers(pipeline, jobs, k):
                out.write(json.dumps({"id": job.id, "hits": [_hit(h) for h in hits]}) + "\n")
            return 0
        [(_, hits)] = _answers(pipeline, jobs, k)
    finally:
        pipeline.close()
    for hit in hits:
        if as_json:
            out.write(json.dumps(_hit(hit)) + "\n")
        else:
            text = " ".join(str(hit.payload.get("text", "")).split())
            out.write(f"{hit.score:.3f}  {hit.payload.get('doc_id')}  {text[:160]}\n")
    return 0


def _hit(hit: Hit) -> dict[str, Any]:
    payload = hit.payload
    return {"doc_id": payload.get("doc_id"), "chunk_index": payload.get("chunk_index"),
            "score": hit.score, "text": payload.get("text")}


def _answers(pipeline: Pipeline, jobs: list[_Query], k: int
             ) -> Iterator[tuple[_Query, list[Hit]]]:
    for start in range(0, len(jobs), _EMBED_BATCH):
        batch = jobs[start:start + _EMBED_BATCH]
        vectors = pipeline.embedder.embed([job.text for job in batch])
        for job, vector in zip(batch, vectors, strict=True):
            yield job, pipeline.sink.search(vector.tolist(), limit=k, filter=job.filter or None)


def _read_queries(path: Path, common: Filter,
                  fields: Mapping[str, FieldType]) -> list[_Query]:
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
        if not isinstance(item, dict) or "id" not in item or not isinstance(
                item.get("text"), str):
            raise QueryError(f'{where}: expected {{"id": ..., "text": "...", "filter"?: ...}}')
        own = Filter()
        if item.get("filter") is not None:
            try:
                own = parse_filter_json(item["filter"], fields)
            except QueryError as error:
                raise QueryError(f"{where} (id {item['id']!r}): {error}") from None
        jobs.append(_Query(item["id"], item["text"], Filter(common.must + own.must,
                                                             common.must_not + own.must_not)))
    return jobs
