"""``embedstream plan``: size a rebuild before renting hardware.

A short calibration run chunks and embeds a sample of documents (``--sample
FILE``, else a built-in sample made of embedstream's own docstrings,
:func:`builtin_sample`) with the
bulk engine on this machine's device (as a rebuild would, backend choice
included) and measures tokens per second, chunks per document and tokens per
chunk. :func:`estimate` turns that into device-hours, wall-clock for each fleet
size and cost for a corpus of ``--docs`` documents. ``--rate`` skips the run.

Assumptions, printed with the figures: throughput in tokens per second carries
over to the corpus (right for chunks of similar length; attention makes very
long chunks somewhat slower per token); devices scale linearly (the engine
runs one worker per GPU and shares nothing but the reader); each device pays
the model start-up once. Not included: the store's write time (Qdrant Edge
takes about 25,000 points/s per process) and network transfer.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, TextIO

from embedstream.stream.config import Settings
from embedstream.stream.errors import ConfigError

__all__ = ["Calibration", "Estimate", "calibrate", "estimate", "run_plan"]

log = logging.getLogger("embedstream.bulk")

_SAMPLE_DOCS = 600
# Words per passage of the built-in sample: a web passage's length, give or take (length,
# not wording, decides tokens per second; the plan prints tokens per chunk measured).
_BUILTIN_WORDS = 60


@dataclass(frozen=True, slots=True)
class Calibration:
    device: str
    precision: str
    docs: int
    chunks: int
    tokens: int
    seconds: float
    startup_s: float
    sample: str  # the file(s) calibrated on, or "built-in"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def chunks_per_doc(self) -> float:
        return self.chunks / max(1, self.docs)

    @property
    def tokens_per_chunk(self) -> float:
        return self.tokens / max(1, self.chunks)


@dataclass(frozen=True, slots=True)
class Estimate:
    devices: int
    wall_s: float
    device_hours: float
    cost: float | None


def estimate(docs: int, chunks_per_doc: float, chunks_per_s: float, fleet: Sequence[int],
             price: float | None, startup_s: float = 0.0) -> list[Estimate]:
    """Wall-clock, device-hours and cost of embedding ``docs`` documents on each
    fleet size, at ``chunks_per_s`` per device (see the module docstring)."""
    if docs < 0 or chunks_per_doc <= 0 or chunks_per_s <= 0:
        raise ConfigError("plan: --docs must be >= 0, chunks per doc and the rate > 0")
    work_s = docs * chunks_per_doc / chunks_per_s
    rows = []
    for devices in fleet:
        if devices < 1:
            raise ConfigError(f"plan: fleet sizes must be >= 1, got {devices}")
        wall = startup_s + work_s / devices
        hours = wall * devices / 3600
        rows.append(Estimate(devices, wall, hours, None if price is None else hours * price))
    return rows


def builtin_sample(docs: int = _SAMPLE_DOCS) -> list[str]:
    """Passages that ship with the package: the docstrings of embedstream's own
    modules (English prose with some code names in it), cut into runs of sixty
    words and repeated in order until there are ``docs`` of them (about 240 differ).
    Third-party corpora (MS MARCO, BEIR) may not be redistributed, so the package
    carries none; ``--sample FILE`` calibrates on documents like the user's, which
    gives truer figures."""
    words: list[str] = []
    for package in ("embedstream.stream", "embedstream.sinks", "embedstream.bulk"):
        for source in sorted(resources.files(package).iterdir(), key=lambda f: f.name):
            if source.name.endswith(".py"):
                tree = ast.parse(source.read_text(encoding="utf-8"))
                for node in ast.walk(tree):
                    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                        words.extend((ast.get_docstring(node) or "").split())
    passages = [" ".join(words[i:i + _BUILTIN_WORDS])
                for i in range(0, len(words) - _BUILTIN_WORDS + 1, _BUILTIN_WORDS)]
    if not passages:
        raise ConfigError("plan: the built-in sample is empty; pass --sample FILE")
    return [passages[i % len(passages)] for i in range(docs)]


def calibrate(settings: Settings, sample: str | None, docs: int = _SAMPLE_DOCS) -> Calibration:
    """Chunk and embed up to ``docs`` documents of ``sample`` (a corpus file, or
    ``None`` for :func:`builtin_sample`) with the bulk engine."""
    from embedstream.bulk.engine import BulkEngine, EmbeddedUnit
    from embedstream.bulk.rebuild import build_encoders
    from embedstream.bulk.sources import SourceRow, read_rows
    from embedstream.stream.chunking import TokenChunker
    from embedstream.stream.embedding import chunk_max_tokens

    if settings.embed.provider != "local":
        # A provider's rate limits, not devices, decide: nothing to calibrate here.
        raise ConfigError(
            "plan sizes device fleets for a local model; with embed.provider "
            f"{settings.embed.provider!r} a rebuild takes about max(total tokens / "
            "embed.tokens_per_minute, requests / embed.requests_per_minute) minutes, "
            "requests being chunks / embed.request_max_inputs")
    started = time.perf_counter()
    log.info("plan: loading %s (embed.backend %s, embed.precision %s: decided on this "
             "machine once, then kept)", settings.embed.model, settings.embed.backend,
             settings.embed.precision)
    encoders = build_encoders(settings)
    encoder = encoders[0]
    chunker = TokenChunker(encoder.tokenizer, max_tokens=chunk_max_tokens(
        settings.chunk.max_tokens, encoder))
    rows: list[SourceRow] = []
    if sample is None:
        rows = [SourceRow(f"builtin-{i}", text, {}, f"builtin#{i}")
                for i, text in enumerate(builtin_sample(docs))]
    for item in read_rows(sample, settings) if sample is not None else ():
        if isinstance(item, SourceRow):
            rows.append(item)
        if len(rows) >= docs:
            break
    if not rows:
        raise ConfigError(f"plan: no documents could be read from {sample!r}")
    engine: BulkEngine[SourceRow, None] = BulkEngine(
        encoders, unit_records=settings.bulk.write_documents,
        tokenizer_workers=settings.bulk.tokenizer_workers, bucket_texts=settings.bulk.bucket_texts)

    def prepare(row: SourceRow) -> tuple[None, list[str]]:
        return None, [c.embed_text for c in chunker.chunk(row.text, row.title)]

    def ignore(unit: EmbeddedUnit[SourceRow, None]) -> None:
        return None

    warm = max(1, len(rows) // 6)  # precision calibration and kernel warm-up, not timed
    engine.run(rows[:warm], prepare, ignore)
    startup_s = time.perf_counter() - started
    measured = rows[warm:] or rows
    log.info("plan: start-up took %.1f s (model, precision, warm-up); measuring %d documents",
             startup_s, len(measured))
    stats = engine.run(measured, prepare, ignore)
    return Calibration(encoder.device, encoder.precision, len(measured), stats.texts,
                       stats.tokens, stats.elapsed_s, startup_s,
                       sample or "built-in")


def run_plan(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    """The ``plan`` command (arguments as ``embedstream.stream.app.cli`` defines them)."""
    try:
        fleet = [int(g) for g in str(args.gpus).split(",") if g.strip()]
    except ValueError:
        raise ConfigError(f"plan: --gpus takes comma-separated counts, not {args.gpus!r}") \
            from None
    calibration: Calibration | None = None
    if args.rate is None:
        calibration = calibrate(settings, args.sample)
    chunks_per_doc = args.chunks_per_doc or (calibration.chunks_per_doc if calibration else 1.0)
    if calibration is not None:
        tokens_per_chunk = args.tokens_per_chunk or calibration.tokens_per_chunk
        rate = calibration.tokens_per_s / tokens_per_chunk
        startup = calibration.startup_s
    else:
        rate, startup = float(args.rate), 0.0
    rows = estimate(args.docs, chunks_per_doc, rate, fleet, args.price, startup)
    result: dict[str, Any] = {
        "docs": args.docs, "chunks_per_doc": round(chunks_per_doc, 3),
        "chunks": round(args.docs * chunks_per_doc), "chunks_per_s_per_device": round(rate, 1),
        "calibration": None if calibration is None else {
            **asdict(calibration), "tokens_per_s": round(calibration.tokens_per_s, 1),
            "tokens_per_chunk": round(calibration.tokens_per_chunk, 1)},
        "fleet": [asdict(r) for r in rows],
    }
    if args.json:
        out.write(json.dumps(result) + "\n")
        return 0
    if calibration is not None:
        out.write(f"calibration: {calibration.docs:,} docs, {calibration.chunks:,} chunks, "
                  f"{calibration.tokens_per_chunk:.1f} tokens/chunk, "
                  f"{calibration.tokens_per_s:,.0f} tokens/s on {calibration.device} "
                  f"({calibration.precision}); start-up {calibration.startup_s:.0f} s; "
                  f"sample: {calibration.sample}\n")
    out.write(f"corpus: {args.docs:,} docs x {chunks_per_doc:.2f} chunks = "
              f"{result['chunks']:,} chunks at {rate:,.1f} chunks/s per device\n")
    out.write(f"{'devices':>8}  {'wall-clock':>12}  {'device-hours':>12}  {'cost':>10}\n")
    for row in rows:
        cost = "-" if row.cost is None else f"{row.cost:,.2f}"
        out.write(f"{row.devices:>8}  {_clock(row.wall_s):>12}  {row.device_hours:>12,.2f}  "
                  f"{cost:>10}\n")
    out.write("assumes linear scaling across devices and store writes keeping up; "
              "see `embedstream plan --help`\n")
    return 0


def _clock(seconds: float) -> str:
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours}:{minutes:02d}:{secs:02d}"
