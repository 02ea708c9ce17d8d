"""``embedstream dlq list`` and ``dlq replay`` against the real broker, consumer and store.

The scenario: Debezium events on a two-partition topic, consumed under
``source.version: lsn`` and a small ``source.max_message_bytes``, so snapshot
events without an LSN (``missing_version``), an over-large one
(``message_too_large``) and plainly broken ones land in the dead-letter topic.
Then the config changes (``version: auto``, later the default size limit) and
replay puts exactly the records that now decode back on their source partitions,
where the consumer applies them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from embedstream.stream.app import dlq, dlq_read
from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.app.cli import main
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.metrics import Metrics

from .streamkit import create_topic, run_until, unique

SMALL_LIMIT = 2000
Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


def product(doc_id: int, name: str, description: str, *, lsn: int | None) -> Record:
    """A Debezium row event: PostgreSQL-like with an LSN, else MySQL-like (binlog position)."""
    source: dict[str, Any] = {"ts_ms": 1_700_000_000_000 + doc_id}
    source.update({"connector": "postgresql", "lsn": lsn} if lsn is not None else
                  {"connector": "mysql", "file": "binlog.000003", "pos": 4000 + doc_id})
    value = {"before": None, "op": "c" if lsn is not None else "r", "source": source,
             "after": {"id": doc_id, "name": name, "description": description},
             "ts_ms": source["ts_ms"] + 5}
    return json.dumps({"id": doc_id}).encode(), json.dumps(value).encode(), []


NOT_UTF8: Record = (b'{"id": 20}', b"\xff\xfe not json", [])
BAD_TYPE: Record = (b'{"id": 21}', b'{"op": "c", "after": 42}', [])
UNKNOWN_OP: Record = (b'{"id": 22}', b'{"op": "x", "after": {"id": 22}}', [])
NO_ID: Record = (None, b'{"op": "c", "after": {"name": "orphan row"}}', [])
FIXABLE_10 = product(10, "Canoe", "A snapshot row from the MySQL source.", lsn=None)
FIXABLE_10 = (FIXABLE_10[0], FIXABLE_10[1], [("traceparent", b"00-4bf92f3577b34da6-01")])
FIXABLE_11 = product(11, "Paddle", "Another snapshot row, no LSN either.", lsn=None)
FIXABLE_12 = product(12, "Life vest", "A third snapshot row on the other partition.", lsn=None)
LARGE_13 = product(13, "Tent", " ".join(["A tent for four people and their gear."] * 60),
                   lsn=103)

# Source partition 0, then (a second round of traffic) partition 1.
ROUND_0 = [product(1, "Kayak", "A sit-on-top kayak.", lsn=100), NOT_UTF8, FIXABLE_10, BAD_TYPE,
           FIXABLE_11, UNKNOWN_OP]
ROUND_1 = [product(2, "Rope", "Twenty metres of rope.", lsn=101), FIXABLE_12, NO_ID, LARGE_13,
           product(3, "Stove", "A two-burner camping stove.", lsn=102)]

# What the dead-letter topic holds, in order: (source partition, source offset, reason).
EXPECTED_DLQ = [(0, 1, "not_utf8"), (0, 2, "missing_version"), (0, 3, "bad_type"),
                (0, 4, "missing_version"), (0, 5, "unknown_op"), (1, 1, "missing_version"),
                (1, 2, "missing_id"), (1, 3, "message_too_large")]


def produce_to(bootstrap: str, topic: str, partition: int, records: list[Record]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, partition=partition, headers=headers)
    assert producer.flush(30) == 0
    producer.close()


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of every partition, read to the end, in (partition, offset) order.

    Ends are found by reaching them (partition EOF), not by listing offsets: the
    bundled broker lists only the last record batch's base offset plus one."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("reader"),
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "session.timeout.ms": 6000})
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        got: list[Any] = []
        at_end: set[int] = set()
        deadline = time.monotonic() + 30
        while at_end != set(partitions):
            assert time.monotonic() < deadline, f"{topic}: no end on {set(partitions) - at_end}"
            for message in consumer.consume(100, 0.5):
                if message.error() is None:
                    got.append(message)
                elif message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
    finally:
        consumer.close()
    return sorted(got, key=lambda m: (m.partition(), m.offset()))


def replayed_from(message: Any) -> str | None:
    value = dict(message.headers() or []).get(dlq.REPLAYED_FROM_HEADER)
    return None if value is None else bytes(value).decode()


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["dlq", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class Scenario:
    def __init__(self, broker: LocalBroker, tmp: Path, model: Path) -> None:
        self.bootstrap = broker.bootstrap_servers
        self.topic = unique("products")
        self.group = unique("dlq")
        self.dlq_topic = f"{self.group}.{self.topic}.dlq"
        self.tmp = tmp
        self.config: dict[str, Any] = {
            "kafka": {"bootstrap_servers": self.bootstrap, "topics": [self.topic],
                      "group_id": self.group, "options": {"session.timeout.ms": 6000}},
            "source": {"format": "debezium", "version": "lsn",
                       "max_message_bytes": SMALL_LIMIT},
            "embed": {"model": str(model), "device": "cpu"},
            "chunk": {"max_tokens": 64},
            "sink": {"kind": "qdrant-edge", "path": str(tmp / "store"), "collection": "products",
                     "flush_interval_ms": 0},
            "metrics": {"enabled": False},
        }

    def config_file(self, name: str, **source: Any) -> Path:
        """The config with ``source`` changed (a None value restores the default)."""
        config = json.loads(json.dumps(self.config))
        config["source"].update(source)
        config["source"] = {k: v for k, v in config["source"].items() if v is not None}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def consume(self, config_file: Path, until_offsets: dict[int, int],
                produce: dict[int, list[Record]] | None = None) -> set[str]:
        """Run the real consumer until it has committed ``until_offsets`` per partition
        (name only partitions it gets records from: only those commit), producing
        ``produce`` per partition first, one partition at a time; return the documents
        in the store."""
        settings = Settings(**yaml.safe_load(config_file.read_text()))
        pipeline = build_pipeline(settings)
        try:
            stream = build_consumer(pipeline, Metrics())

            def catch_up(target: dict[int, int]) -> None:
                run_until(stream, lambda: all(stream.committed.get((self.topic, p), 0) >= o
                                              for p, o in target.items()),
                          60, f"the committed offsets per partition to reach {target}")

            try:
                # One partition at a time, so the dead letters come in a known order.
                for partition, records in (produce or {}).items():
                    produce_to(self.bootstrap, self.topic, partition, records)
                    catch_up({p: o for p, o in until_offsets.items() if p <= partition})
                catch_up(until_offsets)
            finally:
                stream.close()
            return {str(p.payload["doc_id"]) for p in pipeline.sink.points()}
        finally:
            pipeline.close()


@pytest.fixture(scope="module")
def scenario(broker: LocalBroker, tiny_model_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """Two rounds of traffic consumed under the strict config; the dead letters in place."""
    scenario = Scenario(broker, tmp_path_factory.mktemp("dlq"), tiny_model_dir)
    create_topic(scenario.bootstrap, scenario.topic, partitions=2)
    strict = scenario.config_file("strict")
    docs = scenario.consume(strict, {0: len(ROUND_0), 1: len(ROUND_1)},
                            produce={0: ROUND_0, 1: ROUND_1})
    assert docs == {"1", "2", "3"}
    return scenario


@pytest.mark.slow
def test_list_shows_every_dead_letter_with_its_source_and_reason(
        scenario: Scenario, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    strict = scenario.tmp / "strict.yaml"
    code, out, err = run_cli(capsys, "list", "--config", str(strict), "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["source_partition"], r["source_offset"], r["reason"]) for r in rows] \
        == EXPECTED_DLQ
    assert [r["dlq_offset"] for r in rows] == list(range(len(EXPECTED_DLQ)))
    assert {r["dlq_topic"] for r in rows} == {scenario.dlq_topic}
    assert {r["source_topic"] for r in rows} == {scenario.topic}
    assert {r["group"] for r in rows} == {scenario.group}  # who dead-lettered them
    assert all(r["consumer"] for r in rows)
    assert rows[0]["key"] == '{"id": 20}' and rows[6]["key"] is None
    assert "source.lsn" in rows[1]["detail"] and rows[7]["value_bytes"] > SMALL_LIMIT
    summary = [json.loads(line)["msg"] for line in err.splitlines()]
    assert (f"8 dead-letter records in {scenario.dlq_topic}: bad_type 1, message_too_large 1, "
            "missing_id 1, missing_version 3, not_utf8 1, unknown_op 1") in summary

    code, out, err = run_cli(capsys, "list", "--config", str(strict))
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(EXPECTED_DLQ)
    for i, (line, (partition, offset, reason)) in enumerate(zip(lines, EXPECTED_DLQ,
                                                                strict=True)):
        assert line.startswith(f"{scenario.dlq_topic}/0/{i}  "
                               f"source={scenario.topic}/{partition}/{offset}  "
                               f"group={scenario.group}  reason={reason}  key="), line
        assert len(line) < 400
    # Listing commits nothing and reads from the start every time.
    assert run_cli(capsys, "list", "--config", str(strict))[1] == out


@pytest.mark.slow
def test_replay_resubmits_what_now_decodes_once(
        scenario: Scenario, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    relaxed = scenario.config_file("relaxed", version="auto")
    source_before = read_topic(scenario.bootstrap, scenario.topic)
    assert len(source_before) == len(ROUND_0) + len(ROUND_1)

    # A dry run reports and changes nothing.
    code, out, err = run_cli(capsys, "replay", "--config", str(relaxed), "--dry-run")
    assert code == 0, err
    assert out.strip() == ("dry run: would resubmit 3, still failing 5 (bad_type 1, "
                           "message_too_large 1, missing_id 1, not_utf8 1, unknown_op 1), "
                           "3 of them would be passed over")
    assert len(read_topic(scenario.bootstrap, scenario.topic)) == len(source_before)

    # The real one: the three missing_version records decode under version: auto.
    code, out, err = run_cli(capsys, "replay", "--config", str(relaxed))
    assert code == 0, err
    assert out.strip() == ("resubmitted 3, still failing 5 (bad_type 1, message_too_large 1, "
                           "missing_id 1, not_utf8 1, unknown_op 1), 3 of them passed over")
    source = read_topic(scenario.bootstrap, scenario.topic)
    assert len(source) == len(source_before) + 3
    by_origin = {origin: m for m in source if (origin := replayed_from(m))}
    dlq_at = f"{scenario.dlq_topic}/0/"
    assert sorted(by_origin) == [dlq_at + "1", dlq_at + "3", dlq_at + "5"]
    for origin, original, partition in ((1, FIXABLE_10, 0), (3, FIXABLE_11, 0),
                                        (5, FIXABLE_12, 1)):
        message = by_origin[dlq_at + str(origin)]
        assert (message.key(), message.value()) == original[:2]
        assert message.partition() == partition  # back where its document's events are
        assert [(k, v) for k, v in message.headers() if k != dlq.REPLAYED_FROM_HEADER] \
            == original[2]  # the original headers, none of the dead-letter ones
    # The consumer, now on the relaxed config, applies them.
    docs = scenario.consume(relaxed, {0: len(ROUND_0) + 2, 1: len(ROUND_1) + 1})
    assert docs == {"1", "2", "3", "10", "11", "12"}

    # Again: nothing new to resubmit; the two still failing after the last
    # resubmitted one stay in the window, the three before it were passed over.
    code, out, err = run_cli(capsys, "replay", "--config", str(relaxed))
    assert code == 0, err
    assert out.strip() == "resubmitted 0, still failing 2 (message_too_large 1, missing_id 1)"
    assert len(read_topic(scenario.bootstrap, scenario.topic)) == len(source_before) + 3

    # A second fix (the default size limit) gets the large record through.
    roomy = scenario.config_file("roomy", version="auto", max_message_bytes=None)
    code, out, err = run_cli(capsys, "replay", "--config", str(roomy))
    assert code == 0, err
    assert out.strip() == "resubmitted 1, still failing 1 (missing_id 1), 1 of them passed over"
    source = read_topic(scenario.bootstrap, scenario.topic)
    assert len(source) == len(source_before) + 4
    [large] = [m for m in source if replayed_from(m) == f"{dlq_at}7"]
    assert large.partition() == 1 and large.value() == LARGE_13[1]
    docs = scenario.consume(roomy, {1: len(ROUND_1) + 2})  # partition 0 has nothing new
    assert docs == {"1", "2", "3", "10", "11", "12", "13"}

    code, out, err = run_cli(capsys, "replay", "--config", str(roomy))
    assert (code, out.strip()) == (0, "resubmitted 0, still failing 0"), err
    # Replay never changes the dead-letter topic: list still shows all eight.
    code, out, err = run_cli(capsys, "list", "--config", str(roomy), "--json")
    assert len(out.splitlines()) == len(EXPECTED_DLQ)


@pytest.mark.slow
def test_replay_keeps_its_progress_in_its_own_group(scenario: Scenario) -> None:
    settings = Settings(**yaml.safe_load((scenario.tmp / "strict.yaml").read_text()))
    assert dlq.replay_group(settings) == f"{settings.kafka.group_id}.dlq-replay"
    assert dlq.dlq_topics(settings) == [scenario.dlq_topic]


@pytest.mark.slow
def test_a_missing_dead_letter_topic_is_empty(
        broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        cli_logging: None) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"kafka": {
        "bootstrap_servers": broker.bootstrap_servers, "topics": [unique("never")],
        "group_id": unique("g"), "options": {"session.timeout.ms": 6000}}}))
    code, out, err = run_cli(capsys, "list", "--config", str(config))
    assert (code, out) == (0, ""), err
    code, out, err = run_cli(capsys, "replay", "--config", str(config))
    assert (code, out.strip()) == (0, "resubmitted 0, still failing 0"), err


@pytest.mark.parametrize("command", ["list", "replay"])
def test_an_unreachable_broker_is_a_clear_error(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dlq_read, "_TIMEOUT_S", 1.0)  # list and replay both use it
    bootstrap = f"127.0.0.1:{free_port()}"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"kafka": {
        "bootstrap_servers": bootstrap, "topics": ["t"], "group_id": "g",
        "options": {"session.timeout.ms": 6000}}}))
    code, out, err = run_cli(capsys, command, "--config", str(config))
    assert code == 2 and out == ""
    assert f"embedstream: error: dlq: reading metadata of 'g.t.dlq' failed (Kafka at " \
           f"{bootstrap})" in err


@pytest.mark.slow
def test_nothing_is_committed_when_resubmitting_fails(
        broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        cli_logging: None) -> None:
    topic, group = unique("gone"), unique("g")
    dlq_topic = f"{group}.{topic}.dlq"
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    create_topic(broker.bootstrap_servers, dlq_topic, partitions=1)
    value = json.dumps({"id": "a", "text": "A native document."}).encode()
    source = [("embedstream.error.reason", b"missing_id"), ("embedstream.source.topic",
              topic.encode()), ("embedstream.source.offset", b"3")]
    produce_to(broker.bootstrap_servers, dlq_topic, 0, [
        (b"a", value, []),  # no source headers at all
        (b"a", value, [*source, ("embedstream.source.partition", b"0")]),
        # A partition the source topic does not have (any more).
        (b"a", value, [*source, ("embedstream.source.partition", b"7")]),
    ])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
                  "group_id": group, "options": {"session.timeout.ms": 6000}},
        "source": {"format": "native"}}))
    code, out, err = run_cli(capsys, "replay", "--config", str(config), "--dry-run")
    assert (code, out.strip()) == (0, "dry run: would resubmit 2, still failing 1 (no_source 1),"
                                      " 1 of them would be passed over"), err

    code, out, err = run_cli(capsys, "replay", "--config", str(config))
    assert code == 2 and out == ""
    # Refused at once if the producer already knows the topic's partitions, else at the flush.
    assert f"embedstream: error: dlq: resubmitting {dlq_topic}/0/2 to {topic}[7]" in err \
        or "embedstream: error: dlq: resubmitting failed" in err, err
    reader = Consumer({"bootstrap.servers": broker.bootstrap_servers,
                       "group.id": f"{group}.dlq-replay", "session.timeout.ms": 6000})
    try:
        [progress] = reader.committed([TopicPartition(dlq_topic, 0)], timeout=10)
    finally:
        reader.close()
    assert progress.offset < 0  # nothing committed: the next replay tries them all again
