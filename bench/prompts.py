"""Prompts: our vectors against ``SentenceTransformer.encode(texts, prompt=...)``.

The bundled all-MiniLM-L6-v2 with ``embed.prompts: {document: "passage: ", query:
"query: "}`` (the e5 pair; MiniLM has no prompts of its own, so these come from the
settings) embeds real SciFact texts through
:class:`~embedstream.stream.local_encoder.LocalEncoder`, the encoder of the stream, the
rebuild and search: ``embed()`` the documents (title and abstract, as the corpus has
them), ``embed_queries()`` the test queries. The reference is stock
sentence-transformers on the same texts, ``encode(texts, prompt="passage: ")`` and
``prompt="query: "``, normalised. Reported per side: the largest absolute difference of
any coordinate and the smallest cosine; ``prompt_effect_min_cos``: the smallest cosine
between stock vectors with and without the prompt, to show the prompt is not a no-op;
``ratio``: our texts/s over stock's, both timed after a warm-up on the same texts.

``--backend``/``--precision`` default to torch fp32, the case that must be equal to
float noise; ``auto`` measures the machine's choice, which the quality guard bounds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/prompts.py [--texts 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embedstream.stream.config import EmbedSettings
from embedstream.stream.local_encoder import LocalEncoder

from _common import MODEL, SHARED_DATA, encoder_info, log, machine, stock_model

SCIFACT = SHARED_DATA / "beir" / "scifact"
DOCUMENT, QUERY = "passage: ", "query: "


def read_jsonl(name: str, limit: int, text: Callable[[dict[str, Any]], str]) -> list[str]:
    with (SCIFACT / name).open(encoding="utf-8") as handle:
        rows = (json.loads(line) for line in handle)
        return [text(row) for _, row in zip(range(limit), rows, strict=False)]


def timed(embed: Callable[[list[str]], np.ndarray], texts: list[str],
          repeats: int) -> tuple[np.ndarray, float]:
    """The vectors and the best wall time of ``repeats`` runs, after one warm-up."""
    vectors = embed(texts)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        embed(texts)
        best = min(best, time.perf_counter() - started)
    return vectors, best


def compare(ours: np.ndarray, stock: np.ndarray) -> dict[str, float]:
    return {"max_abs_diff": float(np.abs(ours - stock).max()),
            "min_cos": round(float((ours * stock).sum(axis=1).min()), 7)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=200,
                        help="texts per side: documents and queries (default 200)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    half = max(1, args.texts // 2)
    documents = read_jsonl("corpus.jsonl", half, lambda r: f"{r['title']} {r['text']}")
    queries = read_jsonl("queries.jsonl", half, lambda r: str(r["text"]))
    log(f"{len(documents)} SciFact documents and {len(queries)} queries, {MODEL} with "
        f"prompts {DOCUMENT!r}/{QUERY!r} on {args.backend}/{args.precision}")

    encoder = LocalEncoder.from_settings(EmbedSettings(
        model=MODEL, device="cpu", backend=args.backend, precision=args.precision,
        prompts={"document": DOCUMENT, "query": QUERY}))
    stock = stock_model()

    def stock_encode(prompt: str) -> Callable[[Sequence[str]], np.ndarray]:
        return lambda texts: np.asarray(stock.encode(list(texts), prompt=prompt, batch_size=32,
                                                     normalize_embeddings=True))

    ours_docs, ours_docs_s = timed(encoder.embed, documents, args.repeats)
    ours_queries, ours_queries_s = timed(encoder.embed_queries, queries, args.repeats)
    stock_docs, stock_docs_s = timed(stock_encode(DOCUMENT), documents, args.repeats)
    stock_queries, stock_queries_s = timed(stock_encode(QUERY), queries, args.repeats)
    bare = stock_encode("")(documents + queries)
    effect = (np.concatenate([stock_docs, stock_queries]) * bare).sum(axis=1).min()
    ours_s, stock_s = ours_docs_s + ours_queries_s, stock_docs_s + stock_queries_s
    texts = len(documents) + len(queries)
    print(json.dumps({
        "bench": "prompts", "model": MODEL, "prompts": {"document": DOCUMENT, "query": QUERY},
        "documents": {"texts": len(documents), **compare(ours_docs, stock_docs)},
        "queries": {"texts": len(queries), **compare(ours_queries, stock_queries)},
        "prompt_effect_min_cos": round(float(effect), 4),
        "ours_texts_per_s": round(texts / ours_s, 1),
        "stock_texts_per_s": round(texts / stock_s, 1),
        "ratio": round(stock_s / ours_s, 3),
        "encoder": encoder_info(encoder), "machine": machine(),
    }))


if __name__ == "__main__":
    main()
