"""What a change event takes from a row image (a Debezium ``after``, a flattened row, a
file row, a native document's metadata): its text, title and metadata, read with the
source settings (see :mod:`embedstream.stream.decode` for the rules): pure, raising only
DecodeError through ``fail``."""

from __future__ import annotations

from typing import Any

from embedstream.stream.config import SourceSettings
from embedstream.stream.filters import filter_payload
from embedstream.stream.strict_json import check_utf8, fail
from embedstream.stream.templates import template_parts

__all__ = ["image_metadata", "image_text", "image_title"]

_UNAVAILABLE = "__debezium_unavailable_value"


def _field_text(image: dict[str, Any], name: str) -> str:
    """A text field's value as text ("" when absent or null)."""
    value = image.get(name)
    if value is None:
        return ""
    if isinstance(value, dict | list):
        fail("bad_type", f"text field {name!r} is not a scalar")
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if text == _UNAVAILABLE:
        fail("unavailable_value", f"text field {name!r} was not captured")
    return text


def image_text(image: dict[str, Any], settings: SourceSettings) -> str:
    """``source.text_template`` filled from ``image``, else the non-blank
    ``text_fields`` joined with a blank line."""
    if settings.text_template is not None:
        text = "".join(literal + (_field_text(image, name) if name else "")
                       for literal, name in template_parts(settings.text_template))
        text = text if text.strip() else ""
    else:
        text = "\n\n".join(t for name in settings.text_fields
                            if (t := _field_text(image, name)).strip())
    check_utf8(text, "text")
    return text


def image_title(image: dict[str, Any], settings: SourceSettings) -> str | None:
    """``source.title_field`` of ``image`` as text, trimmed; None if unset, absent or blank."""
    if settings.title_field is None:
        return None
    title = _field_text(image, settings.title_field).strip()
    check_utf8(title, "title")
    return title or None


def image_metadata(after: dict[str, Any], settings: SourceSettings) -> dict[str, Any]:
    """``metadata_fields`` as they are, then ``filter_fields`` as their types."""
    metadata = {name: after[name] for name in settings.metadata_fields if name in after}
    if _UNAVAILABLE in metadata.values() or any(
            after.get(name) == _UNAVAILABLE for name in settings.filter_fields):
        fail("unavailable_value", "a metadata field was not captured")
    metadata.update(filter_payload(after, settings.filter_fields))
    check_utf8(metadata, "metadata")
    return metadata
