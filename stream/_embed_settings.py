"""The ``embed`` section: where vectors come from (a local sentence-transformers model or
an OpenAI-compatible API), on which backend and in what precision, and how close to torch
fp32 a backend that ``auto`` chooses must stay."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from embedstream.stream._prompt_settings import InputTypeSettings, PromptSettings
from embedstream.stream._section import Section
from embedstream.stream.redact import checked_header_secret

__all__ = ["EmbedSettings", "QualityGuardSettings"]


class QualityGuardSettings(Section):
    """How close to torch fp32 a backend chosen by ``auto`` must stay, in cosine
    similarity over the calibration texts."""

    mean_cosine: float = Field(default=0.99, gt=0, le=1)
    p01_cosine: float = Field(default=0.98, gt=0, le=1)  # the 1st percentile


# What each backend runs (the rest is refused at start, naming the pair).
_BACKEND_PRECISIONS = {"torch": {"fp32", "bf16", "fp16"}, "onnx": {"fp32", "int8"},
                       "openvino": {"fp32", "bf16", "fp16"}}


class EmbedSettings(Section):
    """Where vectors come from: a local sentence-transformers model (``provider: local``,
    the default) or an OpenAI-compatible ``/embeddings`` API (``provider: openai``:
    OpenAI, Azure OpenAI, TEI, vLLM, Infinity, Ollama). The fields after
    ``max_wait_ms`` apply to ``openai`` only."""

    provider: Literal["local", "openai"] = "local"
    # local: a sentence-transformers name or directory; openai: the API's model name.
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    # local: where the forward pass runs and in what precision, for the stream, the
    # rebuild and search alike. "auto" measures the candidates once per machine, model
    # and library versions on real texts and keeps the fastest that passes
    # quality_guard (README "Backends"); onnx and openvino need their extras.
    backend: Literal["auto", "torch", "onnx", "openvino"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"
    quality_guard: QualityGuardSettings = QualityGuardSettings()
    # Exported models and the backend decision; unset: $EMBEDSTREAM_CACHE_DIR, else
    # $XDG_CACHE_HOME/embedstream. The chart puts it on the persistent volume.
    cache_dir: Path | None = None
    # Texts the stream embeds on torch fp32 before it measures (when no decision is kept).
    calibration_texts: int = Field(default=64, ge=8)
    # Tokens per stream micro-batch (forward passes pack at most bulk.batch_tokens).
    max_batch_tokens: int = Field(default=8192, ge=16)
    # adaptive: a micro-batch closes as soon as nothing more is waiting to be read, or
    # when full, or max_wait_ms after its first message; fixed: when full or at max_wait_ms.
    batching: Literal["adaptive", "fixed"] = "adaptive"
    max_wait_ms: int = Field(default=50, ge=0)
    # What goes in front of documents and queries (both providers); see PromptSettings.
    # The document prompt is part of the collection's fingerprint (changing it needs a
    # rebuild) and its tokens count against chunk.max_tokens.
    prompts: PromptSettings = PromptSettings()
    # -- openai ------------------------------------------------------------------
    # Base URL up to the API version ("/embeddings" is appended), e.g.
    # https://api.openai.com/v1, http://tei:8080/v1, or for Azure
    # https://RESOURCE.openai.azure.com/openai/deployments/DEPLOYMENT.
    api_base: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    _usable_key = field_validator("api_key")(checked_header_secret)
    # Header the key goes in: "Authorization" sends "Bearer KEY"; Azure wants "api-key".
    api_key_header: str = Field(default="Authorization", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    # Query parameters on every request (Azure: {"api-version": "2024-10-21"}).
    query_params: dict[str, str] = Field(default_factory=dict)
    # Output size for models that can shorten their vectors (Matryoshka, e.g.
    # text-embedding-3-*); unset: the model's own, asked once at start.
    dimensions: int | None = Field(default=None, ge=1)
    # Tokenizer for chunking and for counting tokens against the limits (a Hugging
    # Face name or directory); unset: the bundled all-MiniLM-L6-v2 one. Counts from
    # another tokenizer are estimates; the usage the API reports corrects them.
    tokenizer: str | None = None
    # Longest input the model takes, in tokens (chunks are cut below it).
    max_input_tokens: int = Field(default=8191, ge=8)
    # Request size limits: inputs and (estimated) tokens per request.
    request_max_inputs: int = Field(default=96, ge=1)
    request_max_tokens: int = Field(default=300_000, ge=1)
    # Requests in flight at once.
    max_concurrency: int = Field(default=4, ge=1)
    # Client-side rate limits (token buckets holding one second's worth); unset: none.
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    # Retries of a request that got 429, 5xx, a timeout or no connection: backoff
    # from backoff_initial_s doubling up to backoff_max_s, with full jitter, or the
    # server's Retry-After when it sends one.
    max_retries: int = Field(default=8, ge=0)
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=20.0, gt=0)
    # The provider counts as down when nothing has succeeded for this long while
    # requests keep failing: the stream pauses and re-reads the batch later, a
    # rebuild stops (resumable). It is also the longest one stream micro-batch may
    # spend embedding, rate-limit waits included (the poll loop must keep turning).
    give_up_after_s: float = Field(default=60.0, gt=0)
    # A request field naming documents and queries apart (see InputTypeSettings).
    input_type: InputTypeSettings = InputTypeSettings()

    @model_validator(mode="after")
    def _backend_runs_precision(self) -> EmbedSettings:
        runs = _BACKEND_PRECISIONS.get(self.backend)
        if runs is not None and self.precision != "auto" and self.precision not in runs:
            raise ValueError(
                f"embed.backend {self.backend} cannot run precision {self.precision} "
                f"(it runs {', '.join(sorted(runs))}; int8 runs on onnx)")
        return self

    @model_validator(mode="after")
    def _input_type_is_remote(self) -> EmbedSettings:
        kinds = self.input_type
        if self.provider == "local" and (kinds.document is not None or kinds.query is not None):
            # A local model has no request to put it in: silently unused otherwise.
            raise ValueError("embed.input_type applies to provider openai only; a local "
                             "model takes embed.prompts")
        return self
