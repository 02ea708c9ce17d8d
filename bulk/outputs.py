"""Writing embedded chunks to files instead of a store (``embedstream rebuild --output``).

:class:`VectorFileWriter` takes rows and their float32 vectors in order and writes
them, by the suffix of ``path``, to

* ``.npy``: ``path`` is a plain NumPy float32 array of shape ``(n, dimension)``
  (``np.load(path, mmap_mode="r")`` works) and ``<stem>.ids.jsonl`` beside it holds
  one JSON object per row, same order: ``id, doc_id, chunk_index, start, end,
  content_hash`` (no text, to keep it small);
* ``.parquet``: one file with columns ``id, doc_id, chunk_index (int32), start,
  end (int64), content_hash, text, vector (fixed_size_list<float32>[dimension])``.

With document sparse vectors (``retrieval.sparse``), each document's vector is on its
first chunk's row (``chunk_index`` 0) and null on the others: Parquet columns
``sparse_indices (list<uint32>)`` and ``sparse_values (list<float32>)``, and in the
``.npy`` ids file ``"sparse": {"indices": [...], "values": [...]}`` on that row. The
IDF is not in them (the store applies it at search time: see
:mod:`embedstream.stream.sparse`).

Guaranteed:

* Nothing appears at ``path`` before :meth:`~VectorFileWriter.close`; then the
  finished file appears at once (``os.replace``); an older file there stays until
  then. For ``.npy`` the ids file is renamed first, so a new ``path`` implies a
  complete ids file (but replacing an older pair is atomic per file, not for both).
* Rows come out in the order they were added, each exactly once.
* :meth:`~VectorFileWriter.checkpoint` makes all rows added so far durable
  (``fsync`` of the data and the directory) and returns a JSON-serialisable token.
  A writer built with that token after a crash (SIGKILL, power loss) drops
  whatever was written after the checkpoint and goes on from there, so adding
  the same rows again, in the same order, gives exactly the output of an
  uninterrupted run.
* Memory is bounded by what one ``add`` passes in, plus about two Parquet row
  groups (32 MiB each) for Parquet; nothing grows with the row count.

Not guaranteed: that a token fits different input (the writer cannot tell
whether the rows added after a resume are the right ones); that a resume after
``close`` completed works (the partial files are gone, it raises
:class:`~embedstream.stream.errors.ConfigError`); durability of rows added after the last
checkpoint; a usable writer after ``add`` raised (abort, then resume).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from embedstream.stream.errors import ConfigError
from embedstream.stream.sparse import SparseVector

__all__ = ["SUFFIXES", "VectorFileWriter", "VectorRow"]

SUFFIXES = (".parquet", ".npy")
_TOKEN_VERSION = 1
# Fixed header size: the data starts at a known offset, so the header can be
# rewritten with the final shape in place. 128 bytes hold any two int64 dims and
# keep NumPy's 64-byte alignment.
_NPY_HEADER_BYTES = 128
# Parquet row groups are buffered to about this size: big enough for efficient
# reads, small enough to bound memory.
_ROW_GROUP_BYTES = 32 << 20


# VectorRow's fields in the order of the Parquet columns (point_id is written as "id").
_ROW_FIELDS = ("point_id", "doc_id", "chunk_index", "start", "end", "content_hash", "text")


@dataclass(frozen=True, slots=True)
class VectorRow:
    """One embedded chunk; its vector is passed alongside, as a matrix row."""

    point_id: str  # embedstream.stream.store.chunk_point_id(doc_id, chunk_index)
    doc_id: str
    chunk_index: int
    start: int
    end: int
    content_hash: str
    text: str
    sparse: SparseVector | None = None  # the document's, on its first chunk's row


def _npy_header(rows: int, dimension: int) -> bytes:
    """A .npy v1.0 header for a little-endian float32 C array, exactly 128 bytes."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dimension}), }}"
    room = _NPY_HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > room:
        raise ValueError(f"shape ({rows}, {dimension}) does not fit a .npy header")
    body = text.ljust(room - 1).encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _fsync_dir(directory: Path) -> None:
    # A new or renamed file survives power loss only once its directory entry does.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _write_group(writer: Any, tables: list[Any]) -> None:
    table = pa.concat_tables(tables)
    writer.write_table(table, row_group_size=table.num_rows)  # one row group


def _cannot_resume(what: str) -> ConfigError:
    return ConfigError(f"cannot resume the output: {what}; start the rebuild afresh")


class _NpyBackend:
    def __init__(self, path: Path, dimension: int, resume: Mapping[str, Any] | None) -> None:
        self._path, self._dimension = path, dimension
        self._ids_path = path.with_suffix(".ids.jsonl")
        self._vec_part = Path(f"{path}.part")
        self._ids_part = Path(f"{self._ids_path}.part")
        mode: Literal["w+b", "r+b"] = "w+b" if resume is None else "r+b"
        if resume is not None:
            sizes = (int(resume["vector_bytes"]), int(resume["ids_bytes"]))
            if sizes[0] != _NPY_HEADER_BYTES + int(resume["rows"]) * dimension * 4:
                raise _cannot_resume("the token's sizes do not match its row count")
            for part, size in zip((self._vec_part, self._ids_part), sizes, strict=True):
                if not part.is_file() or part.stat().st_size < size:
                    raise _cannot_resume(f"{part} is missing or shorter than at the checkpoint")
        self._vec: BinaryIO = open(self._vec_part, mode)  # noqa: SIM115 - open until close
        self._ids: BinaryIO = open(self._ids_part, mode)  # noqa: SIM115
        if resume is None:
            self._vec.write(_npy_header(0, dimension))
        else:  # whatever follows the checkpoint was written by the killed run: drop it
            for f, size in zip((self._vec, self._ids), sizes, strict=True):
                f.truncate(size)
                f.seek(size)

    def add(self, rows: Sequence[VectorRow], vectors: npt.NDArray[np.float32]) -> None:
        lines = [json.dumps({"id": r.point_id, "doc_id": r.doc_id, "chunk_index": r.chunk_index,
                             "start": r.start, "end": r.end, "content_hash": r.content_hash,
                             **_sparse_json(r.sparse)},
                            ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows]
        self._ids.write("".join(lines).encode("utf-8"))
        self._vec.write(np.ascontiguousarray(vectors, dtype="<f4").data)

    def checkpoint(self, rows: int) -> dict[str, Any]:
        # The header gets the checkpointed shape too, so the .part is a valid .npy.
        self._vec.seek(0)
        self._vec.write(_npy_header(rows, self._dimension))
        self._vec.seek(0, os.SEEK_END)
        for f in (self._vec, self._ids):
            _sync(f)
        _fsync_dir(self._path.parent)
        return {"vector_bytes": self._vec.tell(), "ids_bytes": self._ids.tell()}

    def close(self, rows: int) -> None:
        self.checkpoint(rows)
        self.abort()
        # Ids first: once `path` exists, both files are complete.
        os.replace(self._ids_part, self._ids_path)
        os.replace(self._vec_part, self._path)
        _fsync_dir(self._path.parent)

    def abort(self) -> None:
        self._vec.close()
        self._ids.close()


def _sparse_json(sparse: SparseVector | None) -> dict[str, Any]:
    if sparse is None:
        return {}
    return {"sparse": {"indices": list(sparse.indices), "values": list(sparse.values)}}


class _ParquetBackend:
    def __init__(self, path: Path, dimension: int, resume: Mapping[str, Any] | None,
                 sparse: bool = False) -> None:
        self._path = path
        self._parts_dir = Path(f"{path}.parts")
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._sparse = sparse
        self._schema = pa.schema([
            ("id", pa.string()), ("doc_id", pa.string()), ("chunk_index", pa.int32()),
            ("start", pa.int64()), ("end", pa.int64()), ("content_hash", pa.string()),
            ("text", pa.string()), ("vector", pa.list_(pa.float32(), dimension)),
            *([("sparse_indices", pa.list_(pa.uint32())),
               ("sparse_values", pa.list_(pa.float32()))] if sparse else []),
        ])
        self._parts: list[dict[str, Any]] = []  # completed parts: {"name", "rows"}
        self._pending: list[pa.RecordBatch] = []
        self._file: BinaryIO | None = None
        self._writer: Any = None  # pq.ParquetWriter of the part in progress
        self._part_rows = 0
        self._tmp.unlink(missing_ok=True)  # left by a merge that was killed
        if resume is None:
            shutil.rmtree(self._parts_dir, ignore_errors=True)
        else:
            self._parts = [{"name": str(p["name"]), "rows": int(p["rows"])}
                           for p in resume["parts"]]
            if sum(p["rows"] for p in self._parts) != int(resume["rows"]):
                raise _cannot_resume("the token's part sizes do not add up to its row count")
            for part in self._parts:
                try:  # reading the footer proves the part complete
                    rows = pq.ParquetFile(self._parts_dir / part["name"]).metadata.num_rows
                except (OSError, pa.ArrowException):
                    rows = None
                if rows != part["rows"]:
                    raise _cannot_resume(f"part {part['name']} is missing or not as checkpointed")
            # A part not in the token was in progress at the kill, so incomplete.
            keep = {p["name"] for p in self._parts}
            for leftover in self._parts_dir.iterdir() if self._parts_dir.is_dir() else ():
                if leftover.name not in keep:
                    leftover.unlink()
        self._parts_dir.mkdir(exist_ok=True)

    def add(self, rows: Sequence[VectorRow], vectors: npt.NDArray[np.float32]) -> None:
        # Copied: pyarrow would share the caller's buffer until the batch is written.
        flat = pa.array(np.array(vectors, dtype="<f4", copy=True).reshape(-1), pa.float32())
        columns = [pa.array([getattr(r, name) for r in rows], kind)
                   for name, kind in zip(_ROW_FIELDS, self._schema.types, strict=False)]
        columns.append(pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
        if self._sparse:
            columns.append(pa.array([None if r.sparse is None else list(r.sparse.indices)
                                     for r in rows], pa.list_(pa.uint32())))
            columns.append(pa.array([None if r.sparse is None else list(r.sparse.values)
                                     for r in rows], pa.list_(pa.float32())))
        self._pending.append(pa.record_batch(columns, schema=self._schema))
        if sum(b.nbytes for b in self._pending) >= _ROW_GROUP_BYTES:
            self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._file = open(self._parts_dir / f"part-{len(self._parts):05d}.parquet", "wb")  # noqa: SIM115
            self._writer = pq.ParquetWriter(self._file, self._schema)
        self._part_rows += sum(b.num_rows for b in self._pending)
        _write_group(self._writer, [pa.Table.from_batches(self._pending)])
        self._pending = []

    def checkpoint(self, rows: int) -> dict[str, Any]:
        # A Parquet file is readable only once its footer is written, so each
        # checkpoint finishes the part in progress; the next add starts a new one.
        self._write_pending()
        if self._writer is not None and self._file is not None:
            self._writer.close()
            _sync(self._file)
            self._file.close()
            self._parts.append({"name": Path(self._file.name).name, "rows": self._part_rows})
            self._writer, self._file, self._part_rows = None, None, 0
        _fsync_dir(self._parts_dir)
        return {"parts": [dict(p) for p in self._parts]}

    def close(self, rows: int) -> None:
        self.checkpoint(rows)
        if len(self._parts) == 1:  # already the whole output (and synced): no copy
            os.replace(self._parts_dir / self._parts[0]["name"], self._path)
        else:
            self._merge()
        _fsync_dir(self._path.parent)
        shutil.rmtree(self._parts_dir)

    def _merge(self) -> None:
        with open(self._tmp, "wb") as out:
            writer = pq.ParquetWriter(out, self._schema)
            # Row group by row group, re-batched: memory stays near one row group
            # however many (small) parts the checkpoints made.
            group: list[Any] = []
            for part in self._parts:
                source = pq.ParquetFile(self._parts_dir / part["name"])
                for i in range(source.num_row_groups):
                    group.append(source.read_row_group(i))
                    if sum(t.nbytes for t in group) >= _ROW_GROUP_BYTES:
                        _write_group(writer, group)
                        group = []
            if group:
                _write_group(writer, group)
            writer.close()
            _sync(out)
        os.replace(self._tmp, self._path)

    def abort(self) -> None:
        if self._writer is not None:
            # No footer on purpose (it could fail again on this error path; a resume
            # deletes the part anyway). Marked closed, or its __del__ would write one.
            self._writer.is_open = False
        if self._file is not None:
            self._file.close()
        self._writer, self._file = None, None


class VectorFileWriter:
    """Writes rows + vectors to ``path`` (``.parquet`` or ``.npy``, chosen by suffix).

    ``resume`` is a token :meth:`checkpoint` returned earlier for the same path and
    dimension; ``None`` starts afresh, discarding partial files a killed run left.
    ``sparse``: the rows carry document sparse vectors (Parquet: two more columns).
    Usable as a context manager: ``close`` on success, ``abort`` on an exception.
    """

    def __init__(self, path: Path, dimension: int,
                 resume: Mapping[str, Any] | None = None, sparse: bool = False) -> None:
        path = Path(path)
        kind = path.suffix.lower()
        if kind not in SUFFIXES:
            raise ConfigError(f"output {str(path)!r}: unsupported suffix {path.suffix!r}; "
                              f"use one of {', '.join(SUFFIXES)}")
        if not path.parent.is_dir():
            raise ConfigError(f"output {str(path)!r}: directory {str(path.parent)!r} is missing")
        if dimension <= 0:
            raise ConfigError(f"output {str(path)!r}: dimension must be positive, not {dimension}")
        self._path, self._dimension, self._kind = path, dimension, kind.lstrip(".")
        if resume is not None and (resume.get("version") != _TOKEN_VERSION
                                   or resume.get("format") != self._kind
                                   or resume.get("dimension") != dimension):
            raise _cannot_resume(f"the token is for {resume.get('format')!r} with dimension "
                                 f"{resume.get('dimension')!r}, not {self._kind!r} with "
                                 f"dimension {dimension}")
        try:
            self._rows = 0 if resume is None else int(resume["rows"])
            self._backend: _NpyBackend | _ParquetBackend | None = (
                _NpyBackend(path, dimension, resume) if self._kind == "npy"
                else _ParquetBackend(path, dimension, resume, sparse))
        except (KeyError, TypeError) as e:
            raise _cannot_resume(f"the token is malformed ({e!r})") from e

    @property
    def rows_written(self) -> int:
        """Rows added so far, checkpointed or not (including those before a resume)."""
        return self._rows

    def _open_backend(self) -> _NpyBackend | _ParquetBackend:
        if self._backend is None:
            raise ValueError(f"output {str(self._path)!r} is already closed")
        return self._backend

    def add(self, rows: Sequence[VectorRow], vectors: npt.NDArray[np.float32]) -> None:
        """Append ``rows``; ``vectors`` is float32 of shape ``(len(rows), dimension)``."""
        backend = self._open_backend()
        if vectors.dtype != np.float32 or vectors.shape != (len(rows), self._dimension):
            raise ValueError(f"vectors must be float32 of shape ({len(rows)}, "
                             f"{self._dimension}), got {vectors.dtype} {vectors.shape}")
        if rows:
            backend.add(rows, vectors)
            self._rows += len(rows)

    def checkpoint(self) -> dict[str, Any]:
        """Make every row added so far durable; returns the token to resume from."""
        token = self._open_backend().checkpoint(self._rows)
        return {"version": _TOKEN_VERSION, "format": self._kind,
                "dimension": self._dimension, "rows": self._rows, **token}

    def close(self) -> None:
        """Finish the output: it appears, complete, at ``path``."""
        self._open_backend().close(self._rows)
        self._backend = None

    def abort(self) -> None:
        """Release files without finishing; partial files stay for a resume."""
        if self._backend is not None:
            self._backend.abort()
            self._backend = None

    def __enter__(self) -> VectorFileWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
