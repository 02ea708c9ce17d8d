"""A dead letter always fits the dead-letter topic, and the stream goes on.

A message with about 1 MB of headers (or a huge key) used to stop the consumer
at every restart: Kafka refused its dead letter even without the value. Now the
record is shrunk to the producer's ``message.max.bytes`` before it is sent (the
largest part first; what was cut is noted with its original size) or, if Kafka
refuses it anyway, replaced by a minimal record; ``dlq list`` shows what was cut
and ``dlq replay`` never resubmits such a record.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, Producer
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.dlq import list_dead_letters, read_dead_letters, replay_dead_letters
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import Settings
from embedstream.stream.dead_letters import DeadLetters, fit
from embedstream.stream.metrics import Metrics

from .conftest import hypothesis_examples
from .streamkit import create_topic, produce, read_all, run_until, unique

MB = 1_000_000
LIMIT = MB - 512  # what DeadLetters allows under librdkafka's default message.max.bytes
OWN = 300  # about what our own headers take
NOTES = 3 * 64  # room fit() keeps for its notes


def native(doc: str, text: str) -> tuple[bytes, bytes]:
    return doc.encode(), json.dumps({"id": doc, "text": text, "version": 1}).encode()


def record_size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(n) + len(v) + 8 for n, v in headers)


# -- what is cut (pure) -----------------------------------------------------------------


def test_a_huge_header_goes_and_the_small_value_and_other_headers_stay() -> None:
    headers = [("traceparent", b"00-4bf92f35-01"), ("blob", b"h" * MB)]
    fitted = fit(b"doc-1", b"not json {", headers, OWN, 900_000, LIMIT)
    assert (fitted.key, fitted.value) == (b"doc-1", b"not json {")
    assert fitted.headers == [("traceparent", b"00-4bf92f35-01")]
    assert fitted.notes == [("embedstream.dlq.headers_dropped", str(4 + MB).encode())]


def test_a_huge_key_is_cut_and_the_value_stays() -> None:
    fitted = fit(b"k" * 1_200_000, b"not json {", [], OWN, 900_000, LIMIT)
    assert fitted.value == b"not json {"
    assert fitted.key is not None and 0 < len(fitted.key) <= LIMIT - OWN
    assert fitted.notes == [("embedstream.dlq.key_truncated", b"1200000")]


def test_headers_go_before_the_value_and_it_is_cut_last() -> None:
    headers = [("a", b"x" * 500_000), ("b", b"y" * 500_000)]
    fitted = fit(b"k", b"v" * 600_000, headers, OWN, 900_000, LIMIT)
    assert fitted.value == b"v" * 600_000 and fitted.headers == []
    assert fitted.notes == [("embedstream.dlq.headers_dropped", b"1000002")]
    fitted = fit(b"k", b"v" * 1_200_000, headers, OWN, 1_200_000, LIMIT)
    assert fitted.key == b"" and fitted.headers == []
    assert fitted.value == b"v" * (LIMIT - OWN - NOTES)


part = st.integers(0, 1_500_000)


@hypothesis_settings(max_examples=hypothesis_examples(200), deadline=None)
@given(key=st.none() | part, value=st.none() | part, sizes=st.lists(part, max_size=5),
       cap=st.integers(0, 1_200_000))
def test_a_fitted_record_is_within_the_limit_and_says_what_it_lost(
        key: int | None, value: int | None, sizes: list[int], cap: int) -> None:
    raw_key = None if key is None else b"k" * key
    raw_value = None if value is None else b"v" * value
    headers = [(f"h{i}", b"x" * size) for i, size in enumerate(sizes)]
    fitted = fit(raw_key, raw_value, headers, OWN, cap, LIMIT)
    assert record_size(fitted.key, fitted.value, fitted.headers) <= LIMIT - OWN - NOTES
    notes = dict(fitted.notes)
    # Cut parts are prefixes, kept headers untouched and in order; each loss is noted.
    if raw_value is not None:
        assert fitted.value is not None and raw_value.startswith(fitted.value)
        assert (fitted.value != raw_value) == ("embedstream.dlq.truncated" in notes)
        if fitted.value != raw_value:
            assert notes["embedstream.dlq.truncated"] == str(len(raw_value)).encode()
    if raw_key is not None:
        assert fitted.key is not None and raw_key.startswith(fitted.key)
        if fitted.key != raw_key:
            assert notes["embedstream.dlq.key_truncated"] == str(len(raw_key)).encode()
    assert fitted.headers == [h for h in headers if h in fitted.headers]
    capped = None if raw_value is None else raw_value[:cap]
    if fitted.value != capped:  # the value is cut last
        assert not fitted.key and fitted.headers == []
    if fitted.key != raw_key:  # after the headers larger than the key
        assert all(len(v) + 2 + 8 <= len(raw_key or b"") for _, v in fitted.headers)
    dropped = sum(len(n) + len(v) for n, v in headers if (n, v) not in fitted.headers)
    assert notes.get("embedstream.dlq.headers_dropped") == (
        str(dropped).encode() if len(fitted.headers) < len(headers) else None)
    if record_size(raw_key, raw_value, headers) <= LIMIT - OWN - NOTES and \
            (raw_value is None or len(raw_value) <= cap):
        assert (fitted.key, fitted.value, fitted.headers, fitted.notes) == \
            (raw_key, raw_value, headers, [])


# -- on the real broker ------------------------------------------------------------------


def settings_for(broker: LocalBroker, topic: str, tmp_path: Path, model: Path) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        embed={"model": str(model)},
        sink={"path": str(tmp_path / "store"), "collection": "docs", "flush_interval_ms": 0},
        metrics={"enabled": False},
    )


def produce_large(bootstrap: str, topic: str,
                  records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 5 * MB})
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0


@pytest.mark.slow
def test_huge_headers_or_key_are_dead_lettered_and_the_stream_goes_on(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    topic = unique("huge-headers")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = settings_for(broker, topic, tmp_path, tiny_model_dir)
    sentence = "Otters hold hands while they sleep."
    produce(broker.bootstrap_servers, topic, [native("a", sentence)])
    produce_large(broker.bootstrap_servers, topic, [
        (b"with-headers", b"not json {",
         [("traceparent", b"00-4bf92f35-01"), ("blob", b"h" * MB)]),
        (b"k" * 1_200_000, b"not json {", []),
    ])
    produce(broker.bootstrap_servers, topic, [native("b", sentence)])
    pipeline = build_pipeline(settings)
    metrics = Metrics()
    stream = build_consumer(pipeline, metrics)
    try:
        run_until(stream, lambda: stream.committed.get((topic, 0), 0) >= 4, 90,
                  "the offsets to be committed past both huge messages")
        stored = pipeline.sink.document_states(["a", "b"])
    finally:
        stream.close()
        pipeline.close()

    assert set(stored) == {"a", "b"}, "the messages after the huge ones are indexed"
    by_offset = {int(dict(d.headers())["embedstream.source.offset"]): d
                 for d in read_all(broker.bootstrap_servers,
                                   settings.kafka.dlq_topic_for(topic), 2)}
    assert set(by_offset) == {1, 2}
    headers_one, key_one = by_offset[1], by_offset[2]
    notes = dict(headers_one.headers())
    assert notes["embedstream.error.reason"] == b"invalid_json"
    assert notes["embedstream.source.topic"] == topic.encode()
    assert notes["embedstream.source.partition"] == b"0"
    assert notes["embedstream.dlq.headers_dropped"] == str(4 + MB).encode()
    assert notes["traceparent"] == b"00-4bf92f35-01" and "blob" not in notes
    assert (headers_one.key(), headers_one.value()) == (b"with-headers", b"not json {")
    notes = dict(key_one.headers())
    assert notes["embedstream.error.reason"] == b"invalid_json"
    assert notes["embedstream.dlq.key_truncated"] == b"1200000"
    assert key_one.value() == b"not json {" and b"k" * 1000 in key_one.key()
    assert metrics.registry.get_sample_value(
        "embedstream_dlq_records_total", {"reason": "invalid_json", "route": "default"}) == 2
    assert metrics.registry.get_sample_value("embedstream_dlq_truncated_records_total") == 2

    # `dlq list` says what was cut; `dlq replay` resubmits neither.
    letters = {letter.source.offset: letter for letter in read_dead_letters(settings)
               if letter.source is not None}
    assert dict(letters[1].dropped) == {"headers": 4 + MB} and letters[1].truncated
    assert dict(letters[2].dropped) == {"key": 1_200_000} and letters[2].truncated
    out = io.StringIO()
    list_dead_letters(settings, out)
    assert f"cut=headers:{4 + MB}" in out.getvalue() and "cut=key:1200000" in out.getvalue()
    report = replay_dead_letters(settings)
    assert report.resubmitted == 0 and dict(report.still_failing) == {"truncated_in_dlq": 2}


@pytest.mark.slow
def test_a_record_kafka_refuses_anyway_goes_minimal_and_is_never_replayed(
        broker: LocalBroker, tmp_path: Path, tiny_model_dir: Path) -> None:
    """The producer's own limit is below what the dead letters were told (as a broker's
    or topic's limit can be): the send is refused, and the minimal record goes instead."""
    topic = unique("refused")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    settings = settings_for(broker, topic, tmp_path, tiny_model_dir)
    produce(broker.bootstrap_servers, topic, [(b"doc-9", b"x" * 5000)])
    [message] = read_all(broker.bootstrap_servers, topic, 1)
    strict = Producer({"bootstrap.servers": broker.bootstrap_servers,
                       "message.max.bytes": 2000})
    dead_letters = DeadLetters(strict, settings.kafka)
    try:
        assert dead_letters.send(message, "invalid_json", "Expecting value") is True
        dead_letters.flush()
    finally:
        dead_letters.close()

    [record] = read_all(broker.bootstrap_servers, settings.kafka.dlq_topic_for(topic), 1)
    notes = dict(record.headers())
    assert record.key() is None and record.value() == b""  # a value, empty: no tombstone
    assert notes["embedstream.error.reason"] == b"invalid_json"
    assert notes["embedstream.source.offset"] == b"0"
    assert notes["embedstream.dlq.truncated"] == b"5000"
    assert notes["embedstream.dlq.key_truncated"] == b"5"
    report = replay_dead_letters(settings)
    assert report.resubmitted == 0 and dict(report.still_failing) == {"truncated_in_dlq": 1}


# -- a broker that refuses after the producer let it pass --------------------------------


class RefusingProducer:
    """Stands in for a producer whose broker refuses records over ``broker_limit`` bytes
    at delivery (the bundled broker has no size limit, so this cannot happen there)."""

    def __init__(self, broker_limit: int) -> None:
        self.broker_limit = broker_limit
        self.queued: list[tuple[dict[str, Any], Any]] = []
        self.accepted: list[dict[str, Any]] = []

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]], on_delivery: Any) -> None:
        record = {"key": key, "value": value, "headers": dict(headers),
                  "size": record_size(key, value, headers)}
        self.queued.append((record, on_delivery))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        queued, self.queued = self.queued, []
        for record, on_delivery in queued:
            if record["size"] > self.broker_limit:
                on_delivery(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
            else:
                self.accepted.append(record)
                on_delivery(None, None)
        return 0


class FakeMessage:
    def __init__(self, key: bytes, value: bytes) -> None:
        self._key, self._value = key, value

    def topic(self) -> str:
        return "orders"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 41

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return [("trace", b"t" * 100)]


def test_a_record_the_broker_refuses_at_delivery_is_sent_again_minimal() -> None:
    producer: Any = RefusingProducer(broker_limit=20_000)
    message: Any = FakeMessage(b"order-7", b"v" * 50_000)
    dead_letters = DeadLetters(producer, Settings().kafka)
    dead_letters.send(message, "invalid_json", "Expecting value")
    dead_letters.flush()  # no error: the minimal record was delivered
    [minimal] = producer.accepted
    assert minimal["key"] is None and minimal["value"] == b""
    assert minimal["headers"]["embedstream.source.offset"] == b"41"
    assert minimal["headers"]["embedstream.dlq.truncated"] == b"50000"
    assert minimal["headers"]["embedstream.dlq.headers_dropped"] == b"105"
    assert minimal["headers"]["embedstream.dlq.key_truncated"] == b"7"
