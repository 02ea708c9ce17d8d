"""Reading a corpus from files for ``embedstream rebuild``.

:func:`read_rows` turns one path or glob of JSONL/NDJSON, TSV or Parquet files
(JSONL and TSV optionally ``.gz`` or ``.zst``) into one item per row, in file
order, files in sorted path order. Each row's ``(doc_id, text, metadata, title)``
comes from :func:`embedstream.stream.decode.decode_row`, so they follow exactly the
stream's rules (``source.id_fields``, ``text_fields`` or ``text_template``,
``metadata_fields``, ``filter_fields``, ``title_field``).

Guaranteed:

* Every row yields exactly one item, a :class:`SourceRow` or a :class:`RowFailure`,
  so a caller that counts items can resume with ``skip=count``, provided the
  files (the glob's matches and their bytes) have not changed in between.
  Rows are: the non-blank lines of a JSONL file; the non-blank lines of a TSV
  file after its header line (none when ``bulk.tsv_columns`` names the columns);
  the rows of a Parquet file. Lines holding only whitespace are not rows.
* A bad row (invalid UTF-8, invalid JSON, a JSON value that is not an object, a
  TSV row with the wrong number of columns, a line over ``source.max_message_bytes``,
  anything :func:`~embedstream.stream.decode.decode_row` refuses) never stops the read and is
  never dropped: it is a :class:`RowFailure`.
* Memory is bounded by ``source.max_message_bytes`` (one line) or one Parquet
  record batch, whatever the file size.
* A file that cannot be read on (truncated or corrupt ``.gz``/``.zst`` data, an
  unreadable Parquet file, an unusable TSV header, an I/O error) raises
  :class:`~embedstream.stream.errors.SourceError` naming the path; rows before the damage
  have already been yielded.

Not guaranteed: that corruption inside compressed data is noticed (zstd frames
carry a checksum only if their writer added one); that a TSV file really has
the header this configuration assumes (with ``bulk.tsv_columns`` set, a header
line is read as a row); limits on document length (``source.max_document_chars``
is for the caller, as in the stream).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from embedstream.bulk._formats import Compression, Kind, NotUtf8, detect, plain, read_lines
from embedstream.stream.config import Settings
from embedstream.stream.decode import decode_row
from embedstream.stream.errors import ConfigError, DecodeError, SourceError
from embedstream.stream.strict_json import loads
from embedstream.stream.templates import template_parts

__all__ = ["RowFailure", "SourceRow", "count_rows", "expand_files", "read_rows"]

_GLOB_CHARS = frozenset("*?[")
_PARQUET_BATCH_ROWS = 1024
_COUNT_CHUNK = 1 << 20
# csv's field size limit is process-wide and a C long (32 bits on Windows).
_CSV_FIELD_LIMIT_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One document read from a file."""

    doc_id: str
    text: str
    metadata: Mapping[str, Any]
    where: str  # "path:line" (1-based) for JSONL/TSV, "path#index" (0-based) for Parquet
    title: str | None = None  # source.title_field's value: embedded in front of each chunk


@dataclass(frozen=True, slots=True)
class RowFailure:
    """One row that gave no document, and why."""

    where: str
    # A DecodeError reason (embedstream.stream.decode.REASONS), "invalid_json", "not_utf8",
    # "bad_row" (not an object; wrong column count) or "message_too_large".
    reason: str
    detail: str


class _Skip:
    """Items still to skip; shared by the per-file readers of one read."""

    __slots__ = ("left",)

    def __init__(self, left: int) -> None:
        self.left = left

    def take(self) -> bool:
        """True (and one fewer left) if the next item is to be skipped."""
        if self.left:
            self.left -= 1
            return True
        return False


def expand_files(spec: str) -> list[Path]:
    """The files ``spec`` (a path, or a glob where ``**`` spans directories) names,
    sorted by path text; :class:`ConfigError` if none, or if it names a directory.
    Directories a glob matches are left out (``data/**`` matches them)."""
    pattern = os.path.expanduser(spec)
    # A file whose name holds glob characters ("part[1].jsonl") is that file.
    if os.path.isfile(pattern) or not _GLOB_CHARS & set(pattern):
        path = Path(pattern)
        if path.is_dir():
            raise ConfigError(f"source {spec!r} is a directory; name its files, "
                              f"e.g. {str(path / '*.jsonl')!r}")
        if not path.is_file():
            raise ConfigError(f"source {spec!r}: no such file")
        return [path]
    # Sorted text, not file-system order: resuming counts rows across files.
    matches = sorted(glob.glob(pattern, recursive=True))
    files = [Path(match) for match in matches if not os.path.isdir(match)]
    if not files:
        raise ConfigError(f"source {spec!r} matches no file")
    return files


def read_rows(spec: str, settings: Settings, skip: int = 0) -> Iterator[SourceRow | RowFailure]:
    """One item per row of the files ``spec`` names, skipping the first ``skip``.

    Raises :class:`ConfigError` at once (before reading) for no match or an
    unsupported file name; :class:`SourceError` while reading (see module doc)."""
    if skip < 0:
        raise ValueError(f"skip must be >= 0, not {skip}")
    files = [(path, *detect(path)) for path in expand_files(spec)]
    return _read(files, settings, _Skip(skip))


def _read(files: list[tuple[Path, Kind, Compression]], settings: Settings,
          skip: _Skip) -> Iterator[SourceRow | RowFailure]:
    for path, kind, compression in files:
        if kind == "parquet":
            yield from _parquet_items(path, settings, skip)
        elif kind == "jsonl":
            yield from _jsonl_items(path, compression, settings, skip)
        else:
            yield from _tsv_items(path, compression, settings, skip)


def _decoded(row: dict[str, Any], where: str, settings: Settings) -> SourceRow | RowFailure:
    try:
        doc_id, text, metadata, title = decode_row(row, settings.source)
    except DecodeError as error:
        return RowFailure(where, error.reason, error.detail)
    return SourceRow(doc_id, text, metadata, where, title)


def _text_line(raw: bytes | None, where: str,
               settings: Settings) -> str | RowFailure:
    if raw is None:
        return RowFailure(where, "message_too_large",
                          f"line is over source.max_message_bytes "
                          f"({settings.source.max_message_bytes})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return RowFailure(where, "not_utf8", str(error))


def _jsonl_items(path: Path, compression: Compression, settings: Settings,
                 skip: _Skip) -> Iterator[SourceRow | RowFailure]:
    for lineno, raw in read_lines(path, compression, settings.source.max_message_bytes):
        # Blank lines are not rows: decided on the bytes, so skipping counts alike.
        if raw is not None and not raw.strip():
            continue
        if skip.take():
            continue
        where = f"{path}:{lineno}"
        line = _text_line(raw, where, settings)
        if isinstance(line, RowFailure):
            yield line
            continue
        try:
            # The stream's strict JSON: no NaN, no 1e400.
            obj = loads(line)
        except DecodeError as error:
            yield RowFailure(where, error.reason, error.detail)
            continue
        except RecursionError:
            yield RowFailure(where, "invalid_json", "nested too deeply")
            continue
        if not isinstance(obj, dict):
            yield RowFailure(where, "bad_row", f"a JSON {type(obj).__name__}, not an object")
            continue
        yield _decoded(obj, where, settings)


def _tsv_fields(line: str) -> list[str]:
    try:
        return next(csv.reader((line,), delimiter="\t", quoting=csv.QUOTE_NONE), [])
    except csv.Error:
        # The reader refuses a bare carriage return inside a field; unquoted,
        # without an escape character, a row is exactly its text split at tabs.
        return line.split("\t")


def _tsv_items(path: Path, compression: Compression, settings: Settings,
               skip: _Skip) -> Iterator[SourceRow | RowFailure]:
    limit = settings.source.max_message_bytes
    # Passages hold quotes (hence QUOTE_NONE) and can be long: no field may be
    # refused for size that the line cap lets through. The limit is process-wide
    # and only ever raised here.
    wanted = min(limit, _CSV_FIELD_LIMIT_MAX)
    if csv.field_size_limit() < wanted:
        csv.field_size_limit(wanted)
    columns: tuple[str, ...] | None = settings.bulk.tsv_columns or None
    for lineno, raw in read_lines(path, compression, limit):
        if raw is not None and not raw.strip():
            continue
        if columns is None:  # the first non-blank line names the columns
            columns = _tsv_header(raw, f"{path}:{lineno}")
            continue
        if skip.take():
            continue
        where = f"{path}:{lineno}"
        line = _text_line(raw, where, settings)
        if isinstance(line, RowFailure):
            yield line
            continue
        fields = _tsv_fields(line)
        if len(fields) != len(columns):
            yield RowFailure(where, "bad_row",
                             f"{len(fields)} columns, expected {len(columns)}")
            continue
        yield _decoded(dict(zip(columns, fields, strict=True)), where, settings)


def _tsv_header(raw: bytes | None, where: str) -> tuple[str, ...]:
    try:
        if raw is None:
            raise ValueError("line is over source.max_message_bytes")
        columns = tuple(_tsv_fields(raw.decode("utf-8")))
    except ValueError as error:  # UnicodeDecodeError is one
        raise SourceError(f"{where}: unusable TSV header: {error}") from None
    twice = sorted({name for name in columns if columns.count(name) > 1})
    if twice:
        raise SourceError(f"{where}: TSV header names {twice} more than once")
    return columns


def _parquet_columns(schema: pa.Schema, settings: Settings) -> list[str] | None:
    """The columns a row needs (others are never read), or None for all."""
    source = settings.source
    wanted = {*source.id_fields, *source.metadata_fields, *source.filter_fields}
    if source.text_template is not None:
        wanted |= {name for _, name in template_parts(source.text_template) if name}
    else:
        wanted |= set(source.text_fields)
    if source.title_field is not None:
        wanted.add(source.title_field)
    if source.id_fields in (("id",), ("_id",)):
        wanted |= {"id", "_id"}  # with one id field, decode_row takes either
    picked = [name for name in schema.names if name in wanted]
    # No wanted column: read them all so the row count stays and each row fails alone.
    return picked or None


def _parquet_items(path: Path, settings: Settings,
                   skip: _Skip) -> Iterator[SourceRow | RowFailure]:
    try:
        with pq.ParquetFile(path) as parquet:
            metadata = parquet.metadata
            if skip.left >= metadata.num_rows:  # the footer says; no data read
                skip.left -= metadata.num_rows
                return
            groups, index = list(range(metadata.num_row_groups)), 0
            while groups and skip.left >= (size := metadata.row_group(groups[0]).num_rows):
                skip.left -= size
                index += size
                groups.pop(0)
            batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups,
                                           columns=_parquet_columns(parquet.schema_arrow,
                                                                    settings))
            for batch in batches:
                if skip.left:
                    dropped = min(skip.left, batch.num_rows)
                    skip.left -= dropped
                    index += dropped
                    batch = batch.slice(dropped)
                for row in batch.to_pylist():
                    yield _parquet_row(row, f"{path}#{index}", settings)
                    index += 1
    except (pa.ArrowException, OSError) as error:
        raise SourceError(f"{path}: cannot read Parquet data: {error}") from error


def _parquet_row(row: dict[str, Any], where: str, settings: Settings) -> SourceRow | RowFailure:
    try:
        values = {name: plain(value) for name, value in row.items()}
    except NotUtf8 as error:
        return RowFailure(where, "not_utf8", str(error))
    return _decoded(values, where, settings)


def count_rows(spec: str, settings: Settings) -> int | None:
    """A cheap total for progress: None if any file is compressed (unknown without
    reading it all). Exact for Parquet (from the footer). For JSONL and TSV, the
    number of lines (a last line without a newline counts), less one header line
    per TSV file without ``bulk.tsv_columns``: an upper bound of what
    :func:`read_rows` yields, exact when no line is blank."""
    files = [(path, *detect(path)) for path in expand_files(spec)]
    if any(compression is not None for _, _, compression in files):
        return None
    total = 0
    for path, kind, _ in files:
        try:
            if kind == "parquet":
                with pq.ParquetFile(path) as parquet:
                    total += parquet.metadata.num_rows
                continue
            lines = _count_lines(path)
        except (pa.ArrowException, OSError) as error:
            raise SourceError(f"{path}: cannot count rows: {error}") from error
        has_header = kind == "tsv" and not settings.bulk.tsv_columns and lines > 0
        total += lines - (1 if has_header else 0)
    return total


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with open(path, "rb") as file:
        while chunk := file.read(_COUNT_CHUNK):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")
