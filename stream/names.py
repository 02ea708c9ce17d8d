"""The one rule for collection and alias names, wherever they come from:
``sink.collection``, the command line, ``aliases.json``, a rebuild checkpoint.

A name becomes a directory and file names (a Qdrant Edge store, a rebuild's
state directory), so it is checked before any path is built from it, and the
same rule is checked everywhere a name enters: the settings (``sink.collection``,
``routes[].collection``) when they load, the command line when it is parsed
(``rebuild --collection``, ``collections drop/switch NAME``), ``aliases.json``
and rebuild checkpoints when they are read, and the Helm chart's
``values.schema.json`` (:data:`NAME_PATTERN`, the same expression, which
``tests/test_names_and_aliases.py`` holds to this one):

* letters, digits, ``_``, ``.`` and ``-`` only;
* first a letter, a digit or ``_``: not ``.`` (the store's own files,
  ``.<collection>.lock`` and ``.rebuild``, start with one) and not ``-`` (a
  command line would read it as an option);
* no ``..`` anywhere (never a path component, never half of one);
* short enough that every name derived from it fits a file name (255 bytes on
  ext4, xfs and most others; Qdrant caps collection names at 255 too):

* a collection ``N`` gives ``N``, ``N_state`` and ``.N.lock``: ``N`` has at
  most :data:`MAX_COLLECTION` characters;
* an alias ``A`` gives the collections ``A_<UTC timestamp>`` (17 more,
  ``_2``... when taken in the same second) with their companions, and a
  rebuild's ``A.json``, ``A.json.tmp`` and ``A.failures.jsonl``: ``A`` has at
  most :data:`MAX_ALIAS`, which leaves room for all of them.

Names are ASCII, so characters and bytes count alike.

A route's name (:data:`ROUTE_NAME`) is a label, never a path, and has its own
pattern; ``--route`` takes a route's name or its collection.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ALIAS", "MAX_COLLECTION", "NAME_PATTERN", "ROUTE_NAME", "checked_alias",
           "name_error",
           "name_problem"]

MAX_COLLECTION = 249  # 255 less "_state" (or the "." and ".lock" of the lock file)
MAX_ALIAS = 200  # + "_<timestamp>" (17) + "_<n>" + "_state" (6): 223 + "_<n>" <= 255
# Every "." is followed by another character or ends the name: no "..". Written without
# look-ahead so that Helm (Go's RE2) and JSON Schema read it as Python does.
NAME_PATTERN = r"^[A-Za-z0-9_](\.?[A-Za-z0-9_-])*\.?$"
_CHARACTERS = re.compile(r"[A-Za-z0-9_.-]+")
# A route's name is no path: a metric label value and a command-line argument (``--route``
# takes it or the route's collection), short and plain.
ROUTE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def name_problem(name: object, *, alias: bool = False) -> str | None:
    """Why ``name`` cannot name a collection (``alias``: an alias, which is
    also the stem of the collections made for it); ``None`` when it can. The
    checks spell out :data:`NAME_PATTERN` one part at a time, to say which part
    fails."""
    if not isinstance(name, str) or not _CHARACTERS.fullmatch(name):
        return ("use only letters, digits, '_', '.' and '-' (no path separators, spaces "
                "or other characters)")
    if name.startswith((".", "-")):
        return f"it must not start with {name[0]!r}"
    if ".." in name:
        return "it must not hold '..'"
    limit = MAX_ALIAS if alias else MAX_COLLECTION
    if len(name) > limit:
        return (f"it has {len(name)} characters, at most {limit} fit "
                f"(the names made from it must fit a file name)")
    return None


def name_error(name: object, what: str = "", *, alias: bool = False) -> str | None:
    """The message for an invalid ``name`` given as ``what`` (the field, option
    or file it came from, if the message needs saying); ``None`` when valid."""
    problem = name_problem(name, alias=alias)
    if problem is None:
        return None
    shown = name if not isinstance(name, str) or len(name) <= 60 else f"{name[:60]}..."
    return f"{what} {shown!r}".lstrip() + f" is not a valid collection name: {problem}"


def checked_alias(name: str) -> str:
    """``name`` if it may name an alias (the settings' validator of every
    ``collection`` field: checked before any path is built from it); else
    ValueError saying why."""
    problem = name_error(name, alias=True)
    if problem:
        raise ValueError(problem)
    return name
