"""A 10 MB document: chunked in bounded memory and realistic time, every chunk exact.

The chunker works in windows of paragraphs (stream/chunking.py, "Windows"), so its
peak memory does not grow with the document: measured on this 2-core machine, a
10 MB document of real MS MARCO sentences takes 5-7 s and about 60-75 MB over the
process's baseline (before windows: about 570 MB, and 3.6 GB for 10 MB of tiny
paragraphs). Each size is measured in a fresh subprocess, so the peak resident set
(VmHWM / ru_maxrss) belongs to the chunking alone.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from embedstream.stream.chunking import TokenChunker, content_hash

ROOT = Path(__file__).resolve().parents[1]
PASSAGES = ROOT.parent / "shared" / "data" / "msmarco-sample" / "passages.tsv"
MAX = 254  # what the service passes for all-MiniLM-L6-v2
TEN_MB = 10_000_000
GROWTH_BOUND_MB = 200  # measured 60-75 MB; the unwindowed chunker took ~570 MB
SECONDS_BOUND = 60  # measured 5-7 s; a generous cap that still catches a blow-up

# Runs in a fresh interpreter: chunk one document, report time and peak RSS growth.
CHILD = r"""
import json, resource, sys, time
root, model, doc, out, max_tokens = sys.argv[1:6]
sys.path.insert(0, root)

def peak_mb():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024

from transformers import AutoTokenizer
from embedstream.stream.chunking import TokenChunker

chunker = TokenChunker(AutoTokenizer.from_pretrained(model), max_tokens=int(max_tokens))
with open(doc, encoding="utf-8") as handle:
    text = handle.read()
chunker.chunk(text[:50_000])  # warm-up: lazy imports, allocator pools
baseline = peak_mb()
started = time.perf_counter()
chunks = chunker.chunk(text)
seconds = time.perf_counter() - started
growth = peak_mb() - baseline
with open(out, "w") as handle:
    json.dump({"seconds": seconds, "baseline_mb": baseline, "growth_mb": growth,
               "chunks": [[c.index, c.start, c.end, c.n_tokens, c.content_hash]
                          for c in chunks]}, handle)
"""


def sentences() -> list[str]:
    """Real sentences (MS MARCO passages), or generated ones where the data is missing."""
    if PASSAGES.is_file():
        rows = PASSAGES.read_text(encoding="utf-8").splitlines()
        passages = [row.split("\t", 1)[1] for row in rows if "\t" in row]
        found = [s for p in passages for s in re.split(r"(?<=[.!?])\s+", p) if s.strip()]
        if len(found) > 1000:
            return found
    rng = random.Random(7)
    words = [
        "stream", "change", "event", "vector", "index", "query", "document", "kafka", "offset",
        "chunk", "token", "model", "commit", "replay", "the", "a", "of", "to", "and", "in",
        "is", "for", "with", "on", "by", "naïve", "café", "東京", "données",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 30))).capitalize() + "."
            for _ in range(5000)]


def realistic_text(size: int, seed: int = 0) -> str:
    """Shuffled real sentences in paragraphs of 1 to 12, blank lines between them."""
    pool = sentences()
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < size:
        paragraph = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)[:size]


def chunk_in_subprocess(text: str, tmp_path: Path, model_path: str) -> dict[str, Any]:
    doc, out = tmp_path / "doc.txt", tmp_path / "chunks.json"
    doc.write_text(text, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT), model_path, str(doc), str(out), str(MAX)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def assert_exact_chunks(
    text: str, chunks: list[list[Any]], tokenizer: Any, every: int = 1
) -> None:
    """In order, non-overlapping, trimmed exact substrings covering all non-blank text,
    each at most MAX tokens when re-tokenised alone (and counted exactly): all of them,
    or ``every`` n-th where re-tokenising is slow."""
    assert chunks, "no chunks"
    pos = 0
    pieces = []
    for i, (index, start, end, n_tokens, digest) in enumerate(chunks):
        assert index == i and pos <= start < end <= len(text), (i, start, end)
        piece = text[start:end]
        assert digest == content_hash(piece), f"chunk {i} is not text[{start}:{end}]"
        assert piece == piece.strip() and not text[pos:start].strip(), f"gap before {i}"
        assert 0 < n_tokens <= MAX, (i, n_tokens)
        pieces.append(piece)
        pos = end
    assert not text[pos:].strip(), "uncovered text at the end"
    pieces, chunks = pieces[::every], chunks[::every]
    counts: list[int] = []
    for at in range(0, len(pieces), 4096):  # re-tokenise: what the embedder will see
        batch = tokenizer(pieces[at:at + 4096], add_special_tokens=False, verbose=False)
        counts += [len(ids) for ids in batch["input_ids"]]
    assert max(counts) <= MAX
    assert counts == [c[3] for c in chunks]  # exact for WordPiece


@pytest.mark.slow  # a fresh interpreter chunks 10 MB: ~15 s
def test_ten_megabytes_in_bounded_memory(
    tmp_path: Path, minilm_path: str, minilm_tokenizer: Any
) -> None:
    text = realistic_text(TEN_MB)
    assert len(text) == TEN_MB and text.count("\n\n") > 10_000
    report = chunk_in_subprocess(text, tmp_path, minilm_path)
    chunks = report["chunks"]
    print(f"\n10 MB document: {len(chunks):,} chunks in {report['seconds']:.1f} s, "
          f"peak RSS +{report['growth_mb']:.0f} MB over {report['baseline_mb']:.0f} MB")
    assert report["growth_mb"] < GROWTH_BOUND_MB, report["growth_mb"]
    assert report["seconds"] < SECONDS_BOUND, report["seconds"]
    assert_exact_chunks(text, chunks, minilm_tokenizer)
    mean = sum(c[3] for c in chunks) / len(chunks)
    assert 25 < mean < 80, mean  # sentence-sized chunks, as on smaller documents


@pytest.mark.slow  # a fresh interpreter, 1.6 MB re-tokenised: ~7 s
def test_a_long_run_without_whitespace_in_bounded_memory(
    tmp_path: Path, minilm_path: str, minilm_tokenizer: Any
) -> None:
    """Bad input: a base64 blob pasted into a text field, 1.6 MB without a space. Cut
    between the tokenizer's words (about 170 MB at any length; before: 2.8 GB for 10 MB)."""
    text = base64.b64encode(random.Random(3).randbytes(1_200_000)).decode()
    report = chunk_in_subprocess(text, tmp_path, minilm_path)
    print(f"\n{len(text) / 1e6:.1f} MB without whitespace: {len(report['chunks']):,} chunks "
          f"in {report['seconds']:.1f} s, peak RSS +{report['growth_mb']:.0f} MB")
    assert report["growth_mb"] < 300, report["growth_mb"]
    assert_exact_chunks(text, report["chunks"], minilm_tokenizer, every=7)


@pytest.fixture(scope="module")
def one_window(minilm_tokenizer: Any) -> TokenChunker:
    return TokenChunker(minilm_tokenizer, MAX, window_chars=1 << 40)


@pytest.mark.parametrize("window_chars", [None, 4_096])
@pytest.mark.parametrize("layout", ["paragraphs", "one paragraph"])
def test_windows_change_no_boundary(
    minilm_tokenizer: Any, one_window: TokenChunker, window_chars: int | None, layout: str
) -> None:
    """Windowed output is byte-identical to chunking the document in one piece, including
    paragraphs cut inside (at sentence ends) when far longer than a window."""
    text = realistic_text(1_200_000 if layout == "paragraphs" else 300_000, seed=1)
    if layout == "one paragraph":
        text = text.replace("\n\n", " ")
    windowed = (TokenChunker(minilm_tokenizer, MAX) if window_chars is None
                else TokenChunker(minilm_tokenizer, MAX, window_chars=window_chars))
    assert windowed.chunk(text) == one_window.chunk(text)


@pytest.mark.parametrize("window_chars", [2, 64, 1_000])
def test_tiny_windows_still_give_valid_chunks(minilm_tokenizer: Any, window_chars: int) -> None:
    """Windows far smaller than a sentence may move boundaries, never break a guarantee."""
    parts = [realistic_text(20_000, seed=2), "abc\x1cdef " * 300, "变更数据捕获。" * 300,
             base64.b64encode(random.Random(4).randbytes(6_000)).decode(), "word " * 2_000,
             "a" * 3_000, "https://example.com/" + "segment-" * 500]
    text = "\n\n".join(parts) + " " + " ".join(parts)
    chunker = TokenChunker(minilm_tokenizer, MAX, window_chars=window_chars)
    chunks = chunker.chunk(text)
    rows = [[c.index, c.start, c.end, c.n_tokens, c.content_hash] for c in chunks]
    assert all(c.text == text[c.start:c.end] for c in chunks)
    assert_exact_chunks(text, rows, minilm_tokenizer)
