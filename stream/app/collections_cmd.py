"""The ``embedstream collections`` commands: the physical collections of the
configured store, and the aliases pointing at them.

``sink.collection`` names an alias; each rebuild makes a new physical
collection ``<alias>_<UTC timestamp>`` and switches the alias to it, leaving
the previous one until it is dropped. ``list`` shows them all (the alias's
current target marked ``*``); ``drop`` deletes one; ``switch`` points the
alias at one, which is also how a lost alias or a damaged ``aliases.json`` is
repaired. They only read or change the store; none needs the model or Kafka.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TextIO

from embedstream.sinks.factory import build_admin
from embedstream.stream.config import Settings
from embedstream.stream.errors import NeedsOperator
from embedstream.stream.store import CollectionInfo

__all__ = ["drop_collection", "list_collections", "switch_collection"]


def list_collections(settings: Settings, out: TextIO, *, as_json: bool = False) -> None:
    """Write every physical collection of the store: a table, or one JSON object
    per line (``name``, ``points``, ``aliases``, ``model``, ``dimension``,
    ``current``, ``route``, ``in_use``). ``current`` marks a collection a route's
    alias opens (``route`` names that route): the alias's target, or a collection
    of that very name made before aliases. With ``routes`` configured the table
    has a ROUTE column."""
    problem: NeedsOperator | None = None
    routes = settings.all_routes()
    opened_by: dict[str, str] = {}  # collection -> the route whose alias opens it
    admin = build_admin(settings.sink)
    try:
        infos = admin.collections()
        names = {info.name for info in infos}
        for route in routes:
            try:
                current = admin.resolve(route.collection)
            except NeedsOperator as error:
                # A damaged aliases.json: the listing is what the operator needs
                # to repair it, so it is shown first, then the error.
                current, problem = None, error
            if current is None and route.collection in names:
                current = route.collection
            if current is not None:
                opened_by.setdefault(current, route.name)
    finally:
        admin.close()
    if as_json:
        for info in infos:
            fingerprint = info.fingerprint
            out.write(json.dumps({
                "name": info.name, "points": info.points, "aliases": list(info.aliases),
                "model": fingerprint.model if fingerprint else None,
                "dimension": fingerprint.dimension if fingerprint else None,
                "current": info.name in opened_by, "route": opened_by.get(info.name),
                "in_use": info.in_use,
            }) + "\n")
    elif not infos:
        out.write("no collections\n")
    else:
        out.write(_table(infos, opened_by, with_route=bool(settings.routes)))
        if opened_by and settings.routes:
            out.write("\n* = the collection a route's alias opens\n")
        elif opened_by:
            out.write(f"\n* = the collection sink.collection {routes[0].collection!r} opens\n")
    if problem is not None:
        raise problem


def drop_collection(settings: Settings, name: str, out: TextIO, *, force: bool = False) -> None:
    """Delete the physical collection ``name`` (and its state). Refused for one
    an alias points at unless ``force``, and for one embedstream did not make."""
    admin = build_admin(settings.sink)
    try:
        admin.drop(name, force=force)
    finally:
        admin.close()
    out.write(f"dropped {name}\n")


def switch_collection(settings: Settings, target: str, out: TextIO) -> None:
    """Point the ``sink.collection`` alias at ``target`` (e.g. one rebuilt with
    ``--no-swap``). A live consumer follows; if ``target`` holds a rebuild's
    handover record, it resumes at those offsets, so what arrived since is
    applied to ``target`` too. Without one (e.g. switching back to an older
    collection) it resumes from its committed offsets: what arrived since is not
    in ``target``."""
    admin = build_admin(settings.sink)
    try:
        previous = admin.switch(settings.sink.collection, target)
    finally:
        admin.close()
    out.write(f"{settings.sink.collection} -> {target} (was {previous})\n")


def _table(infos: Sequence[CollectionInfo], opened_by: Mapping[str, str],
           with_route: bool) -> str:
    rows = [("", "NAME", "POINTS", "ALIASES", "MODEL", "DIM", *(("ROUTE",) if with_route else ()))]
    for info in infos:
        fingerprint = info.fingerprint
        points = ("in use" if info.in_use else "?") if info.points is None else str(info.points)
        rows.append((
            "*" if info.name in opened_by else "", info.name, points,
            ",".join(info.aliases) or "-",
            fingerprint.model if fingerprint else ("?" if info.in_use else "(not embedstream)"),
            str(fingerprint.dimension) if fingerprint else "-",
            *((opened_by.get(info.name, "-"),) if with_route else ()),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(w) if i == 2 else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
