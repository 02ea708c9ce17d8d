"""The local model, one encoder for the stream, the rebuild and search.

:class:`LocalEncoder` loads a sentence-transformers model and runs its forward
pass on the backend and precision chosen for this machine
(:mod:`embedstream.stream.backend_choice`): torch, ONNX Runtime or OpenVINO, in
fp32, bf16, fp16 or int8. The stream's micro-batches and the rebuild's large
batches go through the same code: texts tokenised once, sorted by length and cut
into passes of at most ``batch_tokens`` padded tokens where passes and padding cost
least (:meth:`pack`): a backlog drains at rebuild speed, a small batch pads little.

With ``backend``/``precision`` ``auto`` the choice is measured once per machine,
model and library versions, on real texts: the sample :meth:`calibrate` is given
(the rebuild passes a spread of its corpus), or, in the stream, the first
``calibration_texts`` texts it embeds (embedded on torch fp32 until then). A
decision kept from an earlier start is taken at construction, with no measuring.

Prompts: :meth:`embed` puts the document prompt in front of every text and
:meth:`embed_queries` the query prompt, from ``embed.prompts`` or else the model's
own sentence-transformers configuration (:func:`model_prompts`), the way
``SentenceTransformer.encode(texts, prompt=...)`` does: joined to the text before
tokenizing, and left out of pooling where the model's Pooling says
``include_prompt: false`` (such a model then runs on torch only: the exported
graphs pool every token).

Guaranteed: float32 rows of unit L2 norm in input order; texts (prompt included)
truncated to ``max_seq_length`` tokens exactly as ``SentenceTransformer.encode`` truncates;
the chosen backend passed the quality guard on its calibration sample. Not
guaranteed: bit-identical vectors across backends, precisions or batch
compositions. Not thread-safe: one caller at a time (:meth:`twin` gives another
thread its own).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.stream._calibration import (
    SAMPLE_TOKENS,
    Decision,
    PrecisionCache,
    cache_dir,
    cache_path,
    calibration_sample,
    decision_key,
    now_utc,
)
from embedstream.stream._onnx_export import exported, int8
from embedstream.stream.backend_choice import (
    Measured,
    QualityGuard,
    candidates,
    measure,
    model_dir_for,
    padded,
)
from embedstream.stream.backends import Candidate, OnnxRunner, OpenVinoRunner, Runner, TorchRunner
from embedstream.stream.config import EmbedSettings, PromptSettings
from embedstream.stream.embedding import (
    pack_batches,
    padded_size,
    resolve_model_path,
    weights_digest,
)
from embedstream.stream.errors import ConfigError

__all__ = ["LocalEncoder", "model_prompts"]

log = logging.getLogger("embedstream.embed")

# Padded tokens per forward pass. On 2 x86 cores (AMX) bf16 MiniLM over MS MARCO ran at
# 287/303/312/231 passages/s with 2k/3k/4k/8k (larger spills out of cache); a GPU wants more.
_CPU_BATCH_TOKENS = 4096
_GPU_BATCH_TOKENS = 65536


class LocalEncoder:
    """One model on one device, run the way measured fastest here (module docstring).
    ``on_choice`` gets the encoder once its backend is settled (fixed, kept or measured)."""

    def __init__(self, model: str, *, device: str = "auto", backend: str = "torch",
                 precision: str = "fp32", batch_tokens: int = 0,
                 guard: QualityGuard | None = None, cache: Path | None = None,
                 calibration_texts: int = 64,
                 on_choice: Callable[[LocalEncoder], None] | None = None,
                 prompts: PromptSettings | None = None) -> None:
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
        self._on_gpu = self._model.device.type == "cuda"
        self.batch_tokens = batch_tokens or (
            _GPU_BATCH_TOKENS if self._on_gpu else _CPU_BATCH_TOKENS)
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
        self.document_prompt, self.query_prompt = model_prompts(
            self._model, prompts or PromptSettings())
        # Where the model's Pooling leaves the prompt out (include_prompt: false, e.g. INSTRUCTOR),
        # the prompt's leading positions, [CLS] included, as sentence-transformers counts them.
        pools_prompt = all(getattr(m, "include_prompt", True) for m in self._model)
        self._skip = {query: 0 if pools_prompt or not prompt else _prompt_length(tokenizer, prompt)
                      for query, prompt in ((False, self.document_prompt),
                                            (True, self.query_prompt))}
        self._with_types = "token_type_ids" in tokenizer.model_input_names
        self._pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._left_pad = tokenizer.padding_side == "left"
        self._guard = guard or QualityGuard()
        self._cache_dir = cache_dir(cache)
        self._cache = PrecisionCache(cache_path(cache))
        self._calibration_texts = calibration_texts
        self._on_choice = on_choice
        self._asked = (backend, precision)
        self._choices = candidates(
            backend=backend, precision=precision, on_gpu=self._on_gpu,
            # Native bf16 on this device (Ampere on, or ROCm): is_bf16_supported() says
            # yes to emulated bf16 too (T4, V100), and asks the current device only.
            gpu_bf16=self._on_gpu and (bool(torch.version.hip) or torch.cuda.get_device_capability(
                self._model.device)[0] >= 8))
        if any(self._skip.values()):
            # The exported graphs pool every position: only torch can leave the prompt out.
            self._choices = [c for c in self._choices if c.backend == "torch"]
            if not self._choices:
                raise ConfigError(f"embed.backend: {backend}/{precision} cannot leave the "
                                  f"prompt out of pooling as {model!r} asks (include_prompt: "
                                  "false); only torch can: embed.backend torch or auto, with "
                                  "precision fp32, bf16, fp16 or auto")
        self._reference = TorchRunner(self._model, "fp32", self._with_types)
        self.runner: Runner = self._reference
        self.calibration: dict[str, float] = {}
        self.decided = False
        self._pending: list[list[int]] = []
        self._parent: LocalEncoder | None = None  # a twin follows its parent's choice
        # Called between candidates while measuring (the stream sets its liveness beat).
        self.heartbeat: Callable[[], None] | None = None
        self.last_tokens = 0
        self.last_padded_tokens = 0
        if len(self._choices) == 1:
            self._settle(self._build(self._choices[0]), {})
        elif ((known := self._cache.get(self._key())) is not None
              # A decision kept from before the prompt left pooling (torch only now).
              and (known.backend == "torch" or not any(self._skip.values()))):
            choice = Candidate(known.backend, known.precision, known.variant)
            try:
                kept = self._build(choice)
            except Exception as error:
                # E.g. onnx (not in the key) removed since: measure, not fail every start.
                log.warning("embed backend %s, decided on this machine on %s, cannot be "
                            "built here now (%s: %s): measuring again", choice.label,
                            known.decided_at, type(error).__name__, error)
            else:
                log.info("embed backend %s: decided on this machine for this model on %s "
                         "(kept in %s; delete it to measure again)", choice.label,
                         known.decided_at, self._cache.path)
                self._settle(kept, {**known.figures, "cached": 1.0})

    @classmethod
    def from_settings(cls, embed: EmbedSettings, *, device: str | None = None,
                      batch_tokens: int = 0,
                      on_choice: Callable[[LocalEncoder], None] | None = None) -> LocalEncoder:
        """The encoder ``embed`` describes (``device`` overrides ``embed.device``)."""
        guard = embed.quality_guard
        return cls(embed.model, device=device or embed.device, backend=embed.backend,
                   precision=embed.precision, batch_tokens=batch_tokens,
                   guard=QualityGuard(guard.mean_cosine, guard.p01_cosine),
                   cache=embed.cache_dir, calibration_texts=embed.calibration_texts,
                   on_choice=on_choice, prompts=embed.prompts)

    # -- what the encoder is -------------------------------------------------------

    @cached_property
    def revision(self) -> str:
        """Digest of the weight, config and tokenizer files (about 0.1 s for 90 MB)."""
        return weights_digest(self._path)

    @property
    def backend(self) -> str:
        return self.runner.candidate.backend

    @property
    def precision(self) -> str:
        return self.runner.candidate.precision

    @property
    def variant(self) -> str:
        return self.runner.candidate.variant

    # -- tokenizing (thread-safe: HF fast tokenizers release the GIL) --------------

    def tokenize(self, texts: Sequence[str], *, query: bool = False) -> list[list[int]]:
        """Token ids of the document prompt (``query``: the query prompt) and each text,
        with special tokens, truncated to ``max_seq_length``."""
        if not texts:
            return []
        prompt = self.query_prompt if query else self.document_prompt
        ids: list[list[int]] = self.tokenizer(
            [prompt + text for text in texts] if prompt else list(texts),
            truncation=True, max_length=self.max_seq_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False, verbose=False,
        )["input_ids"]
        return ids

    # -- choosing ------------------------------------------------------------------

    def calibrate(self, sample: Sequence[list[int]]) -> str:
        """Measure the candidates on ``sample`` (tokenized real texts) and keep the
        winner, once per encoder (see the module docstring); returns the precision."""
        if self.decided or not sample:
            return self.precision
        started = time.perf_counter()
        chosen = calibration_sample(sample, tokens=min(self.batch_tokens, SAMPLE_TOKENS))
        log.info("calibrating the embed backend on %s (once per machine and model): %s "
                 "on %d texts, %d tokens", self.device,
                 ", ".join(c.label for c in self._choices), len(chosen), sum(map(len, chosen)))
        results = measure(self._build, self._choices, chosen, budget=self.batch_tokens,
                          pad_id=self._pad_id, left=self._left_pad, dimension=self.dimension,
                          guard=self._guard, reference=self._reference,
                          progress=self.heartbeat)
        allowed = [r for r in results if r.passed and r.candidate in self._choices]
        if not allowed:  # the reference is not among those asked for (e.g. int8 only)
            raise ConfigError(
                f"embed: no candidate of {', '.join(c.label for c in self._choices)} passed "
                f"the quality guard ({self._guard.describe()}): "
                + "; ".join(f"{r.candidate.label}: {r.why}" for r in results[1:]))
        best = min(allowed, key=lambda r: r.score)
        figures = _figures(results, best)
        figures["calibration_s"] = time.perf_counter() - started
        log.info("embed backend %s (%.2fx the speed of torch fp32), decided in %.1f s "
                 "(kept in %s for the next start)", best.candidate.label,
                 figures["speedup"], figures["calibration_s"],
                 self._cache.path or "nowhere: the cache is off")
        self._cache.put(self._key(), Decision(
            best.candidate.precision, figures, now_utc(), best.candidate.backend,
            best.candidate.variant))
        assert best.runner is not None
        self._settle(best.runner, figures)
        return self.precision

    def _key(self) -> dict[str, str]:
        torch = self._torch
        return decision_key(
            device=self.device, model_digest=self.revision, asked="/".join(self._asked),
            guard=self._guard.describe(),
            gpu_name=torch.cuda.get_device_name(self._model.device) if self._on_gpu else None)

    def _build(self, candidate: Candidate) -> Runner:
        if candidate.backend == "torch":
            if candidate.precision == "fp32":
                return self._reference
            return TorchRunner(self._model, candidate.precision, self._with_types)
        graph = exported(self._model, model_dir_for(self._cache_dir, self.revision),
                         self._with_types)
        if candidate.backend == "onnx":
            if candidate.precision == "int8":
                graph = int8(graph, candidate.variant or "all")
            return OnnxRunner(graph, candidate)
        return OpenVinoRunner(graph, candidate)

    def _settle(self, runner: Runner, figures: dict[str, float]) -> None:
        self.runner, self.calibration, self.decided = runner, figures, True
        self._pending = []
        if self._on_choice is not None:
            self._on_choice(self)

    # -- forward -------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors of document texts in input order, with the document prompt. While
        the backend is undecided, the texts are kept until ``calibration_texts`` have
        come, then measured on."""
        return self._embed(texts, query=False)

    def embed_queries(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Vectors of search queries in input order, with the query prompt."""
        return self._embed(texts, query=True)

    def _embed(self, texts: Sequence[str], *, query: bool) -> npt.NDArray[np.float32]:
        ids = self.tokenize(texts, query=query)
        self.last_tokens = self.last_padded_tokens = 0
        if not self.decided and ids:
            self._pending += ids
            if len(self._pending) >= self._calibration_texts:
                # Taken out first: if measuring fails (halved, retried), retries do not.
                sample, self._pending = self._pending, []
                self.calibrate(sample)
        out = np.empty((len(ids), self.dimension), np.float32)
        lengths = [len(seq) for seq in ids]
        for batch in self.pack(lengths):
            out[batch] = self.encode([ids[i] for i in batch], query=query)
            self.last_tokens += sum(lengths[i] for i in batch)
            self.last_padded_tokens += self.padded_tokens([lengths[i] for i in batch])
        return out

    def pack(self, lengths: Sequence[int]) -> list[list[int]]:
        """Texts of these token counts as forward passes (indexes), for the stream and
        the rebuild alike: cut by the runner's costs (:func:`pack_batches`)."""
        return pack_batches(lengths, self.batch_tokens, multiple=self.runner.length_multiple,
                            call_tokens=self.runner.call_tokens)

    def padded_tokens(self, lengths: Sequence[int]) -> int:
        """The positions one pass of texts of ``lengths`` takes, as this runner pads."""
        return padded_size(lengths, self.runner.length_multiple)

    def encode(self, batch: Sequence[list[int]], *,
               query: bool = False) -> npt.NDArray[np.float32]:
        """Vectors of one batch of token id lists (:meth:`tokenize` of documents, or
        of queries with ``query``), padded to its longest row."""
        if not batch:
            return np.empty((0, self.dimension), np.float32)
        parent = self._parent
        if parent is not None and parent.runner.candidate != self.runner.candidate:
            self.runner = parent.runner.twin()  # the parent has calibrated since
        inputs = padded(batch, self._pad_id, self._left_pad, self.runner.length_multiple)
        if skip := self._skip[query]:
            runner = self.runner
            assert isinstance(runner, TorchRunner)  # the only candidates then
            return runner.run(*inputs, prompt_length=skip)
        return self.runner.run(*inputs)

    def twin(self) -> LocalEncoder:
        """An encoder for another thread: the same weights and backend, with a
        tokenizer and runner state of its own (a fast tokenizer sets truncation per
        call, and an OpenVINO request serves one caller at a time)."""
        twin = copy.copy(self)
        twin.tokenizer = copy.deepcopy(self.tokenizer)
        twin.runner = self.runner.twin()
        twin._on_choice = None
        twin._parent = self
        twin.decided = True  # it never measures: it follows its parent's choice
        return twin

    def close(self) -> None:
        """Nothing to release (the model goes with the object); as remote embedders do."""


def model_prompts(model: Any, asked: PromptSettings) -> tuple[str, str]:
    """(document prompt, query prompt): ``asked``'s where set, else the model's own.

    The model's own, as ``SentenceTransformer.encode_document``/``encode_query`` pick
    them: its ``document``, ``passage`` or ``corpus`` prompt (the first there is) for
    documents, its ``query`` prompt for queries; else the prompt its
    ``default_prompt_name`` names (which ``encode`` applies to every text); else "".
    An empty prompt counts as none: sentence-transformers 6 fills ``query`` and
    ``document`` with "" for every model, so "" there says nothing about ``passage``."""
    prompts = {name: text for name, text in (getattr(model, "prompts", None) or {}).items()
               if text}
    default = prompts.get(getattr(model, "default_prompt_name", None) or "", "")
    document = next((prompts[n] for n in ("document", "passage", "corpus") if n in prompts),
                    default)
    query = prompts.get("query", default)
    return (document if asked.document is None else asked.document,
            query if asked.query is None else asked.query)


def _prompt_length(tokenizer: Any, prompt: str) -> int:
    """Leading positions of ``prompt + text`` that are the prompt's, as
    sentence-transformers counts them for pooling: the prompt tokenized alone, special
    tokens included, less a trailing special token ([SEP], </s>)."""
    ids: list[int] = tokenizer(prompt, verbose=False)["input_ids"]
    length = len(ids)
    if ids and ids[-1] in set(getattr(tokenizer, "all_special_ids", ())):
        length -= 1
    return length


def _figures(results: Sequence[Measured], best: Measured) -> dict[str, float]:
    """The decision's figures: the winner's, its speed-up, every candidate's cost."""
    reference = results[0]
    figures = dict(best.figures)
    figures["speedup"] = reference.score / best.score
    for result in results:
        label = result.candidate.label.replace("/", "_")
        if result.score < float("inf"):  # one stopped or unable to run has no cost (and
            figures[f"{label}_ms"] = result.score  # Infinity is not JSON, in the cache)
        if np.isfinite(result.figures.get("mean_cos", np.nan)):  # NaN is not JSON either
            figures[f"{label}_mean_cos"] = result.figures["mean_cos"]
    return figures
