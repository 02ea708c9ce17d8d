"""Dead letters per consumer group: two groups on one topic keep theirs apart
(``<group_id>.<topic>.dlq``), records name the group and consumer, ``dlq replay``
resubmits only its own group's, and the old shared ``<topic>.dlq`` is read when
``kafka.dlq_legacy_topics`` says so (and named in a warning when not).

Real broker, real consumer (tiny model), the commands through ``cli.main``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.config import Settings
from embedstream.stream.dead_letters import (
    GROUP_HEADER,
    REASON_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from embedstream.stream.routing import TopicRouter

from .streamkit import create_topic, unique
from .test_dlq_commands import FIXABLE_10, Scenario, produce_to, product, run_cli


def config_file(tmp: Path, name: str, kafka: dict[str, Any], **source: Any) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"kafka": {"options": {"session.timeout.ms": 6000}, **kafka},
                                    "source": {"format": "debezium", **source}}))
    return path


def test_the_default_dead_letter_topic_is_per_group_and_topic() -> None:
    kafka = Settings(kafka={"group_id": "search", "topics": ["db.shop.items"]}).kafka
    assert kafka.dlq_topic_for("db.shop.items") == "search.db.shop.items.dlq"
    assert kafka.legacy_dlq_topic_for("db.shop.items") == "db.shop.items.dlq"
    # A group id may hold what a topic name cannot.
    odd = Settings(kafka={"group_id": "team a/search", "topics": ["t"]}).kafka
    assert odd.dlq_topic_for("t") == "team_a_search.t.dlq"
    shared = Settings(kafka={"dlq_topic": "all.dlq"}).kafka
    assert shared.dlq_topic_for("t") == "all.dlq" and shared.legacy_dlq_topic_for("t") is None
    with pytest.raises(ValueError, match="Kafka takes at most 249"):
        Settings(kafka={"group_id": "g" * 200, "topics": ["t" * 48]})


def test_a_pattern_never_routes_the_new_dead_letter_topics() -> None:
    settings = Settings(kafka={"group_id": "search", "topic_pattern": r".*shop.*"})
    router = TopicRouter(settings.all_routes(), settings.kafka)
    assert router.route("db1.shop.items") is not None
    assert router.route(settings.kafka.dlq_topic_for("db1.shop.items")) is None
    assert router.route("db1.shop.items.dlq") is None  # the old name too


@pytest.mark.slow
def test_two_groups_on_one_topic_keep_their_dead_letters_apart(
        broker: LocalBroker, tiny_model_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    first = Scenario(broker, tmp_path / "a", tiny_model_dir)
    second = Scenario(broker, tmp_path / "b", tiny_model_dir)
    second.topic = first.topic
    second.config["kafka"]["topics"] = [first.topic]
    for scenario in (first, second):
        scenario.tmp.mkdir()
    create_topic(broker.bootstrap_servers, first.topic, partitions=1)
    records = [product(1, "Kayak", "A sit-on-top kayak.", lsn=100), FIXABLE_10]
    produce_to(broker.bootstrap_servers, first.topic, 0, records)
    for scenario in (first, second):  # each group reads both, dead-letters the second
        assert scenario.consume(scenario.config_file("strict"), {0: 2}) == {"1"}

    for scenario in (first, second):
        strict = scenario.tmp / "strict.yaml"
        code, out, err = run_cli(capsys, "list", "--config", str(strict), "--json")
        assert code == 0, err
        [row] = [json.loads(line) for line in out.splitlines()]
        assert (row["dlq_topic"], row["group"], row["reason"]) == (
            f"{scenario.group}.{first.topic}.dlq", scenario.group, "missing_version")
        assert row["consumer"]
        # Each group's replay resubmits its own copy only: two in all, one per group.
        relaxed = scenario.config_file("relaxed", version="auto")
        code, out, err = run_cli(capsys, "replay", "--config", str(relaxed))
        assert (code, out.strip()) == (0, "resubmitted 1, still failing 0"), err


@pytest.mark.slow
def test_replay_of_a_shared_topic_leaves_other_groups_records_alone(
        broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        cli_logging: None) -> None:
    topic, shared, mine = unique("items"), unique("shared.dlq"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    create_topic(broker.bootstrap_servers, shared, partitions=1)
    key, value, _ = FIXABLE_10

    def letter(offset: int, group: str | None) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
        headers = [(REASON_HEADER, b"missing_version"), (SOURCE_TOPIC_HEADER, topic.encode()),
                   (SOURCE_PARTITION_HEADER, b"0"), (SOURCE_OFFSET_HEADER, str(offset).encode())]
        return key, value, headers + ([(GROUP_HEADER, group.encode())] if group else [])

    produce_to(broker.bootstrap_servers, shared, 0, [
        letter(0, mine), letter(1, "other"), letter(2, None), letter(3, "other")])
    config = config_file(tmp_path, "c", {"bootstrap_servers": broker.bootstrap_servers,
                                         "topics": [topic], "group_id": mine,
                                         "dlq_topic": shared}, version="auto")
    code, out, err = run_cli(capsys, "list", "--config", str(config))
    assert code == 0, err
    assert [line.split("  ")[2] for line in out.splitlines()] == [
        f"group={mine}", "group=other", "group=-", "group=other"]
    code, out, err = run_cli(capsys, "replay", "--config", str(config), "--dry-run")
    assert (code, out.strip()) == (
        0, "dry run: would resubmit 2, still failing 0, 2 of other groups left alone"), err


@pytest.mark.slow
def test_the_old_shared_topic_is_read_only_when_configured(
        broker: LocalBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        cli_logging: None) -> None:
    topic, group = unique("items"), unique("g")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    create_topic(broker.bootstrap_servers, f"{topic}.dlq", partitions=1)
    key, value, _ = FIXABLE_10
    produce_to(broker.bootstrap_servers, f"{topic}.dlq", 0, [(key, value, [
        (REASON_HEADER, b"missing_version"), (SOURCE_TOPIC_HEADER, topic.encode()),
        (SOURCE_PARTITION_HEADER, b"0"), (SOURCE_OFFSET_HEADER, b"0")])])
    kafka = {"bootstrap_servers": broker.bootstrap_servers, "topics": [topic], "group_id": group}

    plain = config_file(tmp_path, "plain", kafka, version="auto")
    code, out, err = run_cli(capsys, "list", "--config", str(plain))
    assert (code, out) == (0, ""), err
    warnings = [json.loads(line)["msg"] for line in err.splitlines()
                if json.loads(line)["level"] == "warning"]
    assert any(f"{topic}.dlq" in w and "kafka.dlq_legacy_topics: true" in w for w in warnings)

    legacy = config_file(tmp_path, "legacy", {**kafka, "dlq_legacy_topics": True},
                         version="auto")
    code, out, err = run_cli(capsys, "list", "--config", str(legacy))
    assert code == 0, err
    [line] = out.splitlines()
    assert line.startswith(f"{topic}.dlq/0/0  source={topic}/0/0  group=-  "), line
    code, out, err = run_cli(capsys, "replay", "--config", str(legacy), "--dry-run")
    assert (code, out.strip()) == (0, "dry run: would resubmit 1, still failing 0"), err
