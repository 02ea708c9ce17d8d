"""Topic ids: looked up per assignment and again when a partition goes back to an
earlier offset (how a topic recreated under a running consumer shows), so the
version guard can tell the new topic's records from replays of the old one."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from embedstream.stream.topic_ids import TopicIds


@dataclass
class Described:
    topic_id: str


class FakeAdmin:
    """Answers describe_topics from ``ids`` (a missing topic fails), counting calls."""

    def __init__(self, ids: dict[str, str]) -> None:
        self.ids = ids
        self.calls = 0

    def describe_topics(self, topics: Any, request_timeout: float) -> dict[str, Future[Any]]:
        self.calls += 1
        answers: dict[str, Future[Any]] = {}
        for topic in topics.topic_names:
            future: Future[Any] = Future()
            if topic in self.ids:
                future.set_result(Described(self.ids[topic]))
            else:
                future.set_exception(KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)))
            answers[topic] = future
        return answers


def test_a_partition_read_again_from_an_earlier_offset_has_its_topic_id_looked_up_again(
) -> None:
    admin = FakeAdmin({"docs": "old-id"})
    ids = TopicIds(admin)  # type: ignore[arg-type]
    ids.refresh(["docs"])
    assert [ids.position("docs", 0, n, 1_000 + n).topic_id for n in range(40, 43)] \
        == ["old-id"] * 3
    assert admin.calls == 1, "reading forward looks nothing up"
    admin.ids["docs"] = "new-id"  # deleted and recreated: offsets start at 0 again
    first = ids.position("docs", 0, 0, 9_000)
    assert first.topic_id == "new-id" and admin.calls == 2
    assert ids.position("docs", 0, 1, 9_001).topic_id == "new-id" and admin.calls == 2


def test_no_topic_id_from_the_broker_is_unknown_not_an_error() -> None:
    admin = FakeAdmin({"docs": "AAAAAAAAAAAAAAAAAAAAAA"})  # the nil UUID: no topic ids
    ids = TopicIds(admin)  # type: ignore[arg-type]
    ids.refresh(["docs", "gone"])
    assert ids.get("docs") is None and ids.get("gone") is None
    assert ids.position("docs", 1, 5, None).topic_id is None
