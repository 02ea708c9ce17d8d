"""Where the local model's forward pass runs: torch, ONNX Runtime or OpenVINO.

A :class:`Runner` turns one padded batch of token ids into unit vectors. Every
runner computes the same function, the sentence-transformers module stack
(transformer, the model's own pooling, Normalize): torch runs those modules; the
others run an ONNX graph exported from them (:mod:`embedstream.stream._onnx_export`),
so pooling and normalisation are part of the graph and only finished vectors leave it.

Which runner a machine gets is decided by measuring
(:mod:`embedstream.stream.backend_choice`); this module only builds them.

Guaranteed: float32 rows of unit L2 norm, one per input row. ONNX Runtime and
OpenVINO are optional (``pip install 'embedstream[onnx]'`` / ``[openvino]``):
asking for one that is not installed is a :class:`ConfigError` naming the extra.
Not guaranteed: bit-identical vectors across runners (see the quality guard).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from embedstream.stream.errors import ConfigError

__all__ = ["BACKENDS", "PRECISIONS", "Candidate", "OnnxRunner", "OpenVinoRunner", "Runner",
           "TorchRunner", "available", "cpu_threads", "require"]

BACKENDS = ("torch", "onnx", "openvino")
# What each backend can run. OpenVINO's bf16/fp16 are its inference precision hint
# (it keeps fp32 where the CPU has no such instructions: the measurement tells).
PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnx": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "fp16"),
}
_MODULES = {"onnx": "onnxruntime", "openvino": "openvino"}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to run the model. ``variant`` names an int8 recipe: ``all`` (every
    matrix product int8) or ``ffn-fp32`` (the feed-forward output projections, the
    layers most sensitive to int8, kept fp32)."""

    backend: str
    precision: str
    variant: str = ""

    @property
    def label(self) -> str:
        return "/".join(p for p in (self.backend, self.precision, self.variant) if p)


def available(backend: str) -> bool:
    """Whether ``backend``'s library is installed (torch always is)."""
    module = _MODULES.get(backend)
    return module is None or importlib.util.find_spec(module) is not None


def require(backend: str) -> None:
    """ConfigError naming the extra when ``backend`` is not installed."""
    if not available(backend):
        raise ConfigError(
            f"embed.backend: {backend} needs {_MODULES[backend]}, which is not installed: "
            f"pip install 'embedstream[{backend}]' (or set embed.backend: auto or torch)")


def cpu_threads() -> int:
    """The cores this process may use (a container's CPU set, not the host's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class Runner(Protocol):
    """One padded batch in, unit vectors out."""

    candidate: Candidate
    # Sequence lengths are padded up to a multiple of this: a backend that compiles
    # kernels per shape (OpenVINO) reuses them across nearby lengths.
    length_multiple: int
    # What one forward pass costs beyond its tokens, in padded tokens (measured on a
    # 2-core CPU): how a stream's few texts are split into passes (pack_batches).
    call_tokens: int

    def run(self, input_ids: npt.NDArray[np.int64],
            attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]: ...

    def twin(self) -> Runner:
        """A runner for another thread, sharing the weights."""
        ...


def _unit(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: npt.NDArray[np.float32] = (vectors / np.maximum(norms, 1e-12)).astype(
        np.float32, copy=False)
    return result


class TorchRunner:
    """The sentence-transformers modules under ``torch.inference_mode``. Reduced
    precision applies to the transformer only (on a private copy of it, so the
    fp32 model stays intact); its token states are cast to fp32 before pooling."""

    length_multiple = 1
    call_tokens = 96

    def __init__(self, model: Any, precision: str = "fp32", with_types: bool = False) -> None:
        import torch

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}.get(precision)
        if dtype is None:
            raise ConfigError(f"embed.precision: torch cannot run {precision!r}")
        self._torch = torch
        self.candidate = Candidate("torch", precision)
        self._modules = list(model)
        self._device = model.device
        self._transformer = self._modules[0]
        if precision != "fp32":
            self._transformer = copy.deepcopy(self._transformer)
            self._transformer.auto_model.to(dtype)
        self._with_types = with_types

    @property
    def transformer(self) -> Any:
        """The torch module that runs the layers (for time limits on a first pass)."""
        return self._transformer

    def run(self, input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64],
            prompt_length: int = 0) -> npt.NDArray[np.float32]:
        """``prompt_length``: leading positions that are a prompt's, for a Pooling
        that leaves prompts out (``include_prompt: false``; others ignore it)."""
        torch = self._torch
        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids).to(self._device, non_blocking=True),
            "attention_mask": torch.from_numpy(attention_mask).to(self._device,
                                                                  non_blocking=True),
        }
        if prompt_length:
            features["prompt_length"] = prompt_length  # read by sentence-transformers' Pooling
        if self._with_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            features = self._transformer(features)
            features["token_embeddings"] = features["token_embeddings"].float()
            for module in self._modules[1:]:
                features = module(features)
            vectors = torch.nn.functional.normalize(
                features["sentence_embedding"].float(), p=2, dim=1)
        result: npt.NDArray[np.float32] = vectors.cpu().numpy()
        return result

    def twin(self) -> TorchRunner:
        return self  # inference_mode forwards change nothing: threads may share it


class OnnxRunner:
    """An ONNX Runtime CPU session over the exported graph (fp32, or int8 weights
    with activations quantized per batch: dynamic quantization)."""

    length_multiple = 1
    call_tokens = 96

    def __init__(self, path: Path, candidate: Candidate, threads: int | None = None) -> None:
        require("onnx")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers are noise
        self.candidate = candidate
        self._session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"])

    def run(self, input_ids: npt.NDArray[np.int64],
            attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        (vectors,) = self._session.run(None, {"input_ids": input_ids,
                                              "attention_mask": attention_mask})
        return _unit(np.asarray(vectors, dtype=np.float32))

    def twin(self) -> OnnxRunner:
        return self  # InferenceSession.run is thread-safe


class OpenVinoRunner:
    """An OpenVINO CPU model compiled from the exported graph, latency-tuned
    (synchronous calls), with ``precision`` as its inference precision hint."""

    # Measured: a quiet stream's one- and two-text batches cost 9.0 and 7.8 ms per
    # text at exact lengths, 5.1 and 4.2 ms with lengths padded to 16 (MiniLM, bf16,
    # 2 AMX cores): nearby lengths reuse the compiled kernels.
    length_multiple = 16
    call_tokens = 96

    def __init__(self, path: Path, candidate: Candidate, threads: int | None = None,
                 compiled: Any = None) -> None:
        require("openvino")
        import openvino

        self.candidate = candidate
        if compiled is None:
            hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}.get(candidate.precision)
            if hint is None:
                raise ConfigError(f"embed.precision: openvino cannot run "
                                  f"{candidate.precision!r}")
            compiled = openvino.Core().compile_model(str(path), "CPU", {
                "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint,
                "INFERENCE_NUM_THREADS": threads or cpu_threads()})
        self._path = path
        self._compiled = compiled
        self._output = compiled.output(0)
        self._request = compiled.create_infer_request()

    @property
    def effective_precision(self) -> str:
        """What OpenVINO runs in after its hint (f32 where the CPU lacks bf16/f16)."""
        return str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))

    def run(self, input_ids: npt.NDArray[np.int64],
            attention_mask: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        # share_inputs: no copy of the arrays into OpenVINO's tensors (~15% of a
        # one-text call measured); they outlive the synchronous call.
        result = self._request.infer({"input_ids": input_ids, "attention_mask": attention_mask},
                                     share_inputs=True)
        return _unit(np.array(result[self._output], dtype=np.float32))

    def twin(self) -> OpenVinoRunner:
        # An infer request serves one caller at a time; the compiled model is shared.
        return OpenVinoRunner(self._path, self.candidate, compiled=self._compiled)
