"""The local model as an ONNX graph (for ONNX Runtime and OpenVINO), made here, never downloaded.

:func:`exported` writes the sentence-transformers module stack (transformer,
pooling, the model's other modules) as one graph with inputs ``input_ids`` and
``attention_mask`` (token type ids, where the model takes them, are zeros inside
the graph: one segment per text) and output ``sentence_embedding``; :func:`int8`
derives a dynamically quantized copy (int8 weights per output channel,
activations quantized per batch). Both are kept under the cache directory, keyed
by the weights' digest and the torch/onnxruntime versions that made them, and
written atomically (a crash leaves no half file to be loaded next time).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embedstream.stream.errors import ConfigError

__all__ = ["exported", "int8"]

log = logging.getLogger("embedstream.embed")

# The feed-forward output projection of each layer (BERT naming: ".../layer.N/output/dense");
# the attention output projection (".../attention/output/dense") is not one of them.
_FFN_OUTPUT = re.compile(r"layer\.\d+/output/dense/MatMul$")


@contextlib.contextmanager
def _atomic(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(name)
        os.replace(name, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def exported(model: Any, directory: Path, with_types: bool) -> Path:
    """The fp32 ONNX graph of ``model`` (a SentenceTransformer on the CPU) in
    ``directory``, exported on first use (about 2 s for MiniLM)."""
    import torch

    target = directory / "model.onnx"
    if target.is_file():
        return target

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stack = torch.nn.ModuleList(list(model))

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            features = {"input_ids": input_ids, "attention_mask": attention_mask}
            if with_types:
                features["token_type_ids"] = torch.zeros_like(input_ids)
            for module in self.stack:
                features = module(features)
            return features["sentence_embedding"]

    started = time.perf_counter()
    example = torch.ones((2, 16), dtype=torch.long)
    with _atomic(target) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about Python values in the graph
        try:
            # The TorchScript exporter: the dynamo one needs onnxscript and was slower to
            # export this graph with dynamic batch and length.
            torch.onnx.export(
                Stack().eval(), (example, example), str(scratch),
                input_names=["input_ids", "attention_mask"],
                output_names=["sentence_embedding"],
                dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                              "attention_mask": {0: "batch", 1: "tokens"},
                              "sentence_embedding": {0: "batch"}},
                opset_version=17, dynamo=False)
        except Exception as error:  # an architecture the exporter cannot trace
            raise ConfigError(f"embed.backend: cannot export the model to ONNX "
                              f"({type(error).__name__}: {error}); use embed.backend: "
                              "torch") from error
    log.info("exported the model to ONNX in %.1f s: %s", time.perf_counter() - started, target)
    return target


def int8(source: Path, variant: str) -> Path:
    """A dynamically quantized copy of ``source`` beside it: ``variant`` ``all``
    quantizes every matrix product with weights; ``ffn-fp32`` keeps the feed-forward
    output projections fp32. ConfigError when ``ffn-fp32`` finds none to keep."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = source.with_name(f"model.int8-{variant}.onnx")
    if target.is_file():
        return target
    exclude: list[str] = []
    if variant == "ffn-fp32":
        import onnx

        graph = onnx.load(str(source), load_external_data=False).graph
        exclude = [n.name for n in graph.node if n.op_type == "MatMul"
                   and _FFN_OUTPUT.search(n.name)]
        if not exclude:
            raise ConfigError("int8 ffn-fp32: no feed-forward output projection in this graph")
    started = time.perf_counter()
    with _atomic(target) as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().disabled, before = True, logging.getLogger().disabled
        try:  # quantize_dynamic logs "please run pre-processing" on the root logger
            quantize_dynamic(str(source), str(scratch), weight_type=QuantType.QInt8,
                             per_channel=True, nodes_to_exclude=exclude)
        finally:
            logging.getLogger().disabled = before
    log.info("quantized the ONNX model to int8 (%s) in %.1f s", variant,
             time.perf_counter() - started)
    return target
