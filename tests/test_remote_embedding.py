"""The remote embedder (``embed.provider: openai``) against a real HTTP server
(:mod:`embedstream.stream.app.embedding_server`, the OpenAI embeddings API backed by
the local model) that answers 429, 5xx and 400 on demand."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedstream.stream.app.embedding_server import EmbeddingServer
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import EmbedSettings, Settings
from embedstream.stream.errors import (
    EmbedderError,
    EmbedderUnavailable,
    EmbedFailures,
    FingerprintMismatch,
)
from embedstream.stream.metrics import Metrics
from embedstream.stream.remote_embedding import OpenAIEmbedder, plan_requests

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXTS = [f"Passage {i}: " + " ".join(["remote embedding of changing corpora"] * (1 + i % 7))
         for i in range(60)]


@pytest.fixture()
def api(embedding_server: EmbeddingServer) -> Iterator[EmbeddingServer]:
    embedding_server.reset()
    yield embedding_server
    embedding_server.reset()


def remote(api: EmbeddingServer, metrics: Metrics | None = None, **overrides: Any
           ) -> OpenAIEmbedder:
    settings = EmbedSettings(**{"provider": "openai", "model": MODEL, "api_base": api.url,
                                "backoff_initial_s": 0.05, **overrides})
    return OpenAIEmbedder(settings, metrics=metrics)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_requests_respect_both_size_limits() -> None:
    tokens = [5, 5, 5, 30, 1, 1, 100, 2]
    plan = plan_requests(tokens, max_inputs=3, max_tokens=40)
    assert [i for group in plan for i in group] == list(range(len(tokens)))  # in order
    assert all(len(group) <= 3 for group in plan)
    # Within the token limit, except a single text over it, which goes alone.
    assert all(sum(tokens[i] for i in g) <= 40 or len(g) == 1 for g in plan)
    assert [6] in plan


@pytest.mark.slow
def test_vectors_are_the_models_in_input_order(api: EmbeddingServer, minilm: Any) -> None:
    embedder = remote(api, request_max_inputs=7, max_concurrency=3)
    try:
        vectors = embedder.embed(TEXTS)
    finally:
        embedder.close()
    assert embedder.dimension == 384 and vectors.shape == (len(TEXTS), 384)
    cosines = np.sum(vectors * minilm.embed(TEXTS), axis=1)
    assert cosines.min() >= 0.9999
    served = [entry.inputs for entry in api.log if entry.status == 200]
    assert max(served) <= 7 and sum(served) == len(TEXTS) + 1  # and the start-up probe


@pytest.mark.slow
def test_dimensions_are_asked_for_and_checked(api: EmbeddingServer, minilm: Any) -> None:
    embedder = remote(api, dimensions=128)
    try:
        vectors = embedder.embed(TEXTS[:5])
    finally:
        embedder.close()
    local = minilm.embed(TEXTS[:5])[:, :128]
    local /= np.linalg.norm(local, axis=1, keepdims=True)
    assert vectors.shape == (5, 128)
    assert np.sum(vectors * local, axis=1).min() >= 0.9999


@pytest.mark.slow
def test_429_waits_the_retry_after_it_names(api: EmbeddingServer) -> None:
    metrics = Metrics()
    embedder = remote(api, metrics, max_concurrency=1)
    try:
        api.fail_next(429, count=2, retry_after=0.4)
        started = time.monotonic()
        vectors = embedder.embed(TEXTS[:3])
        elapsed = time.monotonic() - started
    finally:
        embedder.close()
    assert vectors.shape == (3, 384)
    assert elapsed >= 0.8  # each 429 was waited out, never retried early
    times = [entry.at for entry in api.log]
    assert min(b - a for a, b in itertools.pairwise(times[1:])) >= 0.4
    assert sample(metrics, "embedstream_embed_retries_total") == 2
    assert sample(metrics, "embedstream_embed_requests_total", outcome="throttled") == 2
    assert sample(metrics, "embedstream_embed_throttled_seconds_total",
                  cause="retry_after") >= 0.8


@pytest.mark.slow
def test_server_errors_are_retried_with_backoff(api: EmbeddingServer, minilm: Any) -> None:
    metrics = Metrics()
    embedder = remote(api, metrics)
    try:
        api.fail_next(500, count=2)
        api.fail_next(503, count=1)
        vectors = embedder.embed(TEXTS[:4])
    finally:
        embedder.close()
    assert np.sum(vectors * minilm.embed(TEXTS[:4]), axis=1).min() >= 0.9999
    assert sample(metrics, "embedstream_embed_retries_total") == 3
    assert sample(metrics, "embedstream_embed_throttled_seconds_total", cause="backoff") > 0
    assert sample(metrics, "embedstream_embed_tokens_sent_total") > 0


@pytest.mark.slow
def test_a_rejected_text_fails_alone_and_the_rest_have_vectors(
        api: EmbeddingServer, minilm: Any) -> None:
    texts = [*TEXTS[:20], "BAD input the provider refuses", *TEXTS[20:30]]
    metrics = Metrics()
    embedder = remote(api, metrics, request_max_inputs=16)
    api.reject_marker = "BAD"
    try:
        with pytest.raises(EmbedFailures) as caught:
            embedder.embed(texts)
    finally:
        embedder.close()
    assert list(caught.value.failed) == [20]
    reason, detail = caught.value.failed[20]
    assert reason == "embed_rejected" and "400" in detail
    good = [i for i in range(len(texts)) if i != 20]
    expected = minilm.embed([texts[i] for i in good])
    assert np.sum(caught.value.vectors[good] * expected, axis=1).min() >= 0.9999
    assert sample(metrics, "embedstream_embed_requests_total", outcome="rejected") >= 2


@pytest.mark.slow
def test_a_text_that_always_gets_500_fails_alone(api: EmbeddingServer) -> None:
    embedder = remote(api, max_retries=1, request_max_inputs=8)
    api.fail_marker = "CRASH"
    try:
        with pytest.raises(EmbedFailures) as caught:
            embedder.embed([*TEXTS[:5], "CRASH the server", *TEXTS[5:8]])
    finally:
        embedder.close()
    assert caught.value.failed == {5: ("embed_failed", caught.value.failed[5][1])}
    assert "500" in caught.value.failed[5][1]


@pytest.mark.slow
def test_500_for_everything_is_an_outage_not_failed_texts(api: EmbeddingServer) -> None:
    embedder = remote(api, max_retries=1, request_max_inputs=2)
    try:
        api.fail_next(500, count=10_000)  # the known-good probe fails too
        with pytest.raises(EmbedderUnavailable):
            embedder.embed(TEXTS[:6])
    finally:
        embedder.close()
    assert api.count(200) == 1  # the start-up probe only: nothing was split to single texts


@pytest.mark.slow
def test_an_outage_past_give_up_is_unavailable_not_failed(api: EmbeddingServer) -> None:
    embedder = remote(api, give_up_after_s=0.8, backoff_max_s=0.2)
    try:
        api.fail_next(503, count=1000)
        with pytest.raises(EmbedderUnavailable) as caught:
            embedder.embed(TEXTS[:3])
        assert caught.value.retry_after > 0
        api.reset()  # the provider is back: the same call now works
        assert embedder.embed(TEXTS[:3]).shape == (3, 384)
    finally:
        embedder.close()


@pytest.mark.slow
def test_a_wrong_key_fails_at_start_naming_the_setting(api: EmbeddingServer) -> None:
    api.api_key = "sk-right"
    with pytest.raises(EmbedderError, match=r"embed\.api_key"):
        remote(api, api_key="sk-wrong")
    embedder = remote(api, api_key="sk-right")  # the key goes as a bearer token
    embedder.close()


@pytest.mark.slow
def test_rate_limits_pace_requests_and_tokens(api: EmbeddingServer) -> None:
    metrics = Metrics()
    # 240 requests/min: a bucket of 4, refilled at 4/s; 12 requests need >= 2 s.
    embedder = remote(api, metrics, requests_per_minute=240, request_max_inputs=1)
    try:
        started = time.monotonic()
        embedder.embed(TEXTS[:12])
        elapsed = time.monotonic() - started
    finally:
        embedder.close()
    assert elapsed >= 1.9
    # A bucket allows its capacity at once, then the rate: 8 more take >= 2 s to answer.
    sent = sorted(entry.at for entry in api.log)[1:]  # after the probe
    assert sent[-1] - sent[0] >= 1.8
    assert sample(metrics, "embedstream_embed_throttled_seconds_total", cause="rate_limit") > 1
    # Tokens/min: 1,200 (20/s, a bucket of 20): all but the last request's tokens
    # (the bucket's 20 aside) must have flowed in before the last one goes.
    api.reset()
    # Waiting for one's own limits is not failing, however long (no call budget here).
    embedder = remote(api, metrics, tokens_per_minute=1200, request_max_inputs=2,
                      give_up_after_s=0.5)
    try:
        counts = embedder.count_tokens(TEXTS[:6])
        started = time.monotonic()
        embedder.embed(TEXTS[:6])
        elapsed = time.monotonic() - started
    finally:
        embedder.close()
    assert elapsed >= (sum(counts) - sum(counts[-2:]) - 20) / 20 * 0.95


@pytest.mark.slow
def test_the_fingerprint_keeps_providers_apart(api: EmbeddingServer, tmp_path: Path) -> None:
    store = {"path": str(tmp_path / "store"), "collection": "docs"}
    remote_settings = Settings(embed={"provider": "openai", "model": MODEL, "api_base": api.url},
                               sink=store, metrics={"enabled": False})
    pipeline = build_pipeline(remote_settings)
    try:
        assert pipeline.fingerprint.provider == "openai"
        assert pipeline.fingerprint.dimension == 384
    finally:
        pipeline.close()
    # The same model run locally makes different (if close) vectors: not mixed in.
    with pytest.raises(FingerprintMismatch, match="provider"):
        build_pipeline(Settings(embed={"model": MODEL}, sink=store,
                                metrics={"enabled": False}))


@pytest.mark.slow
def test_the_api_key_stays_secret(api: EmbeddingServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSTREAM_EMBED__PROVIDER", "openai")
    monkeypatch.setenv("EMBEDSTREAM_EMBED__API_KEY", "sk-planted-secret")
    settings = Settings()
    assert settings.embed.provider == "openai"
    assert settings.embed.api_key is not None
    assert "sk-planted-secret" not in repr(settings) + settings.model_dump_json()
    api.api_key = "sk-other"
    with pytest.raises(EmbedderError) as caught:
        remote(api, api_key=settings.embed.api_key)
    assert "sk-planted-secret" not in str(caught.value)


def test_the_ray_engine_is_refused_for_a_remote_provider(tmp_path: Path) -> None:
    from embedstream.bulk.rebuild import RebuildOptions, rebuild
    from embedstream.stream.errors import ConfigError

    settings = Settings(embed={"provider": "openai"}, sink={"path": str(tmp_path)},
                        metrics={"enabled": False})
    with pytest.raises(ConfigError, match="--engine local"):
        rebuild(settings, RebuildOptions(source=str(tmp_path / "x.jsonl"), engine="ray"))


@pytest.mark.slow
def test_a_call_budget_bounds_the_wait(api: EmbeddingServer) -> None:
    settings = EmbedSettings(provider="openai", model=MODEL, api_base=api.url,
                             requests_per_minute=60, request_max_inputs=1)
    embedder = OpenAIEmbedder(settings, call_budget_s=1.5)  # as the stream builds it
    try:
        started = time.monotonic()
        with pytest.raises(EmbedderUnavailable) as caught:
            embedder.embed(TEXTS[:10])  # one a second: 10 s of waiting
        assert time.monotonic() - started < 3.0 and caught.value.retry_after > 0
    finally:
        embedder.close()


@pytest.mark.slow
def test_nothing_is_left_running_and_no_thread_is_started(api: EmbeddingServer) -> None:
    import asyncio
    import threading

    api.reject_marker = "BAD"
    before = {t.ident for t in threading.enumerate()}
    # A host name, so it is resolved (asyncio would use a thread pool for that).
    embedder = remote(api, api_base=api.url.replace("127.0.0.1", "localhost"),
                      request_max_inputs=8, give_up_after_s=0.5)
    try:
        api.fail_next(429, count=10_000, retry_after=0.1)
        with pytest.raises(EmbedderUnavailable):
            embedder.embed(TEXTS[:8])
        assert not asyncio.all_tasks(embedder._loop)
        assert embedder._window.in_flight == 0
        api.reset()
        api.reject_marker = "BAD"
        with pytest.raises(EmbedFailures):  # a split, half of it failing
            embedder.embed([*TEXTS[:7], "BAD text"])
        assert not asyncio.all_tasks(embedder._loop)
    finally:
        embedder.close()
    # The test server's threads (one per connection) aside, none is new.
    started = [t.name for t in threading.enumerate() if t.ident not in before
               and "process_request_thread" not in t.name]
    assert not started


@pytest.mark.slow
def test_a_text_always_getting_500_is_found_within_the_streams_budget(
        api: EmbeddingServer) -> None:
    settings = EmbedSettings(provider="openai", model=MODEL, api_base=api.url,
                             request_max_inputs=8, backoff_initial_s=0.1, backoff_max_s=0.3)
    embedder = OpenAIEmbedder(settings, call_budget_s=1.5)  # default max_retries (8)
    api.fail_marker = "CRASH"
    try:
        started = time.monotonic()
        with pytest.raises(EmbedFailures) as caught:
            embedder.embed([*TEXTS[:3], "CRASH the server", *TEXTS[3:8]])
        elapsed = time.monotonic() - started
    finally:
        embedder.close()
    # Retried within the budget, then (the probe answering) split without retries.
    assert list(caught.value.failed) == [3] and caught.value.failed[3][0] == "embed_failed"
    assert elapsed < 4.0


@pytest.mark.slow
def test_a_provider_refusing_everything_is_a_configuration_error(api: EmbeddingServer) -> None:
    api.reject_marker = "dimension probe"  # the start-up probe is refused
    with pytest.raises(EmbedderError, match="one-line probe"):
        remote(api)
    api.reject_marker = None
    embedder = remote(api)
    try:
        api.reject_marker = " "  # now every text (e.g. a gateway answering 400 to all)
        with pytest.raises(EmbedderError, match="refuses even a one-line probe"):
            embedder.embed(TEXTS[:4])
    finally:
        embedder.close()


@pytest.mark.slow
def test_a_slow_provider_makes_progress_across_budgeted_calls(
        api: EmbeddingServer, minilm: Any) -> None:
    from embedstream.stream.chunking import Chunk
    from embedstream.stream.vectors import ChunkVectors

    settings = EmbedSettings(provider="openai", model=MODEL, api_base=api.url,
                             request_max_inputs=2, max_concurrency=1)
    embedder = OpenAIEmbedder(settings, call_budget_s=1.0)
    api.delay_s = 0.3  # 5 requests need 1.5 s: more than one call's budget
    texts = TEXTS[:10]
    chunks = [Chunk(i, 0, len(t), t, 10, f"hash-{i}") for i, t in enumerate(texts)]
    vectors = ChunkVectors(embedder, Metrics())
    try:
        with pytest.raises(EmbedderUnavailable) as caught:
            embedder.embed(texts)
        assert 2 <= len(caught.value.partial) < 10
        outages = 0
        while True:  # as the consumer retries a batch after backing off
            try:
                found, failed = vectors.for_chunks(chunks, [], lambda ids: {})
                break
            except EmbedderUnavailable:
                outages += 1
                assert outages < 5
    finally:
        embedder.close()
    assert outages >= 1 and not failed
    stored = np.asarray([found[c.content_hash] for c in chunks])
    assert np.sum(stored * minilm.embed(texts), axis=1).min() >= 0.9999
