"""Reaching a Qdrant server: the one place that builds a ``QdrantClient``, and
the client calls on aliases that both the server sink and its admin make.

:class:`Endpoint` holds how to reach the server (URL, API key, gRPC, TLS,
timeout) and nothing else; nothing is contacted until a request. Messages
built here never contain the API key (see :mod:`embedstream.sinks._server_errors`).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from qdrant_client import QdrantClient, models

from embedstream.sinks._collection import translated
from embedstream.sinks._server_errors import translate
from embedstream.stream.config import SinkSettings
from embedstream.stream.errors import ConfigError, SinkError

__all__ = ["Endpoint", "aliases_of", "create_alias", "physical_names"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How to reach one Qdrant server, or ``url=":memory:"`` for qdrant-client's
    in-process store. Raises ConfigError for a URL that cannot work."""

    url: str
    api_key: SecretStr | None = None  # stays a SecretStr until the client is built
    prefer_grpc: bool = False
    timeout_s: float = 30.0
    tls_ca_file: Path | None = None
    tls_verify: bool = True

    def __post_init__(self) -> None:
        if self.url != ":memory:" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"sink.url {self.url!r} must be http(s)://host:port or ':memory:'")

    @classmethod
    def from_settings(cls, settings: SinkSettings) -> Endpoint:
        if not settings.url:
            raise ConfigError("sink.url is required when sink.kind is 'qdrant'")
        return cls(settings.url, settings.api_key, settings.prefer_grpc, settings.timeout_s,
                   settings.tls_ca_file, settings.tls_verify)

    def connect(self, where: str) -> QdrantClient:
        """A client for the server; ``where`` starts the message of a failure."""
        if self.url == ":memory:":
            return QdrantClient(location=":memory:")
        tls: dict[str, Any] = {}
        if self.tls_ca_file is not None:
            with self.errors(where, "read sink.tls_ca_file"):
                ca = self.tls_ca_file.read_bytes()
            tls = {"verify": str(self.tls_ca_file),  # REST (httpx)
                   "grpc_options": {"root_certificates": ca}}  # gRPC
        elif not self.tls_verify:
            tls = {"verify": False}
        with self.errors(where, "connect"):
            return QdrantClient(
                **tls,
                url=self.url,
                api_key=self.api_key.get_secret_value() if self.api_key else None,
                prefer_grpc=self.prefer_grpc,
                timeout=math.ceil(self.timeout_s),
                # Skips a version request at construction whose failure is only
                # a warning; the first request reaches the server right after anyway.
                check_compatibility=False,
            )

    def failure(self, exc: Exception, where: str, what: str) -> SinkError:
        """``exc``, raised while doing ``what``, as a SinkUnavailable or SinkError
        whose message starts with ``where`` and holds no API key."""
        return translate(exc, f"{where}: {what} failed", self.api_key)

    def errors(self, where: str, what: str) -> AbstractContextManager[None]:
        """Raise :meth:`failure` for what the client raises (without its
        cause, which may quote the request)."""
        return translated(lambda exc: self.failure(exc, where, what), keep_cause=False)


def aliases_of(client: QdrantClient) -> dict[str, str]:
    """Every alias and the collection it points at."""
    return {a.alias_name: a.collection_name for a in client.get_aliases().aliases}


def physical_names(client: QdrantClient) -> set[str]:
    """Every collection's name (aliases not included)."""
    return {c.name for c in client.get_collections().collections}


def create_alias(client: QdrantClient, alias: str, target: str) -> None:
    client.update_collection_aliases([models.CreateAliasOperation(
        create_alias=models.CreateAlias(collection_name=target, alias_name=alias))])
