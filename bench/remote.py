"""Remote embedding (``embed.provider: openai``) throughput, with and without limits.

Starts the OpenAI-compatible test server (:mod:`embedstream.stream.app.embedding_server`,
the local all-MiniLM-L6-v2 behind ``POST /v1/embeddings``) on a loopback port and
embeds MS MARCO passages through :class:`~embedstream.stream.remote_embedding.OpenAIEmbedder`:

1. ``stock``: ``SentenceTransformer.encode`` in process, the reference (same run);
2. ``open``: through the API with no limits (HTTP and JSON overhead on top of the model);
3. ``open_small_requests``: the same with the smaller requests of the next passes;
4. ``client_limited``: with ``embed.requests_per_minute`` set; the achieved request
   rate is reported against it;
5. ``storm``: the server allows ``--server-rps`` requests a second and answers
   429 with ``Retry-After`` above it, while the client would send faster; the
   429s, retries and achieved rate are reported.

Every pass checks its vectors against the stock ones (``min_cos``). The last line
printed is a JSON object with the figures and ``ratio`` (open / stock passages/s).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/remote.py [--limit 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from embedstream.stream.app.embedding_server import EmbeddingServer
from embedstream.stream.config import EmbedSettings
from embedstream.stream.metrics import Metrics
from embedstream.stream.remote_embedding import OpenAIEmbedder

from _common import MODEL, PASSAGES, machine, read_passages, stock_model


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def remote_pass(server: EmbeddingServer, texts: list[str], reference: np.ndarray,
                **settings: Any) -> dict[str, float]:
    metrics = Metrics()
    embedder = OpenAIEmbedder(EmbedSettings(provider="openai", model=MODEL, api_base=server.url,
                                            **settings), metrics=metrics)
    try:
        server.log.clear()
        started = time.perf_counter()
        vectors = embedder.embed(texts)
        elapsed = time.perf_counter() - started
    finally:
        embedder.close()
    served = sorted(entry.at for entry in server.log if entry.status == 200)
    span = served[-1] - served[0] if len(served) > 1 else elapsed
    return {
        "passages_per_s": round(len(texts) / elapsed, 1),
        "requests": len(served),
        "requests_per_s": round((len(served) - 1) / span, 2) if len(served) > 1 else 0.0,
        "answered_429": server.count(429),
        "retries": int(counter(metrics, "embedstream_embed_retries_total")),
        "throttled_s": round(sum(counter(metrics, "embedstream_embed_throttled_seconds_total",
                                         cause=c) for c in ("rate_limit", "retry_after",
                                                            "backoff")), 1),
        "min_cos": round(float(np.sum(vectors * reference, axis=1).min()), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=Path, default=PASSAGES)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--inputs", type=int, default=32, help="embed.request_max_inputs")
    parser.add_argument("--concurrency", type=int, default=4)
    # The limited passes use smaller requests and fewer texts, so that the limits
    # (not the model on this machine's 2 cores) set the pace and a pass stays short.
    parser.add_argument("--limited-texts", type=int, default=400)
    parser.add_argument("--limited-inputs", type=int, default=8)
    parser.add_argument("--client-rpm", type=float, default=120.0)
    parser.add_argument("--server-rps", type=float, default=2.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    texts = read_passages(args.passages, args.limit)

    stock = stock_model()
    stock.encode(texts[:64], batch_size=32)  # warm-up
    started = time.perf_counter()
    reference = stock.encode(texts, batch_size=32, normalize_embeddings=True)
    stock_rate = len(texts) / (time.perf_counter() - started)

    common = {"request_max_inputs": args.inputs, "max_concurrency": args.concurrency}
    with EmbeddingServer.with_model(MODEL) as server:
        remote_pass(server, texts[:64], reference[:64], **common)  # warm-up
        open_pass = remote_pass(server, texts, reference, **common)
        few, few_reference = texts[:args.limited_texts], reference[:args.limited_texts]
        small = {**common, "request_max_inputs": args.limited_inputs}
        unlimited_small = remote_pass(server, few, few_reference, **small)
        limited = remote_pass(server, few, few_reference, requests_per_minute=args.client_rpm,
                              **small)
        server.rate_limit(args.server_rps)
        storm = remote_pass(server, few, few_reference, **small)
    print(json.dumps({
        "passages": len(texts), "stock_passages_per_s": round(stock_rate, 1),
        "open": open_pass, "ratio": round(open_pass["passages_per_s"] / stock_rate, 3),
        "open_small_requests": unlimited_small,
        "client_limited": {**limited, "limit_requests_per_s": round(args.client_rpm / 60, 2)},
        "storm": {**storm, "server_limit_requests_per_s": args.server_rps},
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()
