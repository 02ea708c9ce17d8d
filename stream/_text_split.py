"""Splitting document text for :mod:`embedstream.stream.chunking`: paragraphs, sentences
and words, and the windows of whole paragraphs a document is processed in (see the
design notes there, "Atomic segments" and "Windows").

Pure functions and patterns over the text: no cut here splits a token or a
pre-tokenizer word (:mod:`embedstream.stream._token_table` finds those cuts).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from embedstream.stream._token_table import trimmed, word_cut

__all__ = ["SENTENCE_GAP", "WINDOW_CHARS", "WORD", "iter_pieces", "windows"]

_PARAGRAPH_GAP = re.compile(r"\n[^\S\n]*\n")
SENTENCE_GAP = re.compile(
    r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+|\s*\n\s*|(?<=[\u3002\uff01\uff1f])"
)
WORD = re.compile(r"\S+")
# Characters per window (see "Windows" in chunking's design notes): bounds the token
# tables held at once to a few tens of MB.
WINDOW_CHARS = 1 << 19
# Paragraphs per window at most: each costs a tokenizer encoding object.
_WINDOW_BLOCKS = 4_096
# Where a window may cut a paragraph without a sentence end: whitespace to the tokenizer too
# (the normalizer drops the separators \x1c-\x1f that Python calls space).
_WINDOW_SPACE = re.compile(r"[^\S\x1c-\x1f]+")


def iter_pieces(
    text: str, gap: re.Pattern[str], start: int, end: int
) -> Iterator[tuple[int, int]]:
    """Non-blank, whitespace-trimmed pieces of ``text[start:end]`` between matches of ``gap``."""
    pos = start
    for match in gap.finditer(text, start, end):
        s, e = trimmed(text, pos, match.start())
        if s < e:
            yield s, e
        pos = max(pos, match.end())
    s, e = trimmed(text, pos, end)
    if s < e:
        yield s, e


def windows(backend: Any, text: str, size: int) -> Iterator[tuple[list[tuple[int, int]], set[int]]]:
    """Blocks of ``text`` (its paragraphs, or parts of one) in windows of at most
    ``_WINDOW_BLOCKS`` blocks spanning about ``size`` (``window_chars``) characters, with
    the paragraph ends among them. A paragraph over twice that is cut (``_window_cut``)."""
    blocks: list[tuple[int, int]] = []
    ends: set[int] = set()
    for s, e in iter_pieces(text, _PARAGRAPH_GAP, 0, len(text)):
        if blocks and (e - blocks[0][0] > size or len(blocks) >= _WINDOW_BLOCKS):
            yield blocks, ends
            blocks, ends = [], set()
        while e - s > 2 * size and (cut := _window_cut(backend, text, s, size)) is not None:
            head = trimmed(text, s, cut[0])
            if head[0] < head[1]:
                yield [head], set()
            s = trimmed(text, cut[1], e)[0]
        blocks.append((s, e))
        ends.add(e)
    if blocks:
        yield blocks, ends


def _window_cut(backend: Any, text: str, start: int, size: int) -> tuple[int, int] | None:
    """Where to cut a paragraph starting at ``start`` (longer than twice
    ``size``), in ``[start + size, start + 2 * size)``: at the first sentence end;
    else at whitespace at least ``size // 2`` past the last sentence end, so neither
    side holds a short sentence; else (no whitespace) between two of the pre-tokenizer's
    words; None if there is no such place either."""
    lo, limit = start + size, start + 2 * size
    for gap in SENTENCE_GAP.finditer(text, lo, limit):
        if gap.end() < limit:
            return gap.span()
    last = start
    for gap in SENTENCE_GAP.finditer(text, start, lo):
        last = gap.end()
    space = _WINDOW_SPACE.search(text, max(lo, last + size // 2), limit)
    if space is not None:
        return space.span()
    word = word_cut(backend, text, lo, limit)
    return None if word is None else (word, word)
