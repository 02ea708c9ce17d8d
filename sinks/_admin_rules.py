"""The rules both store admins apply alike: which names they take, which
collection an alias blocks the drop of, and how a listing shows aliases.

Only the decisions and their messages live here; reading the store (and what
"exists" means in it) is each admin's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from embedstream.sinks._layout import STATE_SUFFIX
from embedstream.stream.errors import SinkError
from embedstream.stream.names import name_error

__all__ = ["aliases_by_target", "aliases_to_drop", "check_names", "not_found", "refuse_part"]


def check_names(*names: str, alias: str | None = None) -> None:
    """Refuse collection ``names`` (and an ``alias``) the one name rule refuses,
    before anything is looked up or built from them."""
    problem = (None if alias is None else name_error(alias, "alias", alias=True)) or next(
        filter(None, (name_error(name, "collection") for name in names)), None)
    if problem:
        raise SinkError(problem)


def not_found(name: str, aliases: Mapping[str, str], missing: str) -> SinkError:
    """The error for a ``name`` that is no collection: the alias it is, if it
    is one; else ``missing``."""
    if name in aliases:
        return SinkError(f"{name!r} is an alias (of {aliases[name]!r}), not a collection")
    return SinkError(missing)


def refuse_part(name: str, is_collection: Callable[[str], bool]) -> None:
    """Refuse ``<x>_state`` while ``<x>`` exists: the admin names that one."""
    owner = name.removesuffix(STATE_SUFFIX)
    if owner != name and is_collection(owner):
        raise SinkError(f"{name!r} belongs to collection {owner!r}; name that one")


def aliases_by_target(aliases: Mapping[str, str]) -> Callable[[str], tuple[str, ...]]:
    """For a listing: a collection's name -> the aliases pointing at it, sorted."""
    pointing: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        pointing.setdefault(target, []).append(alias)
    return lambda name: tuple(sorted(pointing.get(name, ())))


def aliases_to_drop(name: str, aliases: Mapping[str, str], force: bool) -> list[str]:
    """The aliases pointing at ``name``, which its drop removes first; with
    any, the drop is refused unless ``force``."""
    pointing = sorted(a for a, target in aliases.items() if target == name)
    if pointing and not force:
        raise SinkError(
            f"collection {name!r} is in use: alias {', '.join(map(repr, pointing))} points "
            "at it. Switch the alias to another collection first, or drop it anyway with "
            "--force (which removes the alias too).")
    return pointing
