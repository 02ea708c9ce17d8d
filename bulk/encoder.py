"""The model forward of a bulk rebuild: reduced precision where it pays, pooling on the device.

:class:`BulkEncoder` wraps a sentence-transformers model for large batches of
pre-tokenized texts. ``precision="auto"`` measures, on a calibration sample of
real texts, the fp32 forward against bf16 (fp16 on a GPU without bf16) and
keeps the reduced precision only when it is faster *and* every calibration
vector keeps cosine >= ``min_cosine`` with its fp32 reference. The transformer
runs in the chosen precision; its token states are cast to fp32 before the
model's own pooling (and Normalize) modules, so pooling and normalisation run
in fp32 on the device and only finished vectors are copied back.

Guaranteed: float32 rows of unit L2 norm; texts truncated to
``max_seq_length`` tokens exactly as ``SentenceTransformer.encode`` does.
Not guaranteed: the cosine bound beyond the calibration sample
(``bench/bulk.py`` measures it over a whole corpus); bit-identical vectors
across batch compositions. Not thread-safe: one forward at a time per encoder
(the engine runs one encoder per device).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.stream.embedding import pack_batches, pad_batch, resolve_model_path, weights_digest
from embedstream.stream.errors import ConfigError
from embedstream.stream.remote_embedding import OpenAIEmbedder

__all__ = ["AnyEncoder", "BulkEncoder", "RemoteEncoder"]

log = logging.getLogger("embedstream.bulk")

# On 2 x86 cores (AMX) bf16 MiniLM over MS MARCO ran at 287/303/312/231 passages/s with
# 2k/3k/4k/8k padded tokens per batch (fp32 peaked near 2k); a GPU wants far more.
_CPU_BATCH_TOKENS = 4096
_GPU_BATCH_TOKENS = 65536
_CALIBRATION_TEXTS = 256


class BulkEncoder:
    """One model on one device, for throughput (see the module docstring)."""

    def __init__(self, model: str, *, device: str = "auto", precision: str = "auto",
                 batch_tokens: int = 0, min_cosine: float = 0.99) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._torch = torch
        self.model_name = model
        self._path = resolve_model_path(model)
        self._model: Any = SentenceTransformer(self._path, device=device)
        self._model.eval()
        self.device = str(self._model.device)
        on_gpu = self._model.device.type == "cuda"
        self.batch_tokens = batch_tokens or (_GPU_BATCH_TOKENS if on_gpu else _CPU_BATCH_TOKENS)
        tokenizer = self._model.tokenizer
        if tokenizer is None:
            raise ConfigError(f"embed.model: {model!r} has no text tokenizer")
        self.tokenizer: Any = tokenizer
        self.max_seq_length = int(self._model.max_seq_length or tokenizer.model_max_length)
        get_dim = getattr(self._model, "get_embedding_dimension", None) \
            or self._model.get_sentence_embedding_dimension
        dimension = get_dim()
        if dimension is None:
            raise ConfigError(f"embed.model: cannot tell the output dimension of {model!r}")
        self.dimension = int(dimension)
        self._with_types = "token_type_ids" in tokenizer.model_input_names
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._left_pad = tokenizer.padding_side == "left"
        self._requested = precision
        self._min_cosine = min_cosine
        self.precision = "fp32" if precision == "auto" else precision
        self.calibration: dict[str, float] = {}
        if precision not in ("auto", "fp32"):
            self._set_precision(precision)

    @cached_property
    def revision(self) -> str:
        """Digest of the model files (hashing them takes about 0.1 s: once)."""
        return weights_digest(self._path)

    # -- tokenizing (thread-safe: HF fast tokenizers release the GIL) ------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to ``max_seq_length``."""
        if not texts:
            return []
        ids: list[list[int]] = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_seq_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False, verbose=False,
        )["input_ids"]
        return ids

    # -- precision ---------------------------------------------------------------

    def calibrate(self, sample: Sequence[list[int]]) -> str:
        """Pick the precision for ``precision="auto"`` from real tokenized texts
        (see the module docstring), once per encoder; returns the choice. Other
        settings keep theirs."""
        if self._requested != "auto" or self.calibration or not sample:
            return self.precision
        sample = list(sample[:_CALIBRATION_TEXTS])
        torch = self._torch
        on_gpu = self._model.device.type == "cuda"
        reduced = "bf16" if not on_gpu or torch.cuda.is_bf16_supported() else "fp16"
        # Casting in place rounds the weights: keep the fp32 ones to restore on a "no".
        transformer = self._model[0].auto_model
        fp32_weights = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        reference, fp32_s = self._timed(sample)
        self._set_precision(reduced)
        vectors, reduced_s = self._timed(sample)
        min_cos = float((reference * vectors).sum(axis=1).min())
        self.calibration = {"fp32_s": fp32_s, f"{reduced}_s": reduced_s, "min_cos": min_cos}
        if min_cos >= self._min_cosine and reduced_s < 0.9 * fp32_s:
            log.info("bulk precision %s: %.2fx the speed of fp32, min cosine %.5f",
                     reduced, fp32_s / reduced_s, min_cos)
            return self.precision
        log.info("bulk precision fp32: %s gave %.2fx the speed, min cosine %.5f",
                 reduced, fp32_s / max(reduced_s, 1e-9), min_cos)
        self._set_precision("fp32")
        transformer.load_state_dict(fp32_weights)
        return self.precision

    def _timed(self, sample: list[list[int]]) -> tuple[npt.NDArray[np.float32], float]:
        """Vectors of ``sample`` packed as the engine packs, and the best of two timings."""
        batches = pack_batches([len(seq) for seq in sample], self.batch_tokens)
        vectors = np.empty((len(sample), self.dimension), np.float32)
        best = float("inf")
        for attempt in range(3):  # the first pass warms up kernel selection
            started = time.perf_counter()
            for batch in batches:
                vectors[batch] = self.encode([sample[i] for i in batch])
            if attempt:
                best = min(best, time.perf_counter() - started)
        return vectors, best

    def _set_precision(self, precision: str) -> None:
        torch = self._torch
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
            precision)
        if dtype is None:
            raise ConfigError(f"bulk.precision: unknown precision {precision!r}")
        # Only the transformer changes dtype; pooling and Normalize stay fp32.
        self._model[0].auto_model.to(dtype)
        self.precision = precision

    # -- forward -----------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """The :class:`~embedstream.stream.embedding.Embedder` call: vectors of ``texts`` in
        input order, packed by length (the handover's catch-up uses this)."""
        ids = self.tokenize(texts)
        if ids:
            self.calibrate(ids[::max(1, len(ids) // _CALIBRATION_TEXTS)])
        out = np.empty((len(ids), self.dimension), np.float32)
        for batch in pack_batches([len(seq) for seq in ids], self.batch_tokens):
            out[batch] = self.encode([ids[i] for i in batch])
        return out

    def close(self) -> None:
        """Nothing to release (the model goes with the object); as RemoteEncoder does."""

    def encode(self, batch: Sequence[list[int]]) -> npt.NDArray[np.float32]:
        """Vectors of one batch of token id lists, padded to its longest row."""
        if not batch:
            return np.empty((0, self.dimension), np.float32)
        torch = self._torch
        input_ids, mask = pad_batch(batch, self._pad_id, self._left_pad)
        device = self._model.device
        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(device, non_blocking=True),
            "attention_mask": torch.from_numpy(mask).to(device, non_blocking=True),
        }
        if self._with_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            features = self._model[0](features)
            features["token_embeddings"] = features["token_embeddings"].float()
            for module in list(self._model)[1:]:
                features = module(features)
            vectors = torch.nn.functional.normalize(
                features["sentence_embedding"].float(), p=2, dim=1)
        result: npt.NDArray[np.float32] = vectors.cpu().numpy()
        return result


class RemoteEncoder:
    """A remote embedding API (``embed.provider: openai``) in the bulk engine's place of
    a model: the engine hands it whole texts (it batches, limits and retries them itself,
    :class:`~embedstream.stream.remote_embedding.OpenAIEmbedder`); token ids only count tokens.

    ``embed`` raises :class:`~embedstream.stream.errors.EmbedFailures` when some texts fail
    for good; the engine routes their records to the rebuild's failure list."""

    device = "remote"
    precision = "remote"
    batch_tokens = 0

    def __init__(self, embedder: OpenAIEmbedder) -> None:
        self.embedder = embedder
        self.model_name = embedder.model_name
        self.revision = embedder.revision
        self.dimension = embedder.dimension
        self.tokenizer: Any = embedder.tokenizer
        self.max_seq_length = embedder.max_seq_length
        self.calibration: dict[str, float] = {}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.embedder.token_ids(texts)

    def calibrate(self, sample: Sequence[list[int]]) -> str:
        return self.precision

    def embed(self, texts: Sequence[str],
              token_counts: Sequence[int] | None = None) -> npt.NDArray[np.float32]:
        return self.embedder.embed(texts, token_counts)

    def close(self) -> None:
        self.embedder.close()


# What the bulk engine and rebuild run on: a local model or a remote API.
AnyEncoder = BulkEncoder | RemoteEncoder
