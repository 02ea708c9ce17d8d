"""embedstream.bulk.sources: corpus files (JSONL, TSV, Parquet; .gz, .zst) in, one item
per row out."""

from __future__ import annotations

import datetime
import decimal
import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from embedstream.bulk.sources import RowFailure, SourceRow, count_rows, expand_files, read_rows
from embedstream.stream.config import Settings, load_settings
from embedstream.stream.errors import ConfigError, SourceError

DATA = Path(__file__).parents[1] / ".." / "shared" / "data"
SCIFACT_ROWS, MSMARCO_ROWS = 5183, 1999

SCIFACT = load_settings(source={"text_fields": ["title", "text"]})
MSMARCO = load_settings(source={"text_fields": ["text"]}, bulk={"tsv_columns": ["id", "text"]})
HEADED_TSV = load_settings(source={"text_fields": ["text"]})


def real(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="module")
def scifact() -> Path:
    return real("beir/scifact/corpus.jsonl")


@pytest.fixture(scope="module")
def msmarco() -> Path:
    return real("msmarco-sample/passages.tsv")


def items(path: Path | str, settings: Settings, skip: int = 0) -> list[SourceRow | RowFailure]:
    return list(read_rows(str(path), settings, skip))


def pairs(found: list[SourceRow | RowFailure]) -> list[tuple[str, str]]:
    assert all(isinstance(item, SourceRow) for item in found), [
        item for item in found if isinstance(item, RowFailure)][:3]
    return [(item.doc_id, item.text) for item in found if isinstance(item, SourceRow)]


def failures(found: list[SourceRow | RowFailure]) -> list[tuple[str, str]]:
    return [(item.where, item.reason) for item in found if isinstance(item, RowFailure)]


def write_zst(path: Path, data: bytes, frames: int = 1) -> Path:
    step = -(-len(data) // frames)
    compressor = zstandard.ZstdCompressor()
    path.write_bytes(b"".join(compressor.compress(data[i:i + step])
                              for i in range(0, len(data), step)))
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]], group_rows: int = 1000) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=group_rows)
    return path


def scifact_columns(scifact: Path) -> dict[str, list[Any]]:
    rows = [json.loads(line) for line in scifact.read_text("utf-8").splitlines()]
    # Not "metadata": Parquet cannot hold its empty struct.
    return {name: [row[name] for row in rows] for name in ("_id", "title", "text")}


# -- every format reads the same corpus ----------------------------------------------


@pytest.fixture(scope="module")
def scifact_variants(scifact: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp, data = tmp_path_factory.mktemp("scifact"), scifact.read_bytes()
    (tmp / "corpus.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp / "CORPUS.NDJSON.GZ").write_bytes(gzip.compress(data))  # suffixes: any case
    return [
        scifact,
        tmp / "corpus.jsonl.gz",
        tmp / "CORPUS.NDJSON.GZ",
        write_zst(tmp / "corpus.jsonl.zst", data),
        write_zst(tmp / "frames.jsonl.zst", data, frames=3),  # concatenated frames
        write_parquet(tmp / "corpus.parquet", scifact_columns(scifact)),
    ]


def test_scifact_reads_alike_in_every_format(scifact_variants: list[Path]) -> None:
    expected = pairs(items(scifact_variants[0], SCIFACT))
    assert len(expected) == SCIFACT_ROWS
    assert expected[0][0] == "4983"  # `_id` stands in for the default id field `id`
    assert expected[0][1].startswith("Microstructural development of human newborn")
    assert "\n\nAlterations of the architecture" in expected[0][1]  # title, blank line, text
    for path in scifact_variants[1:]:
        assert pairs(items(path, SCIFACT)) == expected, path
    by_name = load_settings(source={"id_fields": ["_id"], "text_fields": ["title", "text"]})
    assert pairs(items(scifact_variants[-1], by_name)) == expected


def test_msmarco_reads_alike_in_every_format(msmarco: Path, tmp_path: Path) -> None:
    expected = pairs(items(msmarco, MSMARCO))
    assert len(expected) == MSMARCO_ROWS
    assert expected[0][0] == "21568"
    data = msmarco.read_bytes()
    (tmp_path / "p.tsv.gz").write_bytes(gzip.compress(data))
    write_zst(tmp_path / "p.tsv.zst", data)
    for path in (tmp_path / "p.tsv.gz", tmp_path / "p.tsv.zst"):
        assert pairs(items(path, MSMARCO)) == expected, path
    (tmp_path / "headed.tsv").write_bytes(b"id\ttext\n" + data)
    assert pairs(items(tmp_path / "headed.tsv", HEADED_TSV)) == expected
    ids, texts = zip(*expected, strict=True)
    write_parquet(tmp_path / "p.parquet", {"id": list(ids), "text": list(texts)})
    assert pairs(items(tmp_path / "p.parquet", HEADED_TSV)) == expected


def test_tsv_fields_are_taken_verbatim(tmp_path: Path) -> None:
    lines = ['1\tHe said "hi" and left.', '2\t"quoted whole"', '3\tback\\slash \'single\'',
             "4\tbare\rreturn inside", "5\t" + "x" * 200_000]  # over csv's default limit
    (tmp_path / "q.tsv").write_text("\r\n".join(lines) + "\r\n", "utf-8", newline="")
    found = pairs(items(tmp_path / "q.tsv", MSMARCO))
    assert found == [tuple(line.split("\t")) for line in lines]


# -- resuming --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [0, 1, 3, 5], ids=["jsonl", "gz", "zst", "parquet"])
def test_skip_resumes_exactly_at_row_n(scifact_variants: list[Path], variant: int) -> None:
    path = scifact_variants[variant]
    full = items(path, SCIFACT)
    for skip in (1, 999, 1000, 1001, 2500, SCIFACT_ROWS - 1, SCIFACT_ROWS, SCIFACT_ROWS + 7):
        assert items(path, SCIFACT, skip) == full[skip:], skip


def test_skip_spans_files_and_counts_failures(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n[]\n\n{"id": 2}\n', "utf-8")
    write_parquet(tmp_path / "b.parquet", {"id": ["3", None, "5"]}, group_rows=2)
    (tmp_path / "c.tsv").write_text("id\ttext\n6\tsix\n7\n\n8\teight\n", "utf-8")
    spec = str(tmp_path / "*")
    full = items(spec, HEADED_TSV)
    assert [getattr(item, "doc_id", None) for item in full] == [
        "1", None, "2", "3", None, "5", "6", None, "8"]
    for skip in range(len(full) + 2):
        assert items(spec, HEADED_TSV, skip) == full[skip:], skip


def test_negative_skip_is_refused(scifact: Path) -> None:
    with pytest.raises(ValueError, match="skip"):
        read_rows(str(scifact), SCIFACT, -1)


# -- bad rows: one failure each, and the read goes on -------------------------------


def test_bad_jsonl_rows_are_reported_in_place(tmp_path: Path) -> None:
    lines = [b'\xef\xbb\xbf{"id": "a", "text": "first"}',  # a BOM on line 1 is not data
             b"[1, 2]", b'{"text": "no id"}', b'{"id": "b", "text": "not utf-8 \xff"}',
             b"", b"   ", b'{"id": "c", "text": ', b'{"id": "d", "x": NaN}',
             b'{"id": {"nested": 1}}', b'{"a": ' * 100_000, b'{"id": "e", "text": "last"}']
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))  # and no newline after the last line
    found = items(path, load_settings(source={"text_fields": ["text"]}))
    assert failures(found) == [(f"{path}:2", "bad_row"), (f"{path}:3", "missing_id"),
                               (f"{path}:4", "not_utf8"), (f"{path}:7", "invalid_json"),
                               (f"{path}:8", "invalid_json"), (f"{path}:9", "bad_type"),
                               (f"{path}:10", "invalid_json")]  # nested too deeply
    rows = [(item.doc_id, item.text, item.where) for item in found
            if isinstance(item, SourceRow)]
    assert rows == [("a", "first", f"{path}:1"), ("e", "last", f"{path}:11")]
    assert all(isinstance(item, SourceRow) or item.detail for item in found)


def test_bad_tsv_rows_are_reported_in_place(tmp_path: Path) -> None:
    path = tmp_path / "bad.tsv.gz"
    path.write_bytes(gzip.compress(b"id\ttext\n1\tone\n2\ttwo\textra\n3\n4\tbad \xff\n\n5\tfive\n"))
    found = items(path, HEADED_TSV)
    assert failures(found) == [(f"{path}:3", "bad_row"), (f"{path}:4", "bad_row"),
                               (f"{path}:5", "not_utf8")]
    assert [(i.doc_id, i.where) for i in found if isinstance(i, SourceRow)] == [
        ("1", f"{path}:2"), ("5", f"{path}:7")]
    assert "3 columns, expected 2" in next(
        i.detail for i in found if isinstance(i, RowFailure))


def test_over_long_line_is_one_failure(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl.zst"

    def line(doc_id: str, size: int) -> bytes:  # `size` bytes, newline included
        return b'{"id": "%s", "text": "%s"}\n' % (doc_id.encode(), b"y" * (size - 24))

    assert len(line("a", 1001)) == 1001
    write_zst(path, line("a", 1001) + line("b", 1002) + b"z" * 50_000 + b"\n" + line("c", 30))
    small = load_settings(source={"max_message_bytes": 1000, "text_fields": ["text"]})
    found = items(path, small)  # the limit is on the line without its newline
    assert failures(found) == [(f"{path}:2", "message_too_large"),
                               (f"{path}:3", "message_too_large")]
    assert [i.doc_id for i in found if isinstance(i, SourceRow)] == ["a", "c"]


def test_parquet_values_become_plain_and_bad_rows_fail_alone(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "t.parquet", {
        "id": pa.array([1, None, 3, 4], pa.int64()),
        "body": pa.array([b"caf\xc3\xa9", b"x", b"\xff\xfe", b"ok"], pa.binary()),
        "price": pa.array([decimal.Decimal("1.50")] * 4, pa.decimal128(5, 2)),
        "seen": pa.array([datetime.datetime(2024, 5, 1, 12, 0)] * 4, pa.timestamp("s")),
        "unused": pa.array([[1.0, 2.0]] * 4, pa.list_(pa.float32())),
    }, group_rows=3)
    settings = load_settings(source={"text_fields": ["body"],
                                     "metadata_fields": ["price", "seen"]})
    found = items(path, settings)
    assert failures(found) == [(f"{path}#1", "missing_id"), (f"{path}#2", "not_utf8")]
    first, last = found[0], found[3]
    assert isinstance(first, SourceRow) and isinstance(last, SourceRow)
    assert (first.doc_id, first.text, first.where) == ("1", "café", f"{path}#0")
    assert first.metadata == {"price": "1.50", "seen": "2024-05-01T12:00:00"}
    assert (last.doc_id, last.where) == ("4", f"{path}#3")


# -- damaged files are hard errors -----------------------------------------------------


def drain(path: Path, settings: Settings = SCIFACT) -> Iterator[SourceRow | RowFailure]:
    yield from read_rows(str(path), settings)


def test_corrupt_gzip_raises_source_error(scifact: Path, tmp_path: Path) -> None:
    packed = gzip.compress(scifact.read_bytes())
    truncated = tmp_path / "truncated.jsonl.gz"
    truncated.write_bytes(packed[: len(packed) // 2])
    read = 0
    with pytest.raises(SourceError, match=re.escape("truncated.jsonl.gz")):
        for _ in drain(truncated):
            read += 1
    assert 0 < read < SCIFACT_ROWS  # rows before the damage came out first
    garbled = tmp_path / "garbled.jsonl.gz"
    garbled.write_bytes(packed[:5000] + bytes(64) + packed[5064:])
    with pytest.raises(SourceError, match=re.escape("garbled.jsonl.gz")):
        list(drain(garbled))
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(scifact.read_bytes()[:1000])
    with pytest.raises(SourceError, match=re.escape("plain.jsonl.gz")):
        list(drain(not_gzip))


def test_truncated_zstd_raises_source_error(scifact: Path, tmp_path: Path) -> None:
    path = write_zst(tmp_path / "cut.jsonl.zst", scifact.read_bytes())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SourceError, match=re.escape("cut.jsonl.zst")):
        list(drain(path))


def test_unreadable_parquet_raises_source_error(scifact: Path, tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "cut.parquet", scifact_columns(scifact))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SourceError, match=re.escape("cut.parquet")):
        list(drain(path))
    with pytest.raises(SourceError, match=re.escape("cut.parquet")):
        count_rows(str(path), SCIFACT)


def test_tsv_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "dup.tsv").write_text("id\ttext\tid\n1\ta\t2\n", "utf-8")
    with pytest.raises(SourceError, match=r"dup.tsv:1.*'id'"):
        list(drain(tmp_path / "dup.tsv", HEADED_TSV))


# -- naming files ------------------------------------------------------------------


def test_globs_expand_sorted_and_skip_directories(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "c.tsv", "sub/d.jsonl", "sub/deeper/a.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f'{{"id": "{name}"}}\n', "utf-8")
    (tmp_path / "dir.jsonl").mkdir()
    assert expand_files(str(tmp_path / "*.jsonl")) == [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    everything = expand_files(str(tmp_path / "**" / "*.jsonl"))
    assert everything == [tmp_path / n for n in ("a.jsonl", "b.jsonl", "sub/d.jsonl",
                                                 "sub/deeper/a.jsonl")]
    found = items(tmp_path / "**" / "*.jsonl", SCIFACT)
    assert [i.doc_id for i in found if isinstance(i, SourceRow)] == [
        "a.jsonl", "b.jsonl", "sub/d.jsonl", "sub/deeper/a.jsonl"]
    assert expand_files(str(tmp_path / "c.tsv")) == [tmp_path / "c.tsv"]
    (tmp_path / "part[1].jsonl").write_text("", "utf-8")
    assert expand_files(str(tmp_path / "part[1].jsonl")) == [tmp_path / "part[1].jsonl"]


def test_no_match_and_directories_are_config_errors(tmp_path: Path) -> None:
    spec = str(tmp_path / "nothing-*.jsonl.gz")
    with pytest.raises(ConfigError, match="nothing-"):
        expand_files(spec)
    with pytest.raises(ConfigError, match="no such file"):
        expand_files(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="directory"):
        expand_files(str(tmp_path))
    with pytest.raises(ConfigError, match="nothing-"):
        read_rows(spec, SCIFACT)  # at the call, before any iteration


@pytest.mark.parametrize("name, message", [
    ("x.parquet.gz", "Parquet compresses"), ("x.parquet.zst", "Parquet compresses"),
    ("x.csv", r"supported: .jsonl, .ndjson, .tsv, .parquet"), ("x.gz", "unknown file type"),
    ("x", "unknown file type"),
])
def test_unsupported_names_are_config_errors(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / name).write_bytes(b"")
    (tmp_path / "fine.jsonl").write_bytes(b"")
    with pytest.raises(ConfigError, match=message):
        read_rows(str(tmp_path / "*"), SCIFACT)  # checked for every file before reading


# -- counting ----------------------------------------------------------------------


def test_count_rows_matches_the_real_files(scifact: Path, msmarco: Path, tmp_path: Path) -> None:
    assert count_rows(str(scifact), SCIFACT) == SCIFACT_ROWS
    assert count_rows(str(msmarco), MSMARCO) == MSMARCO_ROWS
    (tmp_path / "headed.tsv").write_bytes(b"id\ttext\n" + msmarco.read_bytes().rstrip(b"\n"))
    assert count_rows(str(tmp_path / "headed.tsv"), HEADED_TSV) == MSMARCO_ROWS
    write_parquet(tmp_path / "s.parquet", scifact_columns(scifact))
    assert count_rows(str(tmp_path / "s.parquet"), SCIFACT) == SCIFACT_ROWS
    assert count_rows(str(tmp_path / "*"), HEADED_TSV) == SCIFACT_ROWS + MSMARCO_ROWS
    (tmp_path / "s.jsonl.gz").write_bytes(gzip.compress(b'{"id": 1}\n'))
    assert count_rows(str(tmp_path / "*"), HEADED_TSV) is None
    (tmp_path / "empty.tsv").write_bytes(b"")
    assert count_rows(str(tmp_path / "empty.tsv"), HEADED_TSV) == 0
