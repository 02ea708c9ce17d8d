"""The model forward of a bulk rebuild: reduced precision where it pays, pooling on the device.

:class:`BulkEncoder` wraps a sentence-transformers model for large batches of
pre-tokenized texts. ``precision="auto"`` measures, on a calibration sample of
real texts, the fp32 forward against bf16 (fp16 on a GPU without bf16) and
keeps the reduced precision only when it is faster *and* every calibration
vector keeps cosine >= ``min_cosine`` with its fp32 reference. The measurement
takes seconds (one batch of real texts; a reduced-precision pass is stopped from
inside as soon as it has lost, as emulated bf16 on a CPU without it does), logs
its progress, and its decision is kept per machine and model
(:mod:`embedstream.bulk.precision`): the next encoder on the same machine, model
and torch takes it from there without measuring. The transformer
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

from embedstream.bulk.precision import (
    SAMPLE_TOKENS,
    Decision,
    PrecisionCache,
    TooSlow,
    cache_path,
    calibration_sample,
    decision_key,
    now_utc,
    time_limit,
    timed_pass,
)
from embedstream.stream.embedding import pack_batches, pad_batch, resolve_model_path, weights_digest
from embedstream.stream.errors import ConfigError
from embedstream.stream.remote_embedding import OpenAIEmbedder

__all__ = ["AnyEncoder", "BulkEncoder", "RemoteEncoder"]

log = logging.getLogger("embedstream.bulk")

# On 2 x86 cores (AMX) bf16 MiniLM over MS MARCO ran at 287/303/312/231 passages/s with
# 2k/3k/4k/8k padded tokens per batch (fp32 peaked near 2k); a GPU wants far more.
_CPU_BATCH_TOKENS = 4096
_GPU_BATCH_TOKENS = 65536
# Texts the rebuild offers for calibration (calibration_sample keeps fewer).
_CALIBRATION_TEXTS = 256
# The first reduced-precision pass also selects and compiles its kernels: it may take
# this many times the fp32 pass (plus half a second) before it counts as lost.
_WARM_UP_ALLOWANCE = 2.0
# A reduced precision is kept only when this much faster than fp32 (and close enough).
_FASTER = 0.9


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
        (see the module docstring), once per encoder, from the cache when this
        machine decided for this model before; returns the choice. Other settings
        keep theirs."""
        if self._requested != "auto" or self.calibration or not sample:
            return self.precision
        torch = self._torch
        on_gpu = self._model.device.type == "cuda"
        reduced = "bf16" if not on_gpu or torch.cuda.is_bf16_supported() else "fp16"
        cache = PrecisionCache(cache_path())
        key = decision_key(
            device=self.device, model_digest=self.revision, reduced=reduced,
            min_cosine=self._min_cosine, torch_version=str(torch.__version__),
            gpu_name=torch.cuda.get_device_name(self._model.device) if on_gpu else None)
        known = cache.get(key)
        if known is not None:
            if known.precision != "fp32":
                self._set_precision(known.precision)
            self.calibration = {**known.figures, "cached": 1.0}
            log.info("bulk precision %s: decided on this machine for this model on %s "
                     "(kept in %s; delete it to measure again)",
                     self.precision, known.decided_at, cache.path)
            return self.precision
        started = time.perf_counter()
        self.calibration = self._measure(
            calibration_sample(sample, tokens=min(self.batch_tokens, SAMPLE_TOKENS)), reduced)
        self.calibration["calibration_s"] = time.perf_counter() - started
        log.info("bulk precision %s, decided in %.1f s (kept in %s for the next run)",
                 self.precision, self.calibration["calibration_s"],
                 cache.path or "nowhere: the cache is off")
        cache.put(key, Decision(self.precision, self.calibration, now_utc()))
        return self.precision

    def _measure(self, sample: list[list[int]], reduced: str) -> dict[str, float]:
        """fp32 against ``reduced`` on ``sample``; leaves the encoder in the winner."""
        log.info("calibrating bulk precision on %s (once per machine and model): fp32 "
                 "against %s on %d texts, %d tokens", self.device, reduced, len(sample),
                 sum(map(len, sample)))
        # Casting in place rounds the weights: keep the fp32 ones to restore on a "no".
        transformer = self._model[0].auto_model
        fp32_weights = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        self.encode(sample[:1])  # kernel selection, off the clock
        reference, fp32_s = self._pass(sample)
        log.info("calibration: fp32 %.0f texts/s (%.1f s); trying %s", len(sample) / fp32_s,
                 fp32_s, reduced)
        figures = {"fp32_s": fp32_s}
        self._set_precision(reduced)
        started = time.perf_counter()
        try:
            # The first pass selects kernels too: it has lost only well past fp32's time.
            with time_limit(transformer, _WARM_UP_ALLOWANCE * fp32_s + 0.5):
                vectors, reduced_s = self._pass(sample)
            if reduced_s >= _FASTER * fp32_s:  # not faster yet: time it warm
                with time_limit(transformer, fp32_s):
                    vectors, reduced_s = self._pass(sample)
        except TooSlow:
            spent = time.perf_counter() - started
            figures[f"{reduced}_stopped_s"] = spent
            log.info("calibration: %s stopped after %.1f s, slower than fp32: fp32",
                     reduced, spent)
            self._restore_fp32(fp32_weights)
            return figures
        min_cos = float((reference * vectors).sum(axis=1).min())
        figures.update({f"{reduced}_s": reduced_s, "min_cos": min_cos})
        if min_cos >= self._min_cosine and reduced_s < _FASTER * fp32_s:
            log.info("calibration: %s %.2fx the speed of fp32, min cosine %.5f: %s",
                     reduced, fp32_s / reduced_s, min_cos, reduced)
            return figures
        log.info("calibration: %s gave %.2fx the speed of fp32, min cosine %.5f: fp32",
                 reduced, fp32_s / max(reduced_s, 1e-9), min_cos)
        self._restore_fp32(fp32_weights)
        return figures

    def _restore_fp32(self, weights: dict[str, Any]) -> None:
        self._set_precision("fp32")
        self._model[0].auto_model.load_state_dict(weights)

    def _pass(self, sample: list[list[int]]) -> tuple[npt.NDArray[np.float32], float]:
        return timed_pass(self.encode, sample, self.batch_tokens, self.dimension)

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
