"""Bulk embedding throughput: embedstream's engine against stock ``encode``, same run.

Embeds every passage of a TSV file (``id<TAB>text``, default the MS MARCO
sample) twice: with the bulk engine (tokenizer threads, length-bucketed
batches packed to a token budget, bf16 where calibration allows, pooling on
the device), and with stock ``SentenceTransformer.encode(texts,
batch_size=32)`` in fp32 as the reference. Both get a warm-up first, and each
is timed over the best of ``--repeat`` runs, so the ratio is not skewed by
which ran first on this shared machine. The last line printed is a JSON object:
``passages_per_s``, ``tokens_per_s``, ``stock_passages_per_s``, ``ratio``,
``padding_fraction``, ``min_cos`` (minimum cosine between the two sets of
vectors) and the precision and device used.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bulk.py [--passages FILE] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from embedstream.bulk.encoder import BulkEncoder
from embedstream.bulk.engine import BulkEngine, EmbeddedUnit

from _common import MODEL, PASSAGES, machine, read_passages, stock_model


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
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-tokens", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    import torch

    texts = read_passages(args.passages, args.limit)
    encoder = BulkEncoder(MODEL, device=args.device, precision=args.precision,
                          batch_tokens=args.batch_tokens)
    engine: BulkEngine[int, None] = BulkEngine([encoder], unit_records=256,
                                               tokenizer_workers=2, bucket_texts=4096)
    stock = stock_model(encoder.device)
    on_gpu = encoder.device.startswith("cuda")

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    warm = texts[: min(len(texts), 512)]
    engine_pass(engine, warm, encoder.dimension)  # calibrates the precision, warms kernels
    stock.encode(warm, batch_size=32, normalize_embeddings=True, show_progress_bar=False)

    best_engine = best_stock = float("inf")
    vectors = reference = np.empty(0)
    padding = tokens = 0.0
    for _ in range(max(1, args.repeat)):
        sync()
        started = time.perf_counter()
        reference = stock.encode(texts, batch_size=32, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        sync()
        best_stock = min(best_stock, time.perf_counter() - started)
        started = time.perf_counter()
        vectors = engine_pass(engine, texts, encoder.dimension)
        sync()
        best_engine = min(best_engine, time.perf_counter() - started)
        padding, tokens = engine.stats.padding_fraction, engine.stats.tokens
    cosines = (vectors * reference).sum(axis=1)
    result = {
        "passages": len(texts),
        "passages_per_s": round(len(texts) / best_engine, 1),
        "tokens_per_s": round(tokens / best_engine, 1),
        "stock_passages_per_s": round(len(texts) / best_stock, 1),
        "ratio": round(best_stock / best_engine, 3),
        "padding_fraction": round(padding, 4),
        "min_cos": round(float(cosines.min()), 5),
        "precision": encoder.precision,
        "device": encoder.device,
        "batch_tokens": encoder.batch_tokens,
        "machine": machine(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
