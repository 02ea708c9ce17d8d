"""Reading the configuration's sources for :mod:`embedstream.stream.config`, with
errors that name the file or the environment variable instead of a traceback.

Neither function quotes a value from the file or the environment: either could
hold a secret.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml  # type: ignore[import-untyped]  # from pydantic-settings[yaml]; no stubs here
from pydantic import BaseModel

from embedstream.stream.errors import ConfigError

__all__ = ["read_config_file", "unparsable_environment"]

_CONTAINERS = (dict, list, tuple, set, frozenset)


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML file's top-level mapping (empty for an empty file), or
    :class:`ConfigError` naming the file and what is wrong with it."""
    where = f"config file {str(path)!r}"
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{where} cannot be read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")  # YAML is UTF-8; tolerate the BOM some editors write
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line "
                          f"{line}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_problem(error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections (kafka:, source:, embed:, "
                          f"...), not a {_kind(data)}")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    # Not str(error): it quotes the offending line of the file, which may hold a secret.
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        what = ", ".join(part for part in (error.context, error.problem) if part)
        return f"{what or type(error).__name__}" + (
            f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")
    if isinstance(error, yaml.reader.ReaderError):
        return f"a character YAML does not allow (position {error.position})"
    return type(error).__name__


def _kind(data: object) -> str:
    if isinstance(data, list):
        return "list"
    return "string" if isinstance(data, str) else type(data).__name__


def unparsable_environment(settings_cls: type[BaseModel], prefix: str,
                           field: str | None) -> str | None:
    """Which ``prefix`` environment variables (under the top-level ``field``, when
    known) hold something other than JSON for a field that takes JSON (a list,
    a mapping, a section), as one line; None if none does."""
    found = []
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(prefix.upper()):
            continue
        path = name[len(prefix):].lower().split("__")
        if field is not None and path[0] != field:
            continue
        annotation = _annotation(settings_cls, path)
        if annotation is None or not _takes_json(annotation):
            continue
        try:
            json.loads(value)
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            example = '["a", "b"]' if _origin_in(annotation, (list, tuple, set, frozenset)) \
                else '{"name": "value"}'
            found.append(f"environment variable {name} ({'.'.join(path)}) is not valid JSON "
                         f"({reason}); this field takes JSON, e.g. {example}")
    return "; ".join(found) or None


def _annotation(model: type[BaseModel], path: list[str]) -> Any:
    """The annotation of the field at ``path`` (None if there is no such field)."""
    annotation: Any = None
    current: type[BaseModel] | None = model
    for part in path:
        if current is None:
            return None  # below a dict or list: the variable feeds its parent
        info = current.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        current = annotation if _is_model(annotation) else None
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _origin_in(annotation: Any, kinds: tuple[type, ...]) -> bool:
    return (get_origin(annotation) or annotation) in kinds


def _takes_json(annotation: Any) -> bool:
    """Whether pydantic-settings parses an environment value for this field as JSON."""
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        # A union with a plain type keeps an unparsable value as text: no error there.
        return all(_takes_json(a) for a in options)
    return _is_model(annotation) or _origin_in(annotation, _CONTAINERS)
