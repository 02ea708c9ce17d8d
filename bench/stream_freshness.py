"""Streaming benchmark: freshness at a load, and backlog drain rate.

Everything runs against the real pieces: the bundled Tansu broker, the consumer
(:class:`embedstream.stream.consumer.StreamConsumer`), all-MiniLM-L6-v2 on the CPU on
the backend and precision ``embed.backend``/``embed.precision`` choose (``--backend``,
``--precision``; default ``auto``), ``embed.batching`` from ``--batching``, and a
Qdrant Edge store in a temporary directory. Documents are MS MARCO passages.

0. Off the clock: with ``--prefill N`` the store is first filled with N chunk points
   (``bench/scale.py``'s corpus, through the sink, its maintenance policy included), so
   freshness is measured against a grown store; the embedder settles its backend (a
   decision kept from an earlier run, or a calibration on a spread of the passages as
   the rebuild does it, reported as ``calibration_s``), and stock
   ``SentenceTransformer.encode`` (one call) runs over the chunk texts of the first
   ``--rate-docs`` freshness documents: ``stock_docs_per_s``. With ``--load F`` the
   event rate is ``F`` times that, so freshness compares across machines; ``--rate``
   sets it in events/s instead (and ``load`` reports the fraction it came to).
1. Freshness. A producer thread sends Debezium creates at that rate for
   ``--duration`` s (scheduled on absolute times, so sleeps do not drift), while
   the consumer runs in the main thread. After each flush, ``on_applied`` reads the
   batch's document states back from the store (one call per batch) and records,
   per event, ``readable_time - produce_time`` (both ``time.time()``). The consumer
   first joins its group and applies warm-up events, so group formation and
   first-call kernel warm-up are outside the measured window.
   Cost per event: the stream's, ``stream_embed_ms_per_event`` (the consumer's
   embedding seconds in the window, from its metrics, over the events), against the
   rebuild's, ``rebuild_embed_ms_per_event`` (the same embedder over the chunk texts
   of the same events in one call, right after the window), and their ratio
   ``stream_over_rebuild_cost``. ``fresh_busy`` is the share of the window the
   consumer spent embedding and in sink calls.
2. Backlog. The consumer joins the group on the empty backlog topic first; then
   ``--backlog`` creates are produced and flushed (texts: the passages, cycled,
   with `` (copy N)`` appended to repeats so every text is unique and nothing is
   deduplicated). The clock runs from the first poll after that to the commit of
   the last offset: ``backlog_per_s = events / seconds``.
3. Reference. Stock ``encode`` (one call, default batch size) over exactly the chunk
   texts the consumer embeds for the backlog (all of them by default; ``--reference
   N`` takes the first N events' texts to save time on a loaded machine), once before
   and once after the backlog phase; ``encode_per_s`` is those events over the mean
   of the two timings, so ``backlog_ratio = backlog_per_s / encode_per_s`` compares
   like with like on a noisy machine.

The last stdout line is one JSON object (``backend``, ``precision``, ``cpu_flags``,
``encoder`` and ``machine`` say what ran); progress goes to stderr. Extras say
where the consumer's time went (``*_embed_s``, ``*_sink_s`` from its metrics) and
how many CPU cores other processes used meanwhile (``*_others_cores``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from embedstream.stream.app.devdata import debezium_value
from embedstream.stream.app.service import Pipeline, build_consumer, build_pipeline
from embedstream.stream.config import EmbedSettings, RetrievalSettings, Settings
from embedstream.stream.consumer import StreamConsumer
from embedstream.stream.events import ChangeEvent
from embedstream.stream.kafka_config import kafka_client_config
from embedstream.stream.metrics import Metrics

from _common import (
    PASSAGES,
    OtherLoad,
    encoder_info,
    local_broker,
    log,
    machine,
    read_passages,
    stock_model,
    stream_settings,
)

FRESH_TOPIC, BACKLOG_TOPIC = "bench.fresh", "bench.backlog"
# Enough to warm the kernels of the batch shapes the window will see (the backend is
# settled before: see ``settle``).
WARMUP_EVENTS = 64


def unique_texts(passages: Sequence[str], count: int) -> list[str]:
    """``count`` texts: the passages in order, repeats suffixed so all differ."""
    n = len(passages)
    return [passages[i % n] + (f" (copy {i // n})" if i >= n else "") for i in range(count)]


def fresh_texts(passages: Sequence[str], count: int) -> list[str]:
    """The freshness phase's documents: the passages in order, cycled."""
    return [passages[i % len(passages)] for i in range(count)]


def send(producer: Producer, topic: str, doc_id: str, text: str, lsn: int) -> float:
    """Produce one Debezium create stamped with the current time; returns that time."""
    key = json.dumps({"id": doc_id}).encode()
    now = time.time()
    ms = int(now * 1000)
    value = debezium_value("c", None, {"id": doc_id, "text": text}, lsn, source_ts_ms=ms, ts_ms=ms)
    producer.produce(topic, key=key, value=value)
    producer.poll(0)
    return now


def produce_at_rate(producer: Producer, texts: Sequence[str], rate: float,
                    produced: dict[str, float]) -> float:
    """Send ``texts`` at ``rate``/s on an absolute schedule; returns the worst lateness (s)."""
    start, late = time.monotonic() + 0.01, 0.0
    for i, text in enumerate(texts):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late = max(late, time.monotonic() - due)
        doc_id = f"fresh-{i}"
        produced[doc_id] = send(producer, FRESH_TOPIC, doc_id, text, lsn=10_000 + 8 * i)
    producer.flush(30)
    return late


def make_settings(bootstrap: str, topic: str, store: Path, embed: EmbedSettings,
                  sparse: str = "none") -> Settings:
    return stream_settings(bootstrap, topic, store, group=f"bench-{topic}", collection="bench",
                           embed=embed,
                           retrieval=RetrievalSettings(sparse=sparse))  # type: ignore[arg-type]


def prefill(pipeline: Pipeline, points: int) -> dict[str, Any]:
    """Fill the store with ``points`` chunk points (``bench/scale.py``'s corpus: real MiniLM
    embeddings of the MS MARCO sample, perturbed per copy) through the sink, as a consumer
    would have written them, maintenance policy included, before anything is timed."""
    from _scale_corpus import Corpus, cache_file, load_sample

    base, _ = load_sample(cache_file())
    corpus, sink = Corpus(base, 0.02, 0, points), pipeline.sink
    started, docs, target = time.perf_counter(), 0, corpus.docs_for(points)
    while docs < target:
        batch = range(docs, min(target, docs + 500))
        sink.apply([corpus.write(d, 1, d + 1) for d in batch])
        docs = batch[-1] + 1
        if docs % 50_000 < 500:
            sink.flush()
            log(f"prefill: {corpus.points_in(docs):,} points")
        if sink.maintenance_due():
            sink.maintain()
    sink.flush()
    return {"prefill_points": corpus.points_in(docs),
            "prefill_s": round(time.perf_counter() - started, 1)}


def settle(pipeline: Pipeline, passages: Sequence[str]) -> float:
    """Settle the embedder's backend before anything is timed: where it is neither fixed
    nor kept from an earlier run, calibrate on a spread of the passages, as the rebuild
    does on its first bucket (the stream would otherwise calibrate on its first texts,
    inside the measured window). Returns the seconds it took."""
    embedder: Any = pipeline.embedder
    started = time.perf_counter()
    if not getattr(embedder, "decided", True):
        ids = embedder.tokenize(list(passages[:4096]))
        embedder.calibrate(ids[::max(1, len(ids) // 256)])
    return time.perf_counter() - started


def chunk_texts(pipeline: Pipeline, docs: Sequence[str]) -> list[str]:
    """What the consumer embeds for these documents: their chunks' ``embed_text``."""
    return [c.embed_text for t in docs for c in pipeline.chunker.chunk(t)]


def join(stream: StreamConsumer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    stream.run(until=lambda: bool(stream.assigned) or time.monotonic() > deadline)
    if not stream.assigned:
        raise RuntimeError("the consumer was not assigned a partition in time")


def freshness(pipeline: Pipeline, passages: Sequence[str], rate: float,
              duration: float) -> dict[str, Any]:
    count = max(2, int(rate * duration))
    produced: dict[str, float] = {}
    readable: dict[str, float] = {}
    acked: dict[str, float] = {}

    def on_applied(events: Sequence[ChangeEvent], acked_at: float) -> None:
        ids = [e.doc_id for e in events]
        states = pipeline.sink.document_states(ids)
        now = time.time()
        missing = [d for d in ids if d not in states]
        if missing:
            raise RuntimeError(f"applied but not readable: {missing[:3]}")
        for doc_id in ids:
            if doc_id in produced:
                readable[doc_id], acked[doc_id] = now, acked_at

    metrics = Metrics()
    stream = build_consumer(pipeline, metrics, on_applied=on_applied)
    producer = Producer(kafka_client_config(pipeline.settings, "producer"))
    try:
        join(stream)
        for i in range(WARMUP_EVENTS):
            send(producer, FRESH_TOPIC, f"warm-{i}", passages[-1 - i], lsn=1000 + 8 * i)
        producer.flush(30)
        stream.run(until=lambda: stream.committed.get((FRESH_TOPIC, 0), 0) >= WARMUP_EVENTS)
        log(f"freshness: warmed up; producing {count} events at {rate:g}/s")
        warm, load = breakdown(metrics, "fresh"), OtherLoad()
        texts = fresh_texts(passages, count)
        deadline = time.monotonic() + duration + 120
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(produce_at_rate, producer, texts, rate, produced)
            stream.run(until=lambda: (job.done() and len(readable) >= count)
                       or time.monotonic() > deadline)
            late = job.result()
        others = load.cores()
        window = breakdown(metrics, "fresh")
        # The rebuild's cost of the same events: one call, the same embedder.
        chunks = chunk_texts(pipeline, texts)
        started, load = time.perf_counter(), OtherLoad()
        pipeline.embedder.embed(chunks)
        rebuild_s, rebuild_others = time.perf_counter() - started, load.cores()
    finally:
        stream.close()
    if len(readable) < count:
        raise RuntimeError(f"only {len(readable)}/{count} events became readable")
    sent = sorted(produced.values())
    lat = np.array([readable[d] - produced[d] for d in produced]) * 1000
    lat_acked = np.array([acked[d] - produced[d] for d in produced]) * 1000
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
    spent = {k: v - warm[k] for k, v in window.items()}
    stream_ms, rebuild_ms = spent["fresh_embed_s"] * 1000 / count, rebuild_s * 1000 / count
    batches = max(1.0, spent["fresh_batches"])
    return {
        "events": count, "rate_target": rate,
        "events_per_s": round((count - 1) / (sent[-1] - sent[0]), 2),
        "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "p99_ms": round(p99, 1),
        "p_max_ms": round(float(lat.max()), 1),
        "p99_acked_ms": round(float(np.percentile(lat_acked, 99)), 1),
        "produce_late_max_ms": round(late * 1000, 1),
        **{k: round(v, 2) for k, v in spent.items()},
        "fresh_busy": round((spent["fresh_embed_s"] + spent["fresh_sink_s"]) / duration, 3),
        "fresh_events_per_batch": round(count / batches, 2),
        "fresh_embed_ms_per_batch": round(spent["fresh_embed_s"] * 1000 / batches, 1),
        "fresh_sink_ms_per_batch": round(spent["fresh_sink_s"] * 1000 / batches, 1),
        "fresh_others_cores": others,
        "stream_embed_ms_per_event": round(stream_ms, 2),
        "rebuild_embed_ms_per_event": round(rebuild_ms, 2),
        "stream_over_rebuild_cost": round(stream_ms / rebuild_ms, 3),
        "fresh_chunks": len(chunks), "rebuild_cost_others_cores": rebuild_others,
    }


def backlog(pipeline: Pipeline, texts: Sequence[str]) -> dict[str, Any]:
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)
    producer = Producer(kafka_client_config(pipeline.settings, "producer"))
    try:
        join(stream)
        for i, text in enumerate(texts):
            send(producer, BACKLOG_TOPIC, f"backlog-{i}", text, lsn=10_000 + 8 * i)
        if producer.flush(60):
            raise RuntimeError("backlog not fully produced")
        log(f"backlog: {len(texts)} events queued; draining")
        start, load = time.perf_counter(), OtherLoad()
        stream.run(until=lambda: stream.committed.get((BACKLOG_TOPIC, 0), 0) >= len(texts))
        seconds, others = time.perf_counter() - start, load.cores()
    finally:
        stream.close()
    times = breakdown(metrics, "backlog")
    log(f"backlog: {seconds:.1f}s {times}")
    other = seconds - times["backlog_embed_s"] - times["backlog_sink_s"]
    return {"backlog_events": len(texts), "backlog_s": round(seconds, 2),
            "backlog_per_s": round(len(texts) / seconds, 2), **times,
            "backlog_other_s": round(other, 2), "backlog_others_cores": others}


def breakdown(metrics: Metrics, phase: str) -> dict[str, float]:
    """Where the consumer's time went: embedding, sink calls, batches (from its metrics)."""
    sample = metrics.registry.get_sample_value
    sink_s = sum(sample("embedstream_sink_operation_duration_seconds_sum", {"op": op}) or 0.0
                 for op in ("read_state", "read_vectors", "apply", "flush", "optimize"))
    return {f"{phase}_embed_s": round(sample("embedstream_embed_duration_seconds_sum") or 0.0, 2),
            f"{phase}_sink_s": round(sink_s, 2),
            f"{phase}_batches": sample("embedstream_batch_events_count") or 0.0,
            f"{phase}_checkpoints": sample("embedstream_commits_total") or 0.0}


def encode_seconds(model: Any, texts: list[str]) -> tuple[float, float | None]:
    """Seconds for one stock ``encode`` call, and the other processes' mean CPU cores."""
    start, load = time.perf_counter(), OtherLoad()
    model.encode(texts)
    return time.perf_counter() - start, load.cores()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--passages", type=Path, default=PASSAGES)
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--rate", type=float, default=None,
                       help="events/s in the freshness phase (default 20 without --load)")
    speed.add_argument("--load", type=float, default=None,
                       help="events/s as this fraction of stock encode's documents/s, "
                            "measured in the same run")
    parser.add_argument("--rate-docs", type=int, default=400,
                        help="freshness documents stock encode is timed on for --load")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of events")
    parser.add_argument("--backlog", type=int, default=5000, help="events in the backlog")
    parser.add_argument("--reference", type=int, default=0,
                        help="encode the first N backlog texts for the reference (0: all)")
    parser.add_argument("--batching", choices=("adaptive", "fixed"), default=None,
                        help="embed.batching (default: the setting's default)")
    parser.add_argument("--max-wait-ms", type=int, default=None, help="embed.max_wait_ms")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "onnx", "openvino"))
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "fp32", "bf16", "fp16", "int8"))
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--prefill", type=int, default=0,
                        help="chunk points written to the store before anything is timed")
    parser.add_argument("--sparse", choices=("none", "bm25"), default="none",
                        help="retrieval.sparse: document BM25 vectors written with the chunks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("embedstream").setLevel(logging.WARNING)
    logging.getLogger("embedstream.embed").setLevel(logging.INFO)  # the backend choice
    if args.quick:
        args.duration, args.backlog = 5.0, 300
    embed = EmbedSettings(backend=args.backend, precision=args.precision, **{
        k: v for k, v in (("batching", args.batching), ("max_wait_ms", args.max_wait_ms))
        if v is not None})
    passages = read_passages(args.passages)
    backlog_texts = unique_texts(passages, args.backlog)
    reference = backlog_texts[:args.reference or None]

    with local_broker([FRESH_TOPIC, BACKLOG_TOPIC]) as broker, \
            tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        fresh_settings = make_settings(broker.bootstrap_servers, FRESH_TOPIC, store, embed,
                                       args.sparse)
        log("loading the model")
        pipeline = build_pipeline(fresh_settings)
        try:
            filled = prefill(pipeline, args.prefill) if args.prefill else {}
            calibration_s = settle(pipeline, passages)
            chosen = encoder_info(pipeline.embedder)
            log(f"embedding with {chosen} (settled in {calibration_s:.1f}s)")
            stock = stock_model()
            stock.encode(passages[-64:])  # warm-up
            rate_docs = fresh_texts(passages, args.rate_docs)
            stock_s, rate_others = encode_seconds(stock, chunk_texts(pipeline, rate_docs))
            stock_docs_per_s = len(rate_docs) / stock_s
            rate = (args.load * stock_docs_per_s if args.load is not None
                    else args.rate if args.rate is not None else 20.0)
            log(f"stock encode: {stock_docs_per_s:.1f} docs/s; freshness at {rate:.1f}/s")
            result = {**filled, "load": round(rate / stock_docs_per_s, 3),
                      "load_asked": args.load,
                      "stock_docs_per_s": round(stock_docs_per_s, 2),
                      "stock_rate_others_cores": rate_others}
            result.update(freshness(pipeline, passages, rate, args.duration))
            log(f"freshness: {result}")
            reference_chunks = chunk_texts(pipeline, reference)
            before, others_before = encode_seconds(stock, reference_chunks)
            log(f"reference: {len(reference_chunks)} chunks in {before:.1f}s")
            backlog_pipeline = dataclasses.replace(
                pipeline,
                settings=make_settings(broker.bootstrap_servers, BACKLOG_TOPIC, store, embed,
                                       args.sparse))
            result.update(backlog(backlog_pipeline, backlog_texts))
            after, others_after = encode_seconds(stock, reference_chunks)
            log(f"reference: {len(reference_chunks)} chunks in {after:.1f}s")
        finally:
            pipeline.close()
    encode_per_s = len(reference) / ((before + after) / 2)
    result.update({
        "encode_per_s": round(encode_per_s, 2),
        "encode_s": [round(before, 2), round(after, 2)],
        "encode_others_cores": [others_before, others_after],
        "reference_events": len(reference), "reference_chunks": len(reference_chunks),
        "backlog_ratio": round(result["backlog_per_s"] / encode_per_s, 3),
        "backend": chosen["backend"], "precision": chosen["precision"],
        "variant": chosen["variant"], "cpu_flags": chosen["cpu_flags"],
        "batching": embed.batching, "max_wait_ms": embed.max_wait_ms, "sparse": args.sparse,
        "index": fresh_settings.sink.index.model_dump(mode="json"),
        "calibration_s": round(calibration_s, 1),
        "encoder": chosen,
        "machine": machine(),
    })
    first = ("load", "events_per_s", "p50_ms", "p95_ms", "p99_ms", "stream_over_rebuild_cost",
             "backlog_per_s", "encode_per_s", "backlog_ratio", "backend", "precision",
             "batching")
    print(json.dumps({**{k: result[k] for k in first}, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
