"""Token-aware, edit-stable chunking of document text.

Guaranteed: every chunk is an exact substring (``text == doc[start:end]``) of at
most ``max_tokens`` model tokens (exact for WordPiece tokenizers such as the
default model's), chunks are in order, do not overlap and cover every
non-blank character, and the same text always gives the same chunks. Cuts fall
at paragraph ends where possible, else sentence ends, else between words.
Boundaries are content-defined (see the design notes below), so an edit
re-chunks only its neighbourhood and later chunks come out byte-identical.
With a title (``source.title_field``), each chunk carries a header embedded in
front of its text, within the same token bound (see "Titles" below).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from embedstream.stream._text_split import SENTENCE_GAP, WINDOW_CHARS, WORD, iter_pieces, windows
from embedstream.stream._token_table import TokenTable, trimmed

__all__ = ["Chunk", "Chunker", "TokenChunker", "content_hash"]


def content_hash(text: str) -> str:
    """Stable hash of a text (hex sha256): of a chunk, the text it embeds."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a document: ``text == document[start:end]``.

    ``header`` is embedded in front of ``text`` (a contextual chunk header: the
    document's title and a blank line; empty without a title). ``n_tokens`` and
    ``content_hash`` are of what is embedded, :attr:`embed_text`; without a header
    that is ``text`` itself, so the hash is ``content_hash(text)`` as it always was.
    """

    index: int
    start: int
    end: int
    text: str
    n_tokens: int
    content_hash: str
    header: str = ""

    @property
    def embed_text(self) -> str:
        """What the model embeds for this chunk: ``header + text``."""
        return self.header + self.text if self.header else self.text


class Chunker(Protocol):
    @property
    def spec(self) -> str:
        """Everything that decides where boundaries fall (for the fingerprint)."""
        ...

    def chunk(self, text: str, title: str | None = None) -> list[Chunk]:
        """Deterministic chunks covering ``text``'s non-blank content, in order;
        with a ``title``, each embedding it in front of its text (a header)."""
        ...


# --------------------------------------------------------------------------------------
# Implementation
# --------------------------------------------------------------------------------------
#
# Design (why boundaries fall where they do)
#
# 1. Atomic segments. Sentences are segments: paragraphs (blank lines) are cut into
#    sentences (. ! ? with an optional closing quote or bracket, then whitespace; CJK full
#    stops; every newline); sentences over ``max_tokens`` into words (whitespace), then
#    into the tokenizer's own pre-tokenized words (punctuation inside URLs, CJK
#    ideographs), and only as a last resort into runs of sub-word tokens.
# 2. Content-defined grouping. Consecutive segments are packed into chunks. A chunk ends
#    after a segment when it holds >= ``min_tokens`` and the segment's own text "hits":
#    ``blake2b64(segment) % d < n_tokens(segment)``, where ``d`` is ``paragraph_divisor``
#    for a segment that ends a paragraph and ``divisor`` otherwise. The hit chance grows
#    with the segment's token count, so a chunk grows by about ``divisor`` tokens past
#    ``min_tokens`` inside a paragraph whatever the segment granularity, and paragraph ends
#    are the likelier cuts. A chunk is also cut when the next segment would push it over
#    ``max_tokens`` ("forced" cut).
# 3. Why: a hit depends only on the segment's text, so after an insertion or deletion both
#    versions cut at the same hit soon after the edit and every later chunk is byte-identical;
#    only forced cuts cascade, and they stop at the first common hit. Greedy fixed-size
#    packing would shift every later boundary. Integer arithmetic only, so boundaries are the
#    same on every platform; ``spec`` names every parameter.
# 4. Sizes. An edit re-embeds the chunks it touches: its own text plus, on average, about a
#    chunk. So chunks are small: a sentence or a few (defaults min 16, divisor 48, paragraph
#    divisor 16: any paragraph of 16+ tokens ends a chunk that holds 16; about 43 tokens on
#    average on documentation pages, 48 on abstracts); ``max_tokens`` is only the cap. On the
#    Debezium docs history (bench/delta.py) an edit embeds 1.6 times the characters of its
#    line diff (2.7 with the former paragraph segments and ~max/2 chunks), and BEIR SciFact
#    nDCG@10 (bench/scifact.py, a document scores its best chunk) rose from 0.647 to 0.687
#    (stock MiniLM on whole documents: 0.645).
#
# Titles. A titled document's chunks are embedded as ``title + "\n\n" + text`` (a contextual
# header). Header and chunk must fit the model together: the header is counted alone and the
# chunk cap lowered by that count, so header + chunk <= max_tokens (exact for WordPiece, which
# counts across whitespace additively). A title takes at most max_tokens // _TITLE_SHARE
# tokens, cut at a token edge, so it never crowds out the text. Only forced cuts and
# over-long sentences see the lower cap: hits, so most boundaries, do not change.
#
# Token counts come from one batched tokenizer call per window (paragraph-sized units,
# tokenized in parallel in Rust) and are read off the offsets: a span holds the tokens that
# start inside it. Neighbouring pieces are merged unless the pre-tokenizer puts a word
# boundary between them, so no cut splits a token or a word; runs of sub-word tokens (the
# last resort) are re-tokenised alone to check their count. For WordPiece (BERT family, the
# default model) a pre-tokenized word tokenizes the same alone as in context, so the offset
# count equals re-tokenising the chunk. For other families (byte-level BPE, SentencePiece) a
# count may be off by a token at a chunk edge: not guaranteed there.
#
# Windows. A document is processed in windows of whole paragraphs, about ``window_chars``
# characters each (token indices stay document-wide, and the open chunk carries over), so the
# token tables held at once are bounded whatever the document's size (10 MB: see
# tests/test_huge_document.py). No token straddles a paragraph gap, so windows change
# nothing. A paragraph over two windows long is cut after one to two windows: at a sentence
# end, else at whitespace at least half a window past the last sentence end, else (no
# whitespace at all) between two pre-tokenizer words. That changes nothing unless the cut
# falls inside a sentence of at most ``max_tokens`` tokens, or inside a word: half a window
# of characters in so few tokens, or without whitespace, is not text.

# Splitting the text (paragraphs, sentences, words, windows): stream/_text_split.py.

# Default boundary parameters (see "Sizes" above).
_MIN_TOKENS, _DIVISOR, _PARAGRAPH_DIVISOR = 16, 48, 16
_VERIFY_BATCH = 64
# A title's header takes at most 1/_TITLE_SHARE of max_tokens (see "Titles" above).
_TITLE_SHARE, _HEADER_GAP = 4, "\n\n"

# (start, end, first token, end token, n): n >= 0 marks a run of sub-word tokens, a chunk of
# its own because its edges are inside a word; n is then its re-tokenised count.
_Segment = tuple[int, int, int, int, int]


class TokenChunker:
    """Token-bounded, edit-stable chunker (see the design notes above).

    Guaranteed: chunks are in order, non-overlapping, ``text[start:end] == chunk.text``,
    trimmed of surrounding whitespace, together covering every non-whitespace character;
    the output depends only on ``text``, ``spec`` and the tokenizer; no cut falls inside a
    token; ``n_tokens <= max_tokens``, ``n_tokens`` counting the tokens of the chunk text
    alone without special tokens (exact for WordPiece tokenizers, see above). With a
    ``title``: every chunk's ``header`` is the title (cut to ``max_tokens // 4`` tokens)
    and a blank line, ``n_tokens`` counts header and text together and stays within
    ``max_tokens``, and the text, ``start`` and ``end`` are the document's own.
    The cap needs ``max_tokens >= 8`` (the config's minimum) to be safe: below that a
    single sub-word token of an over-long word may need more tokens alone than allowed, and
    such a chunk is kept whole (``n_tokens`` then says so) rather than cut inside a token.
    Memory is bounded by ``window_chars`` (for prose about 60 bytes a character of a
    window), plus the chunks returned, whatever the document's size.
    Not guaranteed: a chunk size above ``min_tokens`` (a document's last chunk, or one
    before a forced cut, may be smaller), or sentence detection beyond the simple
    punctuation rule ("e.g. " ends a sentence).
    """

    def __init__(
        self,
        tokenizer: Any,
        max_tokens: int,
        *,
        min_tokens: int | None = None,
        divisor: int | None = None,
        paragraph_divisor: int | None = None,
        window_chars: int = WINDOW_CHARS,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "encode_batch"):
            raise TypeError("TokenChunker needs a fast (Rust-backed) Hugging Face tokenizer")
        # A private copy: every call through the transformers wrapper changes the shared
        # backend's truncation state (the embedder truncates to the model length), and a
        # truncating tokenizer here would silently undercount.
        from tokenizers import Tokenizer

        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self.max_tokens = max_tokens
        # Absolute sizes, not fractions of max_tokens: they suit the text (sentences), not the
        # model's window (see "Sizes" above).
        self.min_tokens = min(_MIN_TOKENS, max_tokens) if min_tokens is None else min_tokens
        # Expected growth past min_tokens inside a paragraph.
        self.divisor = _DIVISOR if divisor is None else divisor
        self.paragraph_divisor = (
            _PARAGRAPH_DIVISOR if paragraph_divisor is None else paragraph_divisor
        )
        if not 0 <= self.min_tokens <= max_tokens or min(self.divisor, self.paragraph_divisor) < 1:
            raise ValueError(
                "need 0 <= min_tokens <= max_tokens, divisor >= 1 and paragraph_divisor >= 1"
            )
        if window_chars < 2:
            raise ValueError(f"window_chars must be >= 2, got {window_chars}")
        # Not in ``spec``: windows bound memory and leave boundaries alone (see the notes).
        self._window_chars = window_chars
        # Copies of this chunker with a lower cap, for chunks under a title, by cap.
        self._capped: dict[int, TokenChunker] = {}

    @property
    def spec(self) -> str:
        return (
            f"cdc-v2:max_tokens={self.max_tokens}:min_tokens={self.min_tokens}"
            f":divisor={self.divisor}:paragraph_divisor={self.paragraph_divisor}"
            ":segments=sentences:hash=blake2b64"
        )

    def chunk(self, text: str, title: str | None = None) -> list[Chunk]:
        header, header_tokens = self.header(title) if title else ("", 0)
        if header_tokens == 0:
            return self._chunk(text, header, 0)
        cap = self.max_tokens - header_tokens
        capped = self._capped.get(cap)
        if capped is None:
            # Same tokenizer and parameters, a lower cap: a shallow copy (no tokenizer copy).
            capped = copy.copy(self)
            capped.max_tokens, capped.min_tokens = cap, min(self.min_tokens, cap)
            capped._capped = {}
            self._capped[cap] = capped
        return capped._chunk(text, header, header_tokens)

    def header(self, title: str) -> tuple[str, int]:
        """The header embedded in front of each chunk of a document titled ``title``
        (the title, whitespace-trimmed and cut at a token edge to at most
        ``max_tokens // 4`` tokens, then a blank line) and its token count; ``("", 0)``
        when nothing of the title is left."""
        budget = self.max_tokens // _TITLE_SHARE
        title = title.strip()
        offsets = self._backend.encode(title, add_special_tokens=False).offsets
        keep = min(len(offsets), budget)
        while keep > 0:
            cut = title if keep == len(offsets) else title[:offsets[keep - 1][1]].rstrip()
            header = cut + _HEADER_GAP
            n = len(self._backend.encode(header, add_special_tokens=False).ids)
            if n <= budget:
                return header, n
            keep -= n - budget  # the cut re-tokenised longer (or the gap costs tokens)
        return "", 0

    def _chunk(self, text: str, header: str, header_tokens: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        group = _Grouper(self, text, chunks, header, header_tokens)
        base = 0  # tokens in earlier windows: token indices are document-wide
        for blocks, paragraph_ends in windows(self._backend, text, self._window_chars):
            tokens = TokenTable(self._backend, text, blocks)
            sentences = [p for s, e in blocks for p in iter_pieces(text, SENTENCE_GAP, s, e)]
            segments: list[_Segment] = []
            self._segment(text, tokens, tokens.spans(sentences), 0, segments)
            group.add(segments, base, paragraph_ends)
            base += len(tokens.starts)
        group.close()
        return chunks

    def _segment(
        self,
        text: str,
        tokens: TokenTable,
        spans: list[tuple[int, int, int, int]],
        level: int,
        out: list[_Segment],
    ) -> None:
        for s, e, i0, i1 in spans:
            if i1 - i0 <= self.max_tokens:
                out.append((s, e, i0, i1, -1))
            elif level == 0:
                words = [m.span() for m in WORD.finditer(text, s, e)]
                self._segment(text, tokens, tokens.spans(words), 1, out)
            elif level == 1:
                self._segment(text, tokens, tokens.subwords(text, s, e, i0, i1), 2, out)
            else:
                self._split_word(text, tokens, s, e, i0, i1, out)

    def _split_word(
        self, text: str, tokens: TokenTable, start: int, end: int, first: int, stop: int,
        out: list[_Segment],
    ) -> None:
        """Cut an over-long word into runs of whole tokens. Each run is re-tokenised alone to
        check its count (batched): a run starting mid-word may tokenize differently alone;
        then that run is shortened by the excess and the rest re-planned."""
        pos, first_len = start, self.max_tokens
        while first < stop:
            runs: list[tuple[int, int, int, int]] = []
            f, p, length = first, pos, first_len
            while f < stop and len(runs) < _VERIFY_BATCH:
                last = min(f + length, stop)
                cut = end if last >= stop else tokens.starts[last]
                runs.append((*trimmed(text, p, cut), f, last))
                p, f, length = cut, last, self.max_tokens
            encodings = self._backend.encode_batch(
                [text[s:e] for s, e, _, _ in runs], add_special_tokens=False
            )
            first_len = self.max_tokens
            for (s, e, f, last), encoding in zip(runs, encodings, strict=True):
                n = len(encoding.ids)
                if n > self.max_tokens and last - f > 1:
                    first_len = max(1, last - f - (n - self.max_tokens))
                    break
                if s < e:
                    out.append((s, e, f, last, n))
                pos, first = (end if last >= stop else tokens.starts[last]), last

    def _hit(self, text: str, start: int, end: int, n_tokens: int, paragraph_end: bool) -> bool:
        digest = hashlib.blake2b(text[start:end].encode("utf-8"), digest_size=8).digest()
        divisor = self.paragraph_divisor if paragraph_end else self.divisor
        return int.from_bytes(digest, "big") % divisor < n_tokens


class _Grouper:
    """Packs segments into chunks (design note 2); its open chunk carries across windows.
    The open chunk spans text[open_s:open_e] and tokens [open_i0, open_i1); a span's count
    is taken between token indices so tokens inside gaps are counted too."""

    def __init__(self, chunker: TokenChunker, text: str, chunks: list[Chunk],
                 header: str = "", header_tokens: int = 0) -> None:
        self.chunker, self.text, self.chunks = chunker, text, chunks
        self.header, self.header_tokens = header, header_tokens
        self.open_s = self.open_e = self.open_i0 = self.open_i1 = -1

    def emit(self, start: int, end: int, n_tokens: int) -> None:
        piece = self.text[start:end]
        self.chunks.append(Chunk(len(self.chunks), start, end, piece,
                                 n_tokens + self.header_tokens,
                                 content_hash(self.header + piece), self.header))

    def close(self) -> None:
        if self.open_s >= 0:
            self.emit(self.open_s, self.open_e, self.open_i1 - self.open_i0)
            self.open_s = -1

    def add(self, segments: list[_Segment], base: int, paragraph_ends: set[int]) -> None:
        """Group ``segments``, whose token indices start at the window's ``base``."""
        chunker = self.chunker
        max_tokens, min_tokens = chunker.max_tokens, chunker.min_tokens
        for s, e, i0, i1, hard_n in segments:
            i0, i1 = i0 + base, i1 + base
            if self.open_s >= 0 and (hard_n >= 0 or i1 - self.open_i0 > max_tokens):
                self.close()
            if hard_n >= 0:
                self.emit(s, e, hard_n)
                continue
            if self.open_s < 0:
                self.open_s, self.open_i0 = s, i0
            self.open_e, self.open_i1 = e, i1
            if i1 - self.open_i0 >= min_tokens and chunker._hit(
                self.text, s, e, i1 - i0, e in paragraph_ends
            ):
                self.close()
