"""``retrieval.sparse: splade`` with a tiny random SPLADE model built here (an MLM head
and max pooling, as sentence-transformers' ``SparseEncoder`` saves it): the plumbing,
not the ranking quality (no real SPLADE model can be had offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream._splade import SpladeEncoder
from embedstream.stream.app.service import build_pipeline
from embedstream.stream.config import RetrievalSettings, Settings
from embedstream.stream.errors import ConfigError


@pytest.fixture(scope="module")
def splade_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    base = tmp_path_factory.mktemp("mlm")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path_factory.mktemp("splade")
    SparseEncoder(modules=[MLMTransformer(str(base)), SpladePooling("max")]).save(str(out))
    return out


def test_a_documents_vector_is_the_maximum_over_its_chunks(splade_dir: Path) -> None:
    from sentence_transformers import SparseEncoder

    encoder = SpladeEncoder(RetrievalSettings(sparse="splade", splade_model=str(splade_dir)),
                            "cpu")
    chunks = ["Sea otters hold hands.", "They sleep on the water.", "Kelp keeps them still."]
    document = encoder.encode_document(" ".join(chunks), chunks)
    reference = SparseEncoder(str(splade_dir), device="cpu").encode_document(
        chunks, convert_to_tensor=True, convert_to_sparse_tensor=False).max(dim=0).values
    dense = np.zeros(reference.shape[0], dtype=np.float32)
    dense[list(document.indices)] = document.values
    np.testing.assert_allclose(dense, reference.numpy(), rtol=1e-5, atol=1e-6)
    assert document and list(document.indices) == sorted(document.indices)
    assert encoder.encode_query("why do otters hold hands")
    assert encoder.spec == f"splade(model={splade_dir})"


def test_a_rebuild_with_splade_stores_model_weights_without_idf(
        tmp_path: Path, tiny_model_dir: Path, splade_dir: Path) -> None:
    texts = {"otters": "Sea otters hold hands while they sleep.",
             "volcano": "A volcano erupts when pressure builds up.",
             "bread": "Sourdough rises because wild yeast ferments the dough."}
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    settings = Settings(source={"id_fields": ["id"], "text_fields": ["text"]},
                        embed={"model": str(tiny_model_dir), "backend": "torch",
                               "precision": "fp32"},
                        sink={"path": str(tmp_path / "store"), "collection": "docs"},
                        retrieval={"sparse": "splade", "splade_model": str(splade_dir)},
                        metrics={"enabled": False})
    report = rebuild(settings, RebuildOptions(source=str(corpus), handover=False))
    assert report.documents == 3
    pipeline = build_pipeline(settings)
    try:
        assert pipeline.sparse is not None and pipeline.sink.sparse
        query = pipeline.sparse.encode_query("otters sleep")
        hits = pipeline.sink.search_sparse(query, 3)
        stored = {d.doc_id: d.sparse for d in pipeline.sink.documents()}
        assert set(stored) == set(texts)
        for hit in hits:  # the plain dot product: no IDF on model weights
            vector = stored[str(hit.payload["doc_id"])]
            weights = dict(zip(vector.indices, vector.values, strict=True))
            dot = sum(v * weights.get(i, 0.0) for i, v in zip(query.indices, query.values,
                                                               strict=True))
            assert hit.score == pytest.approx(dot, rel=1e-4)
    finally:
        pipeline.close()


def test_splade_without_a_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"retrieval\.splade_model"):
        SpladeEncoder(RetrievalSettings(sparse="splade"), "cpu")
    with pytest.raises(ConfigError, match=r"retrieval\.splade_model"):
        SpladeEncoder(RetrievalSettings(sparse="splade", splade_model="/no/such/model"), "cpu")
