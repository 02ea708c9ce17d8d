"""Turning qdrant-client's exceptions into embedstream's (server sink and admin).

:class:`~embedstream.stream.errors.SinkUnavailable` for what waiting may cure (connection
failures, timeouts, 408, 429, 5xx, transient gRPC codes), with the server's
``Retry-After`` when it gives one; :class:`~embedstream.stream.errors.SinkError` for the
rest. Messages never contain the API key.
"""

from __future__ import annotations

import httpx
from pydantic import SecretStr
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from embedstream.stream.errors import SinkError, SinkUnavailable

__all__ = ["grpc_code", "is_conflict", "translate"]

# grpc.StatusCode names; grpc ships no type stubs, so codes are matched by name.
_TRANSIENT_GRPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL"}


def translate(exc: Exception, prefix: str, api_key: SecretStr | None) -> SinkError:
    """``exc`` as a SinkUnavailable or SinkError whose message starts with ``prefix``."""
    retry_after: float | None = None
    if isinstance(exc, ResourceExhaustedResponse):
        detail, retry_after = f"rate limited: {exc}", float(exc.retry_after_s)
    elif isinstance(exc, UnexpectedResponse):
        content = exc.content[:300].decode(errors="replace")
        detail = f"HTTP {exc.status_code} {exc.reason_phrase}: {content}"
        if exc.status_code in (408, 429) or (exc.status_code or 0) >= 500:
            retry_after = _retry_after_header(exc.headers) or (1.0 if exc.status_code == 429
                                                               else 2.0)
    elif isinstance(exc, ResponseHandlingException):
        source = exc.source
        detail = f"{type(source).__name__}: {source}"
        if isinstance(source, httpx.TransportError):  # refused, reset, timed out
            retry_after = 5.0
    elif code := grpc_code(exc):
        details = getattr(exc, "details", None)
        detail = f"gRPC {code}: {details() if callable(details) else exc}"
        if code in _TRANSIENT_GRPC:
            retry_after = 5.0
    else:
        detail = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, httpx.TransportError | ConnectionError | TimeoutError):
            retry_after = 5.0
    message = f"{prefix}: {detail}"
    if api_key is not None and api_key.get_secret_value():
        message = message.replace(api_key.get_secret_value(), "**********")
    if retry_after is not None:
        return SinkUnavailable(message, retry_after=retry_after)
    return SinkError(message)


def is_conflict(exc: Exception) -> bool:
    """Whether the server refused because the thing exists already (HTTP 409)."""
    return ((isinstance(exc, UnexpectedResponse) and exc.status_code == 409)
            or grpc_code(exc) == "ALREADY_EXISTS")


def grpc_code(exc: Exception) -> str | None:
    """The status code name of a gRPC error (grpc ships no type stubs)."""
    code_of = getattr(exc, "code", None)
    if type(exc).__module__.startswith("grpc") and callable(code_of):
        return str(getattr(code_of(), "name", "UNKNOWN"))
    return None


def _retry_after_header(headers: httpx.Headers) -> float | None:
    try:
        return max(float(headers.get("Retry-After", "")), 0.0)
    except ValueError:
        return None
