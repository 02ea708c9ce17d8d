"""``source.text_template``: a document's text made from named fields of its row,
e.g. ``"{title}\n\n{body}"``. Checked when the settings load, filled by the
decoder (:mod:`embedstream.stream.decode`)."""

from __future__ import annotations

import string

__all__ = ["template_parts"]


def template_parts(template: str) -> list[tuple[str, str | None]]:
    """``source.text_template`` as (literal text, field name or None) pieces.
    Raises ValueError unless every placeholder is a plain field name: ``{title}``,
    not ``{}``, ``{0}``, ``{a.b}``, ``{a[0]}``, ``{a!r}`` or ``{a:>9}``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"text_template: {error}") from None
    parts: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            raise ValueError(f"text_template: {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a plain field name "
                             "like {title}")
        parts.append((literal, name))
    if not any(name for _, name in parts):
        raise ValueError("text_template names no field")
    return parts
