"""What a bulk rebuild embeds with: the local model, or a remote API in its place.

The local model is :class:`~embedstream.stream.local_encoder.LocalEncoder`, the
same encoder the stream runs, on the backend and precision chosen for this machine
(one choice for both: a backlog drains at rebuild speed). :class:`RemoteEncoder`
puts an OpenAI-compatible API where the engine expects a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from embedstream.stream.local_encoder import LocalEncoder
from embedstream.stream.remote_embedding import OpenAIEmbedder

__all__ = ["AnyEncoder", "LocalEncoder", "RemoteEncoder"]


class RemoteEncoder:
    """A remote embedding API (``embed.provider: openai``) in the bulk engine's place of
    a model: the engine hands it whole texts (it batches, limits and retries them itself,
    :class:`~embedstream.stream.remote_embedding.OpenAIEmbedder`); token ids only count tokens.

    ``embed`` raises :class:`~embedstream.stream.errors.EmbedFailures` when some texts fail
    for good; the engine routes their records to the rebuild's failure list."""

    device = "remote"
    backend = "remote"
    precision = "remote"
    batch_tokens = 0

    def __init__(self, embedder: OpenAIEmbedder) -> None:
        self.embedder = embedder
        self.model_name = embedder.model_name
        self.revision = embedder.revision
        self.dimension = embedder.dimension
        self.tokenizer: Any = embedder.tokenizer
        self.max_seq_length = embedder.max_seq_length
        self.document_prompt = embedder.document_prompt
        self.calibration: dict[str, float] = {}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # With the document prompt, so the counts the API's limits see are whole.
        return self.embedder.token_ids(texts)

    def calibrate(self, sample: Sequence[list[int]]) -> str:
        return self.precision

    def embed(self, texts: Sequence[str],
              token_counts: Sequence[int] | None = None) -> npt.NDArray[np.float32]:
        return self.embedder.embed(texts, token_counts)

    def embed_queries(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return self.embedder.embed_queries(texts)

    def close(self) -> None:
        self.embedder.close()


# What the bulk engine and rebuild run on: a local model or a remote API.
AnyEncoder = LocalEncoder | RemoteEncoder
