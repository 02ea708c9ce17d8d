"""Token offsets of document text: one batched tokenizer call per window of
paragraphs, read back as character spans, and the cut points that never split
a token or a pre-tokenizer word (see the design notes in :mod:`embedstream.stream.chunking`).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from typing import Any

__all__ = ["TokenTable", "trimmed", "word_cut"]

# Cut points for tokenization units only; the tokenizer's cost grows faster than linearly
# with input length, and short units also tokenize in parallel.
_UNIT_GAP = re.compile(r"\s+|(?<=[\u3002\uff01\uff1f\u3400-\u4dbf\u4e00-\u9fff])")
_UNIT_CHARS = 8_192
# Characters a tokenizer probe reads to find a word boundary in text without whitespace.
_PROBE_CHARS = 1_024


def trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    piece = text[start:end]
    stripped = piece.lstrip()
    start += len(piece) - len(stripped)
    return start, start + len(stripped.rstrip())


def word_cut(backend: Any, text: str, pos: int, end: int) -> int | None:
    """A place at or after ``pos`` (within ``_PROBE_CHARS``) between two pre-tokenizer
    words, for text without whitespace: tokenizing either side alone changes no token. The
    probe's first word may start mid-word, so its second boundary is taken."""
    probe = backend.encode(text[pos : min(end, pos + _PROBE_CHARS)], add_special_tokens=False)
    words, offsets = probe.word_ids, probe.offsets
    cuts = [pos + offsets[k][0] for k in range(1, len(words)) if words[k] != words[k - 1]]
    return cuts[1] if len(cuts) > 1 else None


def _unit_cut(backend: Any, text: str, start: int, end: int) -> tuple[int, int] | None:
    """Where the tokenization unit starting at ``start`` ends: the first ``_UNIT_GAP`` after
    ``_UNIT_CHARS``, or, without one in the next ``_UNIT_CHARS``, a pre-tokenizer word
    boundary (a long run without whitespace), else the first gap after all."""
    lo, hi = start + _UNIT_CHARS, start + 2 * _UNIT_CHARS
    gap = _UNIT_GAP.search(text, lo, hi)
    if gap is not None:  # the whole gap, as an unbounded search finds it
        gap = _UNIT_GAP.match(text, gap.start(), end) or gap
    elif (word := word_cut(backend, text, lo, end)) is not None:
        return word, word
    else:
        gap = _UNIT_GAP.search(text, hi, end)
    return None if gap is None else gap.span()


class TokenTable:
    """Token offsets of one window (absolute character positions, window token indices)."""

    def __init__(self, backend: Any, text: str, blocks: list[tuple[int, int]]) -> None:
        units: list[tuple[int, int]] = []
        for s, e in blocks:
            while e - s > 2 * _UNIT_CHARS:
                cut = _unit_cut(backend, text, s, e)
                if cut is None:
                    break
                units.append((s, cut[0]))
                s = cut[1]
            units.append((s, e))
        encodings = backend.encode_batch([text[s:e] for s, e in units], add_special_tokens=False)
        self.starts: list[int] = []
        self.ends: list[int] = []
        # Pre-tokenizer word of each token, numbered across the whole document.
        self.words: list[int] = []
        word_base = 0
        for (base, _), encoding in zip(units, encodings, strict=True):
            offsets = encoding.offsets
            self.starts.extend([a + base for a, _ in offsets])
            self.ends.extend([b + base for _, b in offsets])
            words = encoding.word_ids
            self.words.extend([w + word_base for w in words])
            word_base += words[-1] + 1 if words else 0

    def spans(self, pieces: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
        """``pieces`` with their token index ranges. Neighbours are merged where the gap
        between them is no word boundary for the tokenizer (a token straddles it, or the
        tokens either side belong to one pre-tokenized word, e.g. around a control character
        the normalizer drops), since either side would tokenize differently alone."""
        starts, ends, words = self.starts, self.ends, self.words
        out: list[tuple[int, int, int, int]] = []
        for s, e in pieces:
            if out:
                ps, pe, pi0, pi1 = out[-1]
                if pi1 > 0 and (
                    ends[pi1 - 1] > pe or (pi1 < len(words) and words[pi1 - 1] == words[pi1])
                ):
                    out[-1] = (ps, e, pi0, bisect_left(starts, e, pi1))
                    continue
            i0 = bisect_left(starts, s)
            out.append((s, e, i0, bisect_left(starts, e, i0)))
        return out

    def subwords(
        self, text: str, start: int, end: int, first: int, stop: int
    ) -> list[tuple[int, int, int, int]]:
        """Split a whitespace-free span where the pre-tokenizer starts a new word (at
        punctuation in URLs, between CJK ideographs): cuts that need no re-check."""
        starts, words = self.starts, self.words
        out: list[tuple[int, int, int, int]] = []
        for k in range(first + 1, stop):
            if words[k] != words[k - 1]:
                s, e = trimmed(text, start, starts[k])
                if s < e:
                    out.append((s, e, first, k))
                start, first = starts[k], k
        s, e = trimmed(text, start, end)
        if s < e:
            out.append((s, e, first, stop))
        return out
