"""File-level plumbing for :mod:`embedstream.bulk.sources`: which format a name means, opening
(and decompressing) a file, reading bounded lines, and making Parquet values plain.

Every read error that means the rest of a file cannot be trusted (truncated or
corrupt compressed data, an I/O error) leaves here as
:class:`~embedstream.stream.errors.SourceError` naming the path.
"""

from __future__ import annotations

import datetime
import decimal
import gzip
import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

import zstandard

from embedstream.stream.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Compression",
    "Kind",
    "NotUtf8",
    "detect",
    "plain",
    "read_lines",
]

Kind = Literal["jsonl", "tsv", "parquet"]
Compression = Literal["gz", "zst"] | None

_KINDS: dict[str, Kind] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv",
                           ".parquet": "parquet"}
_COMPRESSIONS: dict[str, Compression] = {".gz": "gz", ".zst": "zst"}
SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".tsv", ".parquet",
                      ".jsonl.gz", ".ndjson.gz", ".tsv.gz",
                      ".jsonl.zst", ".ndjson.zst", ".tsv.zst")

# What a damaged stream raises while being read: gzip raises EOFError (truncated),
# zlib.error (bad deflate data) and BadGzipFile (an OSError); zstandard ZstdError.
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)

_UTF8_BOM = b"\xef\xbb\xbf"
_ZSTD_CHUNK = 1 << 16
_DRAIN_CHUNK = 1 << 20


class _LineReader(Protocol):
    def readline(self, size: int | None = -1, /) -> bytes: ...


class NotUtf8(ValueError):
    """A Parquet value that should be text holds bytes that are not UTF-8."""


def detect(path: Path) -> tuple[Kind, Compression]:
    """The format and compression ``path``'s suffixes name (case-insensitive),
    or :class:`ConfigError`."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = _COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    kind = _KINDS.get(suffixes[-1]) if suffixes else None
    if kind == "parquet" and compression is not None:
        raise ConfigError(f"{path}: Parquet compresses its pages itself; "
                          f"use the plain .parquet file, not .parquet.{compression}")
    if kind is None:
        raise ConfigError(f"{path}: unknown file type; supported: "
                          f"{', '.join(SUPPORTED_SUFFIXES)} (case-insensitive)")
    return kind, compression


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a (multi-frame) zstd file that fail on truncation.

    Not ``ZstdDecompressor().stream_reader``: that returns a clean end of file when
    the input stops inside a frame (zstandard 0.25), so a cut-off download would
    read as a shorter corpus. A decompressobj says whether its frame has ended.
    Memory: one input chunk's worth of output at a time.
    """

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self._source = source
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._out = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while self._pos >= len(self._out):
            if self._done:
                return 0
            self._fill()
        view = memoryview(buffer).cast("B")
        count = min(len(view), len(self._out) - self._pos)
        view[:count] = self._out[self._pos:self._pos + count]
        self._pos += count
        return count

    def _fill(self) -> None:
        chunk = self._source.read(_ZSTD_CHUNK)
        if not chunk:
            if self._in_frame:
                raise zstandard.ZstdError("input ends inside a zstd frame (truncated file)")
            self._done = True
            return
        parts = []
        while chunk:
            self._in_frame = True
            parts.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:  # a frame ended; concatenated frames may follow
                chunk = self._frame.unused_data
                self._frame = zstandard.ZstdDecompressor().decompressobj()
                self._in_frame = False
        self._out, self._pos = b"".join(parts), 0


@contextmanager
def _open(path: Path, compression: Compression) -> Iterator[_LineReader]:
    with open(path, "rb") as raw:
        if compression == "gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped
        elif compression == "zst":
            with io.BufferedReader(_ZstdReader(raw), _ZSTD_CHUNK) as unzstd:
                yield unzstd
        else:
            yield raw


def read_lines(path: Path, compression: Compression,
               limit: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` for each line, 1-based, without its line ending (and
    without a UTF-8 byte order mark on line 1). A line longer than ``limit`` bytes
    is read past, never held, and given as None: memory stays bounded by ``limit``
    whatever the file holds (a binary file misnamed .jsonl has no newlines)."""
    lineno = 0
    try:
        with _open(path, compression) as stream:
            while True:
                line = stream.readline(limit + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > limit and not line.endswith(b"\n"):
                    while (rest := stream.readline(_DRAIN_CHUNK)) and not rest.endswith(b"\n"):
                        pass
                    yield lineno, None
                    continue
                if lineno == 1 and line.startswith(_UTF8_BOM):
                    line = line[len(_UTF8_BOM):]
                yield lineno, line.rstrip(b"\n").rstrip(b"\r")
    except _READ_ERRORS as error:
        what = ("I/O error" if compression is None
                else f"truncated or corrupt {'gzip' if compression == 'gz' else 'zstd'} data")
        raise SourceError(f"{path}: cannot read past line {lineno} ({what}): {error}") from error


def plain(value: Any) -> Any:
    """A Parquet value (as ``to_pylist`` gives it) as a JSON-able value, as the
    stream's rows are: bytes as UTF-8 text (else :class:`NotUtf8`), decimals as
    text (like MongoDB's ``$numberDecimal``), dates and times in ISO 8601."""
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise NotUtf8(str(error)) from None
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):  # a Parquet map comes as a list of (key, value)
        return [plain(item) for item in value]
    return value
