"""The one rule for collection and alias names, wherever they come from:
``sink.collection``, the command line, ``aliases.json``, a rebuild checkpoint.

A name becomes a directory and file names (a Qdrant Edge store, a rebuild's
state directory), so it is checked before any path is built from it: letters,
digits, ``_``, ``.`` and ``-``, not starting with ``.`` (the store's own
files, ``.<collection>.lock`` and ``.rebuild``, start with one), and short
enough that every name derived from it fits a file name (255 bytes on ext4,
xfs and most others; Qdrant caps collection names at 255 too):

* a collection ``N`` gives ``N``, ``N_state`` and ``.N.lock``: ``N`` has at
  most :data:`MAX_COLLECTION` characters;
* an alias ``A`` gives the collections ``A_<UTC timestamp>`` (17 more,
  ``_2``... when taken in the same second) with their companions, and a
  rebuild's ``A.json``, ``A.json.tmp`` and ``A.failures.jsonl``: ``A`` has at
  most :data:`MAX_ALIAS`, which leaves room for all of them.

Names are ASCII, so characters and bytes count alike.
"""

from __future__ import annotations

import re

__all__ = ["MAX_ALIAS", "MAX_COLLECTION", "name_error", "name_problem"]

MAX_COLLECTION = 249  # 255 less "_state" (or the "." and ".lock" of the lock file)
MAX_ALIAS = 200  # + "_<timestamp>" (17) + "_<n>" + "_state" (6): 223 + "_<n>" <= 255
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def name_problem(name: object, *, alias: bool = False) -> str | None:
    """Why ``name`` cannot name a collection (``alias``: an alias, which is
    also the stem of the collections made for it); ``None`` when it can."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return ("use only letters, digits, '_', '.' and '-' (no path separators, spaces "
                "or other characters)")
    if name.startswith("."):
        return "it must not start with '.'"
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
