"""Rows flattened by Debezium's ExtractNewRecordState (``source.format: debezium-flat``)
and ``source.text_template``: what the decoder makes of them."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from pydantic import ValidationError

from embedstream.stream.config import SourceSettings
from embedstream.stream.decode import decode_message
from embedstream.stream.errors import DecodeError
from embedstream.stream.events import ChangeEvent, Op, Position, Skipped
from embedstream.stream.metrics import Metrics
from embedstream.stream.skip_watch import ONLY_SKIPPED_AFTER, SkipWatch

FLAT = SourceSettings(format="debezium-flat", id_fields=("id",), text_fields=("title", "body"),
                      metadata_fields=("lang", "__table"))
AT = Position("db.public.articles", 0, 41)

ONLY_SKIPPED, DEFAULT = "embedstream_source_only_skipped", {"route": "default"}


def decode(value: dict[str, Any] | None, key: Any = None,
           settings: SourceSettings = FLAT) -> ChangeEvent | Skipped:
    raw_key = None if key is None else json.dumps(key).encode()
    raw = None if value is None else json.dumps(value).encode()
    return decode_message(raw_key, raw, AT, settings)


ROW = {"id": 7, "title": "Tides", "body": "The moon pulls.", "lang": "en"}
ADDED = {"__op": "u", "__lsn": 9_001, "__source_ts_ms": 1_700_000_000_123,
         "__table": "articles"}


def test_a_plain_row_is_an_upsert_versioned_by_its_offset() -> None:
    event = decode({**ROW, "__deleted": "false"})
    assert isinstance(event, ChangeEvent)
    assert (event.doc_id, event.op, event.kind) == ("7", Op.UPSERT, "update")
    assert event.text == "Tides\n\nThe moon pulls." and dict(event.metadata) == {"lang": "en"}
    assert (event.version, event.versioned) == (41, False)


def test_add_fields_give_the_kind_version_time_and_metadata() -> None:
    event = decode({**ROW, **ADDED, "__op": "c"}, key={"id": 7})
    assert isinstance(event, ChangeEvent)
    assert (event.kind, event.version, event.versioned) == ("create", 9_001, True)
    assert event.source_ts_ms == 1_700_000_000_123
    assert dict(event.metadata) == {"lang": "en", "__table": "articles"}
    by_time = decode({**ROW, "__source_ts_ms": 5_000}, settings=FLAT.model_copy(
        update={"version": "ts_ms"}))
    assert isinstance(by_time, ChangeEvent) and by_time.version == 5_000


@pytest.mark.parametrize("flag", [True, "true", "TRUE"])
def test_a_rewritten_delete_deletes(flag: Any) -> None:
    event = decode({**ROW, "__deleted": flag, "__op": "d"})
    assert isinstance(event, ChangeEvent) and event.op is Op.DELETE and event.kind == "delete"
    assert decode({"id": 7, "__deleted": flag}).op is Op.DELETE  # type: ignore[union-attr]


def test_a_tombstone_deletes_its_key() -> None:
    event = decode(None, key={"id": 7})
    assert isinstance(event, ChangeEvent) and event.kind == "tombstone" and event.doc_id == "7"


def test_a_row_without_an_id_is_a_dead_letter_never_a_skip() -> None:
    with pytest.raises(DecodeError) as caught:
        decode({"title": "no id here"})
    assert caught.value.reason == "missing_id"


@pytest.mark.parametrize(("row", "reason"), [
    ({**ROW, "__deleted": "maybe"}, "bad_type"),
    ({**ROW, "__op": "x"}, "unknown_op"),
    ([ROW], "bad_type"),
])
def test_malformed_rows_say_why(row: Any, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        decode_message(None, json.dumps(row).encode(), AT, FLAT)
    assert caught.value.reason == reason


def test_explicit_version_modes_need_their_field() -> None:
    with pytest.raises(DecodeError) as caught:
        decode(ROW, settings=FLAT.model_copy(update={"version": "lsn"}))
    assert caught.value.reason == "missing_version"


def test_a_truncate_marker_is_skipped_with_its_reason() -> None:
    skipped = decode({**ROW, "__op": "t"})
    assert isinstance(skipped, Skipped) and skipped.reason == "truncate"


def test_flattened_rows_in_the_enveloped_format_are_skipped_as_no_op() -> None:
    """The mistake the consumer warns about: not an error, but nothing is indexed."""
    skipped = decode(ROW, settings=FLAT.model_copy(update={"format": "debezium"}))
    assert isinstance(skipped, Skipped) and skipped.reason == "no_op"


def test_a_text_template_fills_fields_by_name() -> None:
    settings = FLAT.model_copy(update={"text_template": "# {title}\n\n{body}\n(by {author})"})
    event = decode(ROW, settings=settings)
    assert isinstance(event, ChangeEvent)
    assert event.text == "# Tides\n\nThe moon pulls.\n(by )"
    blank = decode({"id": 8}, settings=settings.model_copy(update={"text_template": "{title}"}))
    assert isinstance(blank, ChangeEvent) and blank.text == ""
    with pytest.raises(DecodeError) as caught:
        decode({**ROW, "title": {"nested": 1}}, settings=settings)
    assert caught.value.reason == "bad_type"


@pytest.mark.parametrize("template", ["{}", "{0}", "{a.b}", "{a[0]}", "{a!r}", "{a:>9}",
                                      "no fields", "{unclosed"])
def test_a_template_with_anything_but_plain_field_names_is_refused_at_load(
        template: str) -> None:
    with pytest.raises(ValidationError, match="text_template"):
        SourceSettings(text_template=template)


def test_a_source_that_only_skips_raises_the_alarm_once(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    watch = SkipWatch(metrics, "debezium", "default")
    row = Skipped("no_op", AT)
    with caplog.at_level(logging.WARNING, logger="embedstream.consumer"):
        for _ in range(ONLY_SKIPPED_AFTER):
            watch.skipped(row)
        assert metrics.registry.get_sample_value(ONLY_SKIPPED, DEFAULT) == 0
        for _ in range(5):
            watch.skipped(row)
    assert metrics.registry.get_sample_value(ONLY_SKIPPED, DEFAULT) == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "source.format: debezium-flat" in warnings[0]
    assert metrics.registry.get_sample_value(
        "embedstream_skipped_total", {"reason": "no_op", **DEFAULT}) == ONLY_SKIPPED_AFTER + 5
    watch.taken()
    assert metrics.registry.get_sample_value(ONLY_SKIPPED, DEFAULT) == 0


def test_a_source_that_also_indexes_never_raises_it() -> None:
    metrics = Metrics()
    watch = SkipWatch(metrics, "debezium", "default")
    watch.taken()
    for _ in range(ONLY_SKIPPED_AFTER * 2):
        watch.skipped(Skipped("heartbeat", AT))
    assert metrics.registry.get_sample_value(ONLY_SKIPPED, DEFAULT) == 0
