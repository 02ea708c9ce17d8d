"""Model prompts (issue 23, part 1): documents get the document prompt and queries the
query prompt, taken from the model's sentence-transformers configuration or from
``embed.prompts``, in the stream, the rebuild and search, as
``SentenceTransformer.encode(texts, prompt=...)`` makes them; the document prompt is
in the fingerprint and counts against the chunk budget; the remote provider sends a
prefix or an ``input_type`` field.

The model is a tiny random BERT whose ``config_sentence_transformers.json`` declares
``{"query": "query: ", "document": "passage: "}``: its vectors mean nothing, but a
prompt moves them far enough to tell which one was used."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from embedstream.bulk.encoder import RemoteEncoder
from embedstream.bulk.rebuild import RebuildOptions, rebuild
from embedstream.stream.app.broker import LocalBroker
from embedstream.stream.app.query_jobs import QueryJob, embed_jobs
from embedstream.stream.app.service import build_consumer, build_pipeline
from embedstream.stream.config import EmbedSettings, PromptSettings, Settings
from embedstream.stream.embedding import chunk_max_tokens, prompt_tokens
from embedstream.stream.errors import ConfigError, FingerprintMismatch
from embedstream.stream.filters import Filter
from embedstream.stream.local_encoder import LocalEncoder, model_prompts
from embedstream.stream.metrics import Metrics
from embedstream.stream.remote_embedding import OpenAIEmbedder

from .conftest import build_tiny_model
from .streamkit import create_topic, produce, run_until, unique

DOCUMENT, QUERY = "passage: ", "query: "
TEXTS = ["Storm shell: a waterproof jacket for hiking in heavy rain.",
         "A burr grinder with 40 grind settings.", "", "cold birds in Antarctica " * 20]
# Random weights: equal vectors agree to float noise, a different prompt is far off.
SAME, APART = 1e-5, 1e-3


def with_prompts(directory: Path, tokenizer_dir: str, *, include_prompt: bool = True) -> Path:
    """The tiny model with the prompts declared as sentence-transformers saves them."""
    build_tiny_model(directory, tokenizer_dir)
    (directory / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY, "document": DOCUMENT}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"}))
    if not include_prompt:  # as INSTRUCTOR-style models pool: without the prompt's tokens
        pooling = directory / "1_Pooling" / "config.json"
        pooling.write_text(json.dumps({**json.loads(pooling.read_text()),
                                       "include_prompt": False}))
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    return with_prompts(tmp_path_factory.mktemp("prompted-model"), minilm_path)


@pytest.fixture(scope="module")
def stock(model_dir: Path) -> Any:
    """sentence-transformers itself, the reference."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")


def reference(stock: Any, texts: Sequence[str], prompt: str) -> np.ndarray:
    return np.asarray(stock.encode(list(texts), prompt=prompt, normalize_embeddings=True))


def assert_made_with(vectors: np.ndarray, stock: Any, texts: Sequence[str], prompt: str,
                     other: str, apart: float = APART) -> None:
    """``vectors`` are ``texts`` embedded with ``prompt``, and not with ``other``."""
    assert np.abs(vectors - reference(stock, texts, prompt)).max() < SAME
    assert np.abs(vectors - reference(stock, texts, other)).max(axis=1).min() > apart


# -- which prompt: settings over the model's own ------------------------------------------


def test_the_models_own_prompts_are_found_as_sentence_transformers_names_them() -> None:
    unset = PromptSettings()

    def model(prompts: dict[str, str], default: str | None = None) -> Any:
        return SimpleNamespace(prompts=prompts, default_prompt_name=default)

    assert model_prompts(model({"query": "q: ", "document": "d: "}), unset) == ("d: ", "q: ")
    # e5 names its document prompt "passage"; sentence-transformers 6 adds empty
    # "query"/"document" entries to every model, which say nothing.
    assert model_prompts(model({"query": "q: ", "document": "", "passage": "p: "}),
                         unset) == ("p: ", "q: ")
    assert model_prompts(model({"corpus": "c: "}), unset) == ("c: ", "")
    # default_prompt_name applies to whatever has no prompt of its own.
    assert model_prompts(model({"query": "q: ", "all": "a: "}, "all"), unset) == ("a: ", "q: ")
    assert model_prompts(model({"query": "", "document": ""}), unset) == ("", "")
    assert model_prompts(SimpleNamespace(), unset) == ("", "")
    # Set, embed.prompts wins; "" means none, whatever the model says.
    both = model({"query": "q: ", "document": "d: "})
    assert model_prompts(both, PromptSettings(document="", query="search: ")) == ("", "search: ")
    assert model_prompts(both, PromptSettings(query="")) == ("d: ", "")


def test_input_type_is_for_the_remote_provider_only() -> None:
    with pytest.raises(ValueError, match="input_type applies to provider openai"):
        EmbedSettings(input_type={"document": "search_document"})
    with pytest.raises(ValueError, match="already sends"):
        EmbedSettings(provider="openai", input_type={"key": "model", "document": "d"})
    settings = Settings(embed={"prompts": {"document": DOCUMENT}})
    assert settings.embed.prompts == PromptSettings(document=DOCUMENT, query=None)


# -- the local encoder -------------------------------------------------------------------


@pytest.mark.slow
def test_documents_and_queries_get_their_prompt_as_sentence_transformers_gives_it(
        model_dir: Path, stock: Any) -> None:
    encoder = LocalEncoder(str(model_dir), device="cpu", backend="torch", precision="fp32")
    assert (encoder.document_prompt, encoder.query_prompt) == (DOCUMENT, QUERY)
    assert_made_with(encoder.embed(TEXTS), stock, TEXTS, DOCUMENT, QUERY)
    assert_made_with(encoder.embed_queries(TEXTS), stock, TEXTS, QUERY, DOCUMENT)
    # The bulk engine's path: tokenize, then encode packed batches.
    assert np.abs(encoder.encode(encoder.tokenize(TEXTS))
                  - reference(stock, TEXTS, DOCUMENT)).max() < SAME
    # embed.prompts overrides the model's, each side on its own.
    mine = LocalEncoder(str(model_dir), device="cpu", backend="torch", precision="fp32",
                        prompts=PromptSettings(document="", query="search_query: "))
    assert (mine.document_prompt, mine.query_prompt) == ("", "search_query: ")
    assert_made_with(mine.embed(TEXTS), stock, TEXTS, "", DOCUMENT)
    assert_made_with(mine.embed_queries(TEXTS), stock, TEXTS, "search_query: ", QUERY)


@pytest.mark.slow
def test_a_pooling_that_leaves_the_prompt_out_is_honoured_on_torch_only(
        tmp_path: Path, minilm_path: str) -> None:
    from sentence_transformers import SentenceTransformer

    directory = with_prompts(tmp_path / "instructor-like", minilm_path, include_prompt=False)
    stock = SentenceTransformer(str(directory), device="cpu")
    # auto would measure onnx/openvino candidates too: their graphs pool every token.
    encoder = LocalEncoder(str(directory), device="cpu", backend="auto", precision="fp32",
                           cache=tmp_path / "cache")
    assert {c.backend for c in encoder._choices} == {"torch"}
    # Left out of pooling, a prompt acts through attention only: less apart, short texts.
    short, apart = TEXTS[:3], 1e-4
    assert_made_with(encoder.embed(short), stock, short, DOCUMENT, QUERY, apart)
    assert_made_with(encoder.embed_queries(short), stock, short, QUERY, DOCUMENT, apart)
    assert_made_with(encoder.embed(short), stock, short, DOCUMENT, "", apart)
    with pytest.raises(ConfigError, match="include_prompt"):
        LocalEncoder(str(directory), device="cpu", backend="onnx", precision="fp32")


@pytest.mark.slow
def test_the_chunk_budget_leaves_room_for_the_prompt(model_dir: Path) -> None:
    encoder = LocalEncoder(str(model_dir), device="cpu", backend="torch", precision="fp32")
    used = prompt_tokens(encoder.tokenizer, DOCUMENT)
    assert used == len(encoder.tokenize(["x"])[0]) - len(encoder.tokenizer("x")["input_ids"]) > 0
    # max_seq_length 128: [CLS] and [SEP] and the prompt's tokens come off it.
    assert chunk_max_tokens(256, encoder) == 128 - 2 - used
    assert chunk_max_tokens(64, encoder) == 64 - used
    with pytest.raises(ConfigError, match=r"embed\.prompts\.document"):
        chunk_max_tokens(used + 4, encoder)


# -- the stream, search and the fingerprint -----------------------------------------------


def stream_settings(broker: LocalBroker, topic: str, store: Path, model: Path,
                    **embed: Any) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": broker.bootstrap_servers, "topics": [topic],
               "group_id": unique("g"), "options": {"session.timeout.ms": 6000}},
        source={"format": "native"},
        embed={"model": str(model), "backend": "torch", "precision": "fp32", **embed},
        sink={"path": str(store), "collection": "docs", "flush_interval_ms": 100},
        metrics={"enabled": False}, query={"enabled": False})


LONG = " ".join(f"Sentence {i} of a long document about penguins and their ice." for i in range(60))
DOCS = {"d1": TEXTS[0], "d2": TEXTS[1], "d3": LONG}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_stream_embeds_documents_and_search_embeds_queries_with_their_prompts(
        broker: LocalBroker, tmp_path: Path, model_dir: Path, stock: Any) -> None:
    topic = unique("prompts")
    create_topic(broker.bootstrap_servers, topic, partitions=1)
    produce(broker.bootstrap_servers, topic, [
        (doc.encode(), json.dumps({"id": doc, "text": text, "version": 1}).encode())
        for doc, text in DOCS.items()])
    settings = stream_settings(broker, topic, tmp_path / "store", model_dir)
    pipeline = build_pipeline(settings)
    stream = build_consumer(pipeline, Metrics(), follow_alias=False)
    try:
        run_until(stream, lambda: stream.committed.get((topic, 0), 0) >= len(DOCS), 60)
        assert pipeline.fingerprint.prompt == DOCUMENT
        points = list(pipeline.sink.points())
        texts = [str(p.payload["text"]) for p in points]
        assert {p.payload["doc_id"] for p in points} == set(DOCS)
        assert len(points) > len(DOCS)  # the long document was cut
        # Every chunk fits the model with its prompt: nothing was truncated away.
        joined = pipeline.embedder.tokenizer([DOCUMENT + t for t in texts])["input_ids"]
        assert max(map(len, joined)) <= pipeline.embedder.max_seq_length
        stored = np.asarray([p.vector for p in points], np.float32)
        assert_made_with(stored, stock, texts, DOCUMENT, QUERY)
        # Search (query_jobs, what `embedstream search` and the query endpoint run).
        queries = ["penguins on the ice", "a jacket for the rain"]
        vectors = embed_jobs(pipeline.embedder, [QueryJob(i, q, Filter())
                                                 for i, q in enumerate(queries)])
        assert_made_with(vectors, stock, queries, QUERY, DOCUMENT)
    finally:
        stream.close()
        pipeline.close()
    # A consumer that puts another document prompt in front is refused, naming it.
    other = stream_settings(broker, topic, tmp_path / "store", model_dir,
                            prompts={"document": ""})
    with pytest.raises(FingerprintMismatch, match=r"prompt: 'passage: ' \(in the collection\)"):
        build_pipeline(other).close()
    # The query prompt is no part of it: changing it needs no rebuild.
    same = stream_settings(broker, topic, tmp_path / "store", model_dir,
                           prompts={"query": "search: "})
    build_pipeline(same).close()


# -- the rebuild -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_rebuild_embeds_documents_with_the_document_prompt(
        tmp_path: Path, model_dir: Path, stock: Any) -> None:
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in DOCS.items()))
    settings = Settings(source={"text_fields": ["text"]},
                        embed={"model": str(model_dir), "backend": "torch", "precision": "fp32"},
                        sink={"path": str(tmp_path / "store"), "collection": "docs"},
                        metrics={"enabled": False})
    report = rebuild(settings, RebuildOptions(source=str(source), handover=False))
    assert report.documents == len(DOCS) and report.failures == 0
    pipeline = build_pipeline(settings)  # the stream takes it over: same fingerprint
    try:
        assert pipeline.fingerprint.prompt == DOCUMENT
        points = list(pipeline.sink.points())
        assert len(points) == report.chunks > len(DOCS)
        texts = [str(p.payload["text"]) for p in points]
        assert_made_with(np.asarray([p.vector for p in points], np.float32), stock, texts,
                         DOCUMENT, QUERY)
    finally:
        pipeline.close()


# -- the remote provider -----------------------------------------------------------------


class Recorder:
    """An OpenAI-compatible API in process (httpx's transport seam): answers every
    request with unit vectors and keeps the request bodies."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        data = [{"index": i, "embedding": [1.0, 0.0, 0.0, 0.0]} for i in range(len(body["input"]))]
        return httpx.Response(200, json={"data": data, "usage": {"total_tokens": 1}})


@pytest.fixture()
def recorder() -> Iterator[Recorder]:
    yield Recorder()


def remote(recorder: Recorder, **embed: Any) -> OpenAIEmbedder:
    settings = EmbedSettings(provider="openai", model="m", api_base="http://api.invalid/v1",
                             **embed)
    return OpenAIEmbedder(settings, transport=httpx.MockTransport(recorder))


def test_the_remote_provider_sends_the_prompts_as_prefixes(recorder: Recorder) -> None:
    embedder = remote(recorder, prompts={"document": DOCUMENT, "query": QUERY})
    try:
        assert embedder.document_prompt == DOCUMENT
        assert embedder.revision == "tokenizer=sentence-transformers/all-MiniLM-L6-v2"
        recorder.bodies.clear()
        embedder.embed(["a chunk"])
        embedder.embed_queries(["a question"])
        assert [b["input"] for b in recorder.bodies] == [["passage: a chunk"],
                                                         ["query: a question"]]
        assert all("input_type" not in b for b in recorder.bodies)
        # Counted as sent, against the API's token limits and the chunk budget.
        bare = embedder.count_tokens(["a chunk"], query=False)[0] \
            - prompt_tokens(embedder.tokenizer, DOCUMENT)
        assert bare == len(embedder.tokenizer("a chunk", add_special_tokens=False)["input_ids"])
        assert chunk_max_tokens(256, embedder) == 256 - prompt_tokens(embedder.tokenizer,
                                                                      DOCUMENT)
        # The rebuild's stand-in for a model carries it too.
        bulk = RemoteEncoder(embedder)
        assert bulk.document_prompt == DOCUMENT
        assert len(bulk.tokenize(["a chunk"])[0]) == embedder.count_tokens(["a chunk"])[0]
    finally:
        embedder.close()


def test_the_remote_provider_sends_input_type_under_its_key(recorder: Recorder) -> None:
    embedder = remote(recorder, input_type={"key": "task", "document": "retrieval.passage",
                                            "query": "retrieval.query"})
    try:
        assert embedder.document_prompt == ""
        # Vectors made with another input_type are not comparable: the fingerprint's
        # revision says which (unset, it reads as before the setting existed).
        assert embedder.revision.endswith(";task=retrieval.passage")
        recorder.bodies.clear()
        embedder.embed(["a chunk"])
        embedder.embed_queries(["a question"])
        assert [(b["input"], b["task"]) for b in recorder.bodies] == [
            (["a chunk"], "retrieval.passage"), (["a question"], "retrieval.query")]
    finally:
        embedder.close()
    # The probe at start is a document request: a provider refusing the field fails then.
    probed = Recorder()
    embedder = remote(probed, input_type={"document": "search_document"})
    embedder.close()
    assert probed.bodies[0]["input_type"] == "search_document"
    assert embedder.revision.endswith(";input_type=search_document")
