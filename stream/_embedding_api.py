"""The OpenAI embeddings API on the wire: request planning and reading answers.

Pure functions over ``httpx.Response`` objects; :mod:`embedstream.stream.remote_embedding`
does the sending, waiting and retrying.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from embedstream.stream.errors import EmbedderError

__all__ = ["Answer", "Ok", "Rejected", "Retry", "classify", "plan_requests"]

Matrix = npt.NDArray[np.float32]

# Answers that mean "later": retried, and never fail a record.
_LATER = {408: "unavailable", 429: "throttled", 502: "unavailable", 503: "unavailable",
          504: "unavailable"}
# Answers that mean "not with this configuration": retrying or splitting cannot help.
_REFUSED = {401: "embed.api_key", 403: "embed.api_key", 404: "embed.model or embed.api_base"}


def plan_requests(tokens: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Indexes of consecutive texts grouped into requests of at most ``max_inputs``
    texts and ``max_tokens`` tokens (a single text over ``max_tokens`` goes alone)."""
    requests: list[list[int]] = []
    current: list[int] = []
    held = 0
    for index, count in enumerate(tokens):
        if current and (len(current) >= max_inputs or held + count > max_tokens):
            requests.append(current)
            current, held = [], 0
        current.append(index)
        held += count
    if current:
        requests.append(current)
    return requests


@dataclass(slots=True)
class Ok:
    vectors: Matrix  # L2-normalised, one row per input, in input order
    tokens: int | None  # as the API counted them, when it says


@dataclass(slots=True)
class Retry:
    # throttled | unavailable | timeout | connection_error | server_error | invalid
    outcome: str
    retry_after: float | None
    detail: str


@dataclass(slots=True)
class Rejected:
    detail: str


Answer = Ok | Retry | Rejected


def _unchanged(text: str) -> str:
    return text


def classify(response: httpx.Response, count: int, dimension: int | None,
             where: str, redact: Callable[[str], str] = _unchanged) -> Answer:
    """What an answer to a request of ``count`` inputs means. Raises
    :class:`EmbedderError` for answers no retry can fix (``where`` names the API
    and model in the message): 401/403/404, an exhausted quota, vectors of
    another size than ``dimension``. Every detail taken from the answer passes
    through ``redact`` (a provider may echo the API key in its error text)."""
    status = response.status_code
    if status == 200:
        answer = _parse(response, count, dimension)
        if isinstance(answer, Retry):
            answer.detail = redact(answer.detail)
        return answer
    detail = f"HTTP {status}: {_error_text(response, redact)}"
    if status == 429 and "insufficient_quota" in response.text:
        raise EmbedderError(f"{where}: the quota is used up ({detail})")
    if status in _LATER or status >= 500:
        return Retry(_LATER.get(status, "server_error"), _retry_after(response), detail)
    if status in _REFUSED:
        raise EmbedderError(f"{where} refused ({detail}); check {_REFUSED[status]}")
    return Rejected(detail)


def _parse(response: httpx.Response, count: int, dimension: int | None) -> Ok | Retry:
    try:
        payload = response.json()
        data = sorted(payload["data"], key=lambda item: int(item["index"]))
        if [int(item["index"]) for item in data] != list(range(count)):
            raise ValueError(f"{len(data)} vectors with indexes other than 0..{count - 1}")
        vectors = np.asarray([_vector(item["embedding"]) for item in data], np.float32)
        usage = payload.get("usage") or {}
        reported = usage.get("prompt_tokens") or usage.get("total_tokens")
        used = int(reported) if isinstance(reported, int | float) else None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as error:
        return Retry("invalid", None, f"unusable answer: {type(error).__name__}: {error}")
    if vectors.ndim != 2:
        return Retry("invalid", None, "unusable answer: vectors of different sizes")
    if dimension is not None and vectors.shape[1] != dimension:
        raise EmbedderError(
            f"the embedding API returned {vectors.shape[1]}-dimensional vectors, not "
            f"{dimension}; set embed.dimensions (or rebuild for the new size)")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        return Retry("invalid", None, "unusable answer: a zero or non-finite vector")
    return Ok(vectors / norms, used)


def _vector(raw: Any) -> npt.NDArray[np.float32]:
    if isinstance(raw, str):  # encoding_format "base64", which some servers always use
        return np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
    return np.asarray(raw, dtype=np.float32)


def _retry_after(response: httpx.Response) -> float | None:
    """The wait the server asks for: ``retry-after-ms``, or ``Retry-After`` in
    seconds or as an HTTP date; None when it names none."""
    headers = response.headers
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000)
        if (value := headers.get("retry-after")) is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, float(parsedate_to_datetime(value).timestamp()) - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


def _error_text(response: httpx.Response, redact: Callable[[str], str]) -> str:
    """The API's error message (OpenAI style ``{"error": {"message": ...}}``), short;
    redacted before it is cut, so no part of a secret is left."""
    try:
        error = response.json().get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if message:
            return redact(str(message))[:300]
    except (ValueError, AttributeError):
        pass
    return redact(response.text)[:300] or response.reason_phrase
