"""Bulk embedding throughput: the rebuild's engine against stock ``encode``, same run.

Embeds every passage of a TSV file (``id<TAB>text``, default the MS MARCO sample)
twice: with the rebuild's engine (:class:`~embedstream.bulk.engine.BulkEngine` sized
by the default ``bulk.*`` settings, tokenizer threads, length-bucketed batches packed
to a token budget) on a :class:`~embedstream.stream.local_encoder.LocalEncoder` with
``--backend`` / ``--precision`` (default ``auto``: the backend chosen for this
machine), and with stock ``SentenceTransformer.encode(texts, batch_size=32)`` in fp32
as the reference.

1. Calibration, off the clock: where the choice is not fixed and no decision is kept
   from an earlier run (``--recalibrate`` ignores a kept one), the candidates are
   measured on a spread of the corpus's token ids, as the engine does on its first
   bucket (``ids[::len // 256]``). Its seconds are reported as ``calibration_s``
   (0 when nothing was measured) and are not part of ``passages_per_s``.
2. Warm-up of both sides on the first 512 passages.
3. Timing: stock and engine alternate, ``--repeat`` times each; the best of each
   counts, so the ratio is not skewed by which ran first on this shared machine.
4. Quality over the WHOLE corpus: the cosines between the engine's vectors and stock
   ``encode``'s (``min_cos``, ``p01_cos``, ``mean_cos``) and whether they pass the
   quality guard the choice was made under (``guard_passed``).

The last line printed is one JSON object: ``ratio``, ``passages_per_s``,
``stock_passages_per_s``, the cosines, ``backend``, ``precision``, ``variant``,
``cpu_flags``, ``calibration_s``, ``decision`` (the figures the backend was chosen on,
in this run or an earlier one: ``cached``), ``others_cores`` (CPU cores other processes used
while timing) and ``machine``. Progress goes to stderr.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bulk.py [--passages FILE] [--limit N]
        [--backend auto|torch|onnx|openvino] [--precision auto|fp32|bf16|fp16|int8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from embedstream.bulk.engine import BulkEngine, EmbeddedUnit
from embedstream.stream._calibration import CACHE_ENV
from embedstream.stream.backend_choice import QualityGuard
from embedstream.stream.config import BulkSettings
from embedstream.stream.local_encoder import LocalEncoder

from _common import (
    MODEL,
    PASSAGES,
    OtherLoad,
    encoder_info,
    log,
    machine,
    read_passages,
    stock_model,
)


def engine_pass(engine: BulkEngine[int, None], texts: list[str], dimension: int) -> np.ndarray:
    out = np.empty((len(texts), dimension), dtype=np.float32)

    def write(unit: EmbeddedUnit[int, None]) -> None:
        assert unit.flat is not None
        out[unit.records] = unit.flat  # one text per record

    engine.run(range(len(texts)), lambda i: (None, (texts[i],)), write)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=Path, default=PASSAGES)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="auto",
                        choices=("auto", "torch", "onnx", "openvino"))
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "fp32", "bf16", "fp16", "int8"))
    parser.add_argument("--batch-tokens", type=int, default=0)
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure the candidates even if a decision is kept")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.recalibrate:
        os.environ[CACHE_ENV] = "off"  # neither read nor written; exported models stay

    import torch

    texts = read_passages(args.passages, args.limit)
    guard = QualityGuard()
    started = time.perf_counter()
    encoder = LocalEncoder(MODEL, device=args.device, backend=args.backend,
                           precision=args.precision, batch_tokens=args.batch_tokens,
                           guard=guard)
    load_s = time.perf_counter() - started
    bulk = BulkSettings()
    engine: BulkEngine[int, None] = BulkEngine(
        [encoder], unit_records=bulk.write_documents, tokenizer_workers=bulk.tokenizer_workers,
        bucket_texts=bulk.bucket_texts, queue_depth=bulk.queue_depth)

    # Off the clock: the engine's own call (a spread of its first bucket) is then a no-op.
    started = time.perf_counter()
    if not encoder.decided:
        ids = encoder.tokenize(texts[:bulk.bucket_texts])
        encoder.calibrate(ids[::max(1, len(ids) // 256)])
    calibration_s = time.perf_counter() - started
    chosen = encoder_info(encoder)
    log(f"embedding with {chosen} (loaded in {load_s:.1f}s, calibration {calibration_s:.1f}s)")

    stock = stock_model(encoder.device)
    on_gpu = encoder.device.startswith("cuda")

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    warm = texts[: min(len(texts), 512)]
    engine_pass(engine, warm, encoder.dimension)
    stock.encode(warm, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    best_engine = best_stock = float("inf")
    vectors = reference = np.empty(0)
    padding = tokens = 0.0
    load = OtherLoad()
    for round_ in range(max(1, args.repeat)):
        sync()
        started = time.perf_counter()
        reference = stock.encode(texts, batch_size=32, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        sync()
        stock_s = time.perf_counter() - started
        started = time.perf_counter()
        vectors = engine_pass(engine, texts, encoder.dimension)
        sync()
        engine_s = time.perf_counter() - started
        log(f"round {round_ + 1}: stock {stock_s:.2f}s, engine {engine_s:.2f}s")
        best_stock, best_engine = min(best_stock, stock_s), min(best_engine, engine_s)
        padding, tokens = engine.stats.padding_fraction, engine.stats.tokens
    others = load.cores()
    cosines = (vectors * reference).sum(axis=1)
    result = {
        "ratio": round(best_stock / best_engine, 3),
        "min_cos": round(float(cosines.min()), 5),
        "p01_cos": round(float(np.percentile(cosines, 1)), 5),
        "mean_cos": round(float(cosines.mean()), 5),
        "guard_passed": guard.passes(cosines),
        "guard": guard.describe(),
        "backend": chosen["backend"],
        "precision": chosen["precision"],
        "variant": chosen["variant"],
        "cpu_flags": chosen["cpu_flags"],
        "passages": len(texts),
        "passages_per_s": round(len(texts) / best_engine, 1),
        "stock_passages_per_s": round(len(texts) / best_stock, 1),
        "tokens_per_s": round(tokens / best_engine, 1),
        "padding_fraction": round(padding, 4),
        "calibration_s": round(calibration_s, 1),
        "load_s": round(load_s, 1),
        "encoder": chosen,
        # A candidate that lost in its warm-up has an infinite cost: null, not Infinity.
        "decision": {k: round(v, 4) if np.isfinite(v) else None
                     for k, v in encoder.calibration.items()},
        "batch_tokens": encoder.batch_tokens,
        "repeat": max(1, args.repeat),
        "others_cores": others,
        "machine": machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
