"""Embedding through an OpenAI-compatible ``POST {api_base}/embeddings`` API.

:class:`OpenAIEmbedder` is the :class:`~embedstream.stream.embedding.Embedder` for
``embed.provider: openai`` (OpenAI, Azure OpenAI, TEI, vLLM, Infinity, Ollama).
One ``embed`` call:

1. counts each text's tokens with a local tokenizer (``embed.tokenizer``) and
   cuts the texts, in order, into requests of at most ``request_max_inputs``
   inputs and ``request_max_tokens`` tokens (:func:`plan_requests`);
2. sends them with at most ``max_concurrency`` in flight (fewer after 429s:
   the window adapts), each first admitted by the requests/min and tokens/min
   buckets (:mod:`embedstream.stream._rate_limit`);
3. retries a request that got 429, 408, 5xx, a timeout or no connection, after
   the server's ``Retry-After`` (which also holds back every other request)
   or else an exponential backoff with jitter, while the provider is not
   "down" (nothing succeeded for ``give_up_after_s``); 5xx, timeouts and lost
   connections at most ``max_retries`` times;
4. puts the vectors back in input order, L2-normalised.

Documents and queries: :meth:`OpenAIEmbedder.embed` sends every text with
``embed.prompts.document`` in front and, when ``embed.input_type.document`` is set,
``{embed.input_type.key: that}`` in the request body;
:meth:`~OpenAIEmbedder.embed_queries` the same with the query ones. A remote model
has no configuration to read prompts from: unset, nothing is added.

What fails, and how:

* a request the provider rejects (another 4xx, e.g. 400 for an input that is
  too long), or one still failing with 500 (or an unusable answer) after its
  retries, is checked with a known-good one-line probe. If that is answered,
  the request is split in halves, down to single texts, without more retries,
  so only the texts at fault fail (``embed_rejected``, ``embed_failed``). If
  the probe is refused too: :class:`~embedstream.stream.errors.EmbedderError` (the
  provider refuses everything); if it fails too: an outage (below). Failed texts come back in
  :class:`~embedstream.stream.errors.EmbedFailures` with every other vector; nothing is
  ever replaced by zeros;
* 401, 403, 404 or an exhausted quota: :class:`~embedstream.stream.errors.EmbedderError`
  (nothing will work until the configuration changes);
* an outage (nothing succeeded for ``give_up_after_s``, or ``max_retries``
  used up, or the call's own time budget spent):
  :class:`~embedstream.stream.errors.EmbedderUnavailable` with a ``retry_after``; nothing
  is failed (the stream pauses and re-reads, a rebuild stops resumably).

``call_budget_s`` bounds one ``embed`` call, waits included: the stream sets it
(``embed.give_up_after_s``) so a slow provider never holds the Kafka poll loop
longer than that (the vectors that did arrive go with the outage,
``EmbedderUnavailable.partial``, for the retry to reuse); a rebuild does not,
and waits for its rate limits as long as it takes.

The HTTP client runs on an asyncio loop the embedder owns and drives from the
calling thread (``run_until_complete``): no thread is started (host names are
resolved inline, not on the loop's default thread pool). One call at a time (a
lock serialises callers); nothing of a call is left running when it returns.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from embedstream.stream._embedding_api import Answer, Ok, Rejected, Retry, classify, plan_requests
from embedstream.stream._embedding_calls import Call, all_or_none, close_loop, new_loop, retry_wait
from embedstream.stream._rate_limit import ConcurrencyWindow, RateLimiter
from embedstream.stream.config import EmbedSettings
from embedstream.stream.embedding import resolve_model_path
from embedstream.stream.errors import EmbedderError, EmbedderUnavailable, EmbedFailures
from embedstream.stream.metrics import Metrics
from embedstream.stream.redact import Redactor

__all__ = ["OpenAIEmbedder", "plan_requests"]

Matrix = npt.NDArray[np.float32]
_DEFAULT_TOKENIZER = "sentence-transformers/all-MiniLM-L6-v2"
# Sent at start (config check, dimension) and when a request keeps failing with 500:
# if this answers, the provider is up and the request's texts are at fault.
_PROBE_TEXT = "embedstream dimension probe"


class OpenAIEmbedder:
    """The remote Embedder (see the module docstring). ``call_budget_s`` bounds one
    ``embed`` call; ``transport`` replaces the HTTP transport (tests); ``clock``,
    ``sleep`` and ``jitter`` the time and the randomness of backoffs. Call
    :meth:`close` when done."""

    provider = "openai"

    def __init__(self, settings: EmbedSettings, *, metrics: Metrics | None = None,
                 call_budget_s: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 jitter: Callable[[], float] = random.random) -> None:
        from transformers import AutoTokenizer

        self._settings = settings
        self._metrics = metrics or Metrics()
        self._call_budget_s = call_budget_s
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._tokenizer_name = settings.tokenizer or _DEFAULT_TOKENIZER
        self.tokenizer: Any = AutoTokenizer.from_pretrained(
            resolve_model_path(self._tokenizer_name))
        self.max_seq_length = settings.max_input_tokens
        self.document_prompt = settings.prompts.document or ""
        self.query_prompt = settings.prompts.query or ""
        headers = {}
        # An HTTP client error may quote the header, a provider echo it: details pass here.
        self._redact = Redactor()
        if settings.api_key is not None:
            key = settings.api_key.get_secret_value()
            is_bearer = settings.api_key_header.lower() == "authorization"
            headers[settings.api_key_header] = f"Bearer {key}" if is_bearer else key
            self._redact.add([key])
        self._loop = new_loop()
        self._client = httpx.AsyncClient(
            base_url=settings.api_base.rstrip("/") + "/", headers=headers,
            params=settings.query_params, timeout=settings.timeout_s, transport=transport,
            limits=httpx.Limits(max_connections=settings.max_concurrency,
                                max_keepalive_connections=settings.max_concurrency))
        self._limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute,
                                    clock, sleep)
        self._window = ConcurrencyWindow(settings.max_concurrency)
        self._lock = threading.Lock()
        self._dimension: int | None = settings.dimensions
        self._last_success = clock()
        self._where = f"the embedding API at {settings.api_base} (model {settings.model!r})"
        # One request at start: fails now, not at the first event, on a wrong key,
        # model or URL, and learns the vector size when embed.dimensions is unset.
        try:
            self.embed([_PROBE_TEXT])
        except EmbedFailures as error:
            self.close()
            [(_, detail)] = error.failed.values()
            raise EmbedderError(f"{self._where} refused a one-line probe: {detail}") from None
        except BaseException:
            self.close()
            raise

    @property
    def model_name(self) -> str:
        return self._settings.model

    @property
    def revision(self) -> str:
        # A remote model is known by its name only (if the provider changes the weights
        # behind a name, rebuild); the tokenizer here decides where chunks are cut. A
        # document input_type changes the vectors as a prompt does, so it is named here
        # (the fingerprint's ``prompt`` holds the prefix); unset, the revision reads as
        # before the setting existed.
        kinds = self._settings.input_type
        if kinds.document is None:
            return f"tokenizer={self._tokenizer_name}"
        return f"tokenizer={self._tokenizer_name};{kinds.key}={kinds.document}"

    @property
    def dimension(self) -> int:
        assert self._dimension is not None  # set by the probe at start
        return self._dimension

    def token_ids(self, texts: Sequence[str], *, query: bool = False) -> list[list[int]]:
        """Token ids per text with the local tokenizer, no special tokens, untruncated,
        of the text as sent: with the document prompt (``query``: the query prompt)."""
        if not texts:
            return []
        ids: list[list[int]] = self.tokenizer(
            self._prompted(texts, query), add_special_tokens=False, verbose=False,
            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return ids

    def count_tokens(self, texts: Sequence[str], *, query: bool = False) -> list[int]:
        """Tokens per text as sent, with the local tokenizer (an estimate for other models)."""
        return [len(seq) for seq in self.token_ids(texts, query=query)]

    def embed(self, texts: Sequence[str], token_counts: Sequence[int] | None = None) -> Matrix:
        """Vectors of document ``texts`` in input order; raises :class:`EmbedFailures`
        (with the others) when some fail for good (see the module docstring).
        ``token_counts``: :meth:`count_tokens` of ``texts``, when the caller has them."""
        return self._call(texts, token_counts, query=False)

    def embed_queries(self, texts: Sequence[str]) -> Matrix:
        """Vectors of search queries, with the query prompt and input_type."""
        return self._call(texts, None, query=True)

    def _call(self, texts: Sequence[str], token_counts: Sequence[int] | None,
              query: bool) -> Matrix:
        counts = (list(token_counts) if token_counts is not None
                  else self.count_tokens(texts, query=query))
        kinds = self._settings.input_type
        with self._lock:
            return self._loop.run_until_complete(self._embed(
                self._prompted(texts, query), counts,
                kinds.query if query else kinds.document))

    def _prompted(self, texts: Sequence[str], query: bool) -> list[str]:
        prompt = self.query_prompt if query else self.document_prompt
        return [prompt + text for text in texts] if prompt else list(texts)

    def close(self) -> None:
        close_loop(self._loop, self._client)

    # -- one call --------------------------------------------------------------

    async def _embed(self, texts: list[str], counts: list[int],
                     input_type: str | None) -> Matrix:
        tokens = [max(1, count) for count in counts]  # an empty text still costs a slot
        budget = self._call_budget_s
        call = Call(texts, tokens, [None] * len(texts), {},
                    self._clock() + budget if budget is not None else math.inf, input_type)
        settings = self._settings
        groups = plan_requests(tokens, settings.request_max_inputs, settings.request_max_tokens)
        try:
            await all_or_none([self._run(call, group) for group in groups])
        except EmbedderUnavailable as outage:
            # What did arrive is kept by the caller, so a retry makes progress even
            # when the provider is too slow for the whole call within its budget.
            outage.partial = {i: row for i, row in enumerate(call.rows) if row is not None}
            raise
        # Width 0 only if the start-up probe itself failed (the size is not known yet).
        out = np.empty((len(texts), self._dimension or 0), np.float32)
        for index, row in enumerate(call.rows):
            if row is not None:
                out[index] = row
        if call.failed:
            raise EmbedFailures(out, call.failed)
        return out

    async def _run(self, call: Call, group: list[int], mode: str = "request") -> None:
        """Send one request until it succeeds, fails for good, or gives up; then,
        if it failed for good, find the texts at fault by halves (in ``suspect``
        mode: see :meth:`_attempts`)."""
        await self._window.acquire()
        try:
            failure = await self._attempts(call, group, mode)
        finally:
            self._window.release()
        if failure is None:
            return
        if len(group) == 1:
            call.failed[group[0]] = failure
            return
        self._metrics.embed_splits.inc()
        middle = len(group) // 2
        await all_or_none([self._run(call, group[:middle], "suspect"),
                           self._run(call, group[middle:], "suspect")])

    async def _attempts(self, call: Call, group: list[int],
                        mode: str) -> tuple[str, str] | None:
        """The attempts at one request, holding its slot in the window throughout (a
        slot given up between attempts goes to a newer request, which would take the
        provider's next opening, again and again); the failure, if it failed for good.

        ``mode``: ``request`` (a failure for good is checked with a probe first),
        ``suspect`` (part of a request found at fault: a 4xx, 500 or unusable answer
        fails at once) or ``probe`` (the probe itself: failures are returned as
        they are). The last two are not bound by the call's budget: they are few,
        and must finish to fail only the texts at fault."""
        settings, metrics = self._settings, self._metrics
        tokens = sum(call.tokens[i] for i in group)
        first_answer: float | None = None  # waits for the limits before it are no stall
        retries = failures = 0  # failures: answers other than 429 (max_retries counts them)
        while True:
            answer = await self._limited_send([call.texts[i] for i in group], tokens, call,
                                              bounded=mode == "request")
            first_answer = first_answer or self._clock()
            if isinstance(answer, Ok):
                for index, row in zip(group, answer.vectors, strict=True):
                    call.rows[index] = row
                return None
            if isinstance(answer, Rejected):
                if mode == "request":
                    await self._probe(call, answer.detail)  # raises if it is not the texts
                return "embed_rejected", answer.detail
            texts_at_fault = answer.outcome in ("server_error", "invalid")
            if mode == "suspect" and texts_at_fault:
                return "embed_failed", answer.detail
            if answer.outcome == "throttled":
                self._window.throttled()  # the provider is up and says "slower"
            else:
                failures += 1
            wait = retry_wait(settings, retries, answer.retry_after, self._jitter)
            retries += 1
            # "Down": nothing has succeeded (anywhere) since this request's first answer.
            stalled = self._clock() - max(self._last_success, first_answer)
            if failures > settings.max_retries or stalled > settings.give_up_after_s \
                    or self._clock() + wait > call.deadline:
                if texts_at_fault:
                    # These texts every time: their fault, or is everything failing?
                    if mode == "request":
                        await self._probe(call, answer.detail)
                    return "embed_failed", answer.detail
                raise EmbedderUnavailable(
                    f"{self._where} is not answering ({answer.outcome}: {answer.detail}); "
                    f"{retries} attempt(s) over {self._clock() - first_answer:.1f}s",
                    retry_after=max(wait, settings.backoff_initial_s))
            metrics.embed_retries.inc()
            if answer.retry_after is not None:
                self._limiter.block(wait)  # the next acquire waits it out, with every other
            else:
                metrics.embed_throttled.labels(cause="backoff").inc(wait)
                await self._sleep(wait)

    async def _probe(self, call: Call, failure: str) -> None:
        """Returns if the provider embeds a known-good line now, retries included
        (so a request that keeps failing is its texts' fault); raises what the
        provider's state is if not."""
        # With the call's input_type: a provider refusing that is a configuration error.
        probe = Call([_PROBE_TEXT], [8], [None], {}, call.deadline, call.input_type)
        failure_of_probe = await self._attempts(probe, [0], "probe")
        if failure_of_probe is None:
            return
        reason, detail = failure_of_probe
        if reason == "embed_rejected":
            raise EmbedderError(f"{self._where} refuses even a one-line probe "
                                f"({detail}), as it refused a request ({failure})")
        raise EmbedderUnavailable(
            f"{self._where} is failing every request ({failure}; a probe: {detail})",
            retry_after=self._settings.backoff_initial_s)

    # -- one request -----------------------------------------------------------

    async def _limited_send(self, texts: list[str], tokens: int, call: Call,
                            bounded: bool = True) -> Answer:
        """Wait for the rate limits, then send; ``bounded``: within the call's budget
        (a probe and the halves of a request found at fault are not: they are few
        and single attempts, and must finish to fail only those texts)."""
        metrics = self._metrics
        deadline = call.deadline if bounded else math.inf
        if self._clock() >= deadline:
            raise EmbedderUnavailable(f"{self._where} is too slow for this call's time "
                                      "budget (embed.give_up_after_s)",
                                      retry_after=self._settings.backoff_initial_s)
        limited, blocked = await self._limiter.acquire(tokens, deadline)
        metrics.embed_throttled.labels(cause="rate_limit").inc(limited)
        metrics.embed_throttled.labels(cause="retry_after").inc(blocked)
        # No answer past the budget either (at least a second, to get one at all).
        timeout = min(self._settings.timeout_s, max(1.0, deadline - self._clock()))
        answer = await self._send(texts, timeout, call.input_type)
        if isinstance(answer, Ok):
            self._last_success = self._clock()
            self._window.succeeded()
            metrics.embed_tokens_sent.inc(answer.tokens or tokens)
            if answer.tokens and self._limiter.tokens is not None:
                self._limiter.tokens.correct(answer.tokens - tokens)
        return answer

    async def _send(self, texts: list[str], timeout: float, input_type: str | None) -> Answer:
        settings, metrics = self._settings, self._metrics
        body: dict[str, Any] = {"model": settings.model, "input": texts,
                                "encoding_format": "float"}
        if settings.dimensions is not None:
            body["dimensions"] = settings.dimensions
        if input_type is not None:
            body[settings.input_type.key] = input_type
        started = self._clock()
        answer: Answer
        try:
            response = await self._client.post("embeddings", json=body, timeout=timeout)
            answer = classify(response, len(texts), self._dimension, self._where,
                              self._redact)
        except EmbedderError:
            metrics.embed_requests.labels(outcome="refused").inc()
            raise
        except httpx.TimeoutException:
            answer = Retry("timeout", None, f"no answer within {timeout:.1f}s")
        except httpx.DecodingError as error:
            answer = Retry("invalid", None, self._redact(f"undecodable answer: {error}"))
        except httpx.RequestError as error:  # connection refused or lost, redirects, ...
            answer = Retry("connection_error", None,
                           self._redact(f"{type(error).__name__}: {error}"))
        metrics.embed_request_seconds.observe(self._clock() - started)
        if isinstance(answer, Ok) and self._dimension is None:
            self._dimension = int(answer.vectors.shape[1])
        outcome = ("ok" if isinstance(answer, Ok)
                   else "rejected" if isinstance(answer, Rejected) else answer.outcome)
        metrics.embed_requests.labels(outcome=outcome).inc()
        return answer
