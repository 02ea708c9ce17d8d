"""Qdrant server sink: chunk points in a Qdrant server (or cluster) over HTTP/gRPC.

Layout: the chunk collection ``<collection>`` and the state collection
``<collection>_state`` (see :mod:`embedstream.sinks._layout`), where ``<collection>`` is
a physical collection; the configured name is a Qdrant alias pointing at one
(see :mod:`embedstream.stream.store`). ``open`` takes its target; else a collection named
like the alias (made before aliases); else, given a fingerprint, creates
``<alias>_<UTC timestamp>`` and then the alias, last, so an interrupted
creation leaves an unaliased collection, never an alias to nothing.

Guarantees, beyond those of :mod:`embedstream.stream.store`:

* Every write is sent with ``wait=True``: when ``apply`` returns, the server has
  applied it (to ``write_consistency_factor`` replicas) and it is in the
  server's WAL. How that WAL survives a server crash is the server's business.
* The chunk upsert and all leftover deletes of one call go out as one
  ``batch_update_points`` request (split only when the vectors are too large for
  one request), then one request upserts the states: three round trips at most
  in the usual case, however many documents the call holds.
* Errors are :class:`~embedstream.stream.errors.SinkUnavailable` (connection failures,
  timeouts, 408, 429, 5xx; ``retry_after`` from the server when it says) or
  :class:`~embedstream.stream.errors.SinkError` (everything else). Messages never contain
  the API key.

Not guaranteed: detection of two consumers with different fingerprints
creating the same collection at the same instant; consistency of ``points()``
with writes made while iterating. Two processes creating a new store at once
each create a collection; one that then finds the alias taken joins its target
(deleting its own), but Qdrant has no compare-and-set for aliases: two that
create the alias within milliseconds of each other can end up apart.

``url=":memory:"`` runs an in-process store with the server's semantics (for
tests and trials; it keeps nothing, and ignores payload indexes).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from qdrant_client import QdrantClient, models

from embedstream.sinks._handover import HandoverMethods
from embedstream.sinks._layout import (
    FINGERPRINT_POINT_ID,
    HANDOVER_POINT_ID,
    SCROLL_PAGE,
    STATE_SUFFIX,
    STATE_VECTOR,
    as_floats,
    dense_vector,
    new_physical_name,
    not_ours_message,
    plan_writes,
    state_from_payload,
)
from embedstream.sinks._server_admin import (
    aliases_of,
    create_alias,
    physical_names,
    read_fingerprint,
)
from embedstream.sinks._server_errors import is_conflict, translate
from embedstream.stream.config import SinkSettings
from embedstream.stream.errors import ConfigError, FingerprintMismatch, SinkError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import DocState, DocumentWrite, Hit, StoredPoint, doc_state_point_id

__all__ = ["QdrantServerSink"]

_CHUNK_INDEXES = (
    ("doc_id", models.PayloadSchemaType.KEYWORD),
    ("version", models.PayloadSchemaType.INTEGER),
    ("chunk_index", models.PayloadSchemaType.INTEGER),
)
# Vector floats per request: JSON costs up to ~20 bytes a float, and Qdrant
# refuses requests over 32 MB by default. 1,000 chunks of dimension 384 fit.
_MAX_FLOATS_PER_REQUEST = 500_000


class QdrantServerSink(HandoverMethods):
    """Chunk points in a Qdrant server collection (see the module docstring).

    ``collection`` is the configured name (an alias). ``physical``, when given,
    is the physical collection ``open`` uses or creates instead, without
    reading or touching any alias (a rebuild fills a new collection this way
    while the live consumer keeps using the alias). ``client`` lets a caller
    share an existing client (tests use it to reopen an in-memory store); a
    shared client is not closed by :meth:`close`.
    """

    def __init__(
        self,
        url: str,
        collection: str,
        *,
        api_key: SecretStr | None = None,
        prefer_grpc: bool = False,
        timeout_s: float = 30.0,
        shard_number: int | None = None,
        replication_factor: int | None = None,
        write_consistency_factor: int | None = None,
        tls_ca_file: Path | None = None,
        tls_verify: bool = True,
        client: QdrantClient | None = None,
        physical: str | None = None,
    ) -> None:
        if url != ":memory:" and not url.startswith(("http://", "https://")):
            raise ConfigError(f"sink.url {url!r} must be http(s)://host:port or ':memory:'")
        self._url = url
        self._alias = collection
        self._forced = physical
        self._collection = physical or collection
        self._state_collection = f"{self._collection}{STATE_SUFFIX}"
        self._api_key = api_key  # stays a SecretStr until the client is built
        self._prefer_grpc = prefer_grpc
        self._timeout_s = timeout_s
        self._tls_ca_file = tls_ca_file
        self._tls_verify = tls_verify
        # None leaves each to the server's default (the client omits it).
        self._shard_number = shard_number
        self._replication_factor = replication_factor
        self._write_consistency_factor = write_consistency_factor
        self._client = client
        self._owns_client = client is None

    @property
    def collection(self) -> str:
        return self._collection

    @property
    def _where(self) -> str:
        alias = f" (alias {self._alias!r})" if self._collection != self._alias else ""
        return f"Qdrant collection {self._collection!r}{alias} at {self._url}"

    @classmethod
    def from_settings(cls, settings: SinkSettings,
                      physical: str | None = None) -> QdrantServerSink:
        if not settings.url:
            raise ConfigError("sink.url is required when sink.kind is 'qdrant'")
        return cls(
            settings.url, settings.collection, api_key=settings.api_key,
            prefer_grpc=settings.prefer_grpc, timeout_s=settings.timeout_s,
            shard_number=settings.shard_number, replication_factor=settings.replication_factor,
            write_consistency_factor=settings.write_consistency_factor,
            tls_ca_file=settings.tls_ca_file, tls_verify=settings.tls_verify, physical=physical,
        )

    # -- lifecycle ---------------------------------------------------------

    def open(self, fingerprint: Fingerprint | None) -> None:
        if self._client is None:
            self._client = self._connect()
        client = self._client
        with self._errors("open"):
            aliases = aliases_of(client)
            if self._forced is not None and self._forced in aliases:
                raise SinkError(f"{self._forced!r} at {self._url} is an alias, not a "
                                "physical collection")
            target = self._forced or aliases.get(self._alias)
            legacy = (self._alias, f"{self._alias}{STATE_SUFFIX}")  # a store made before aliases
            if target is None and any(client.collection_exists(n) for n in legacy):
                target = self._alias
        if target is not None:
            self._open_physical(client, target, fingerprint)
        elif fingerprint is None:
            raise SinkError(f"{self._where} does not exist (or was not made by embedstream)")
        else:
            self._create_behind_alias(client, fingerprint)

    def _create_behind_alias(self, client: QdrantClient, fingerprint: Fingerprint) -> None:
        with self._errors("create"):
            taken = physical_names(client) | set(aliases_of(client))
        name = new_physical_name(self._alias, taken.__contains__)
        self._open_physical(client, name, fingerprint)
        with self._errors("create the alias"):
            winner = aliases_of(client).get(self._alias)
            if winner is None:
                create_alias(client, self._alias, name)
                winner = aliases_of(client).get(self._alias)
        if winner == name:
            return
        # Another process made the alias meanwhile: join its collection, and
        # delete ours (empty, and nothing leads to it) so no orphan is left.
        for leftover in (name, f"{name}{STATE_SUFFIX}"):
            with contextlib.suppress(Exception):
                client.delete_collection(leftover)
        if winner is None:
            raise SinkError(f"alias {self._alias!r} at {self._url} vanished while it was "
                            "being created; try again")
        self._open_physical(client, winner, fingerprint)

    def _open_physical(self, client: QdrantClient, name: str,
                       fingerprint: Fingerprint | None) -> None:
        """Open (or, given a fingerprint, create) the physical collection ``name``."""
        self._collection, self._state_collection = name, f"{name}{STATE_SUFFIX}"
        with self._errors("open"):
            stored = (read_fingerprint(client, name)
                      if client.collection_exists(self._state_collection) else None)
            chunks_exist = client.collection_exists(self._collection)
        if stored is not None:
            if fingerprint is not None:
                fingerprint.require_compatible(stored, self._collection)
            if not chunks_exist:
                raise SinkError(f"{self._where} is missing although its state collection "
                                "exists; delete both to rebuild")
            return
        if fingerprint is None:
            raise SinkError(f"{self._where} does not exist (or was not made by embedstream)")
        # No fingerprint: a new collection, or a creation interrupted before its
        # last step (writing the fingerprint). An empty leftover of the right shape
        # is adopted; anything else was not made by embedstream and is refused.
        with self._errors("create"):
            if chunks_exist:
                self._check_leftover(client, self._collection, fingerprint.dimension)
            else:
                self._create(client, self._collection, fingerprint.dimension)
            if client.collection_exists(self._state_collection):
                self._check_leftover(client, self._state_collection, len(STATE_VECTOR))
            else:
                self._create(client, self._state_collection, len(STATE_VECTOR))
            with warnings.catch_warnings():
                # The in-memory store warns that it ignores payload indexes.
                warnings.filterwarnings("ignore", "Payload indexes have no effect")
                for field, schema in _CHUNK_INDEXES:
                    client.create_payload_index(self._collection, field, schema, wait=True)
                client.create_payload_index(self._state_collection, "doc_id",
                                            models.PayloadSchemaType.KEYWORD, wait=True)
            client.upsert(self._state_collection, wait=True, points=[models.PointStruct(
                id=FINGERPRINT_POINT_ID, vector=STATE_VECTOR,
                payload={"fingerprint": fingerprint.to_json()})])

    def flush(self) -> None:
        """Nothing to do: every write waits for the server (``wait=True``),
        which holds it in its write-ahead log before answering."""

    def close(self) -> None:
        """Close the client if this sink made it. Writes are already durable
        (``wait=True``), so there is nothing to flush. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            with self._errors("close"):
                client.close()

    def _connect(self) -> QdrantClient:
        if self._url == ":memory:":
            return QdrantClient(location=":memory:")
        tls: dict[str, Any] = {}
        if self._tls_ca_file is not None:
            with self._errors("read sink.tls_ca_file"):
                ca = self._tls_ca_file.read_bytes()
            tls = {"verify": str(self._tls_ca_file),  # REST (httpx)
                   "grpc_options": {"root_certificates": ca}}  # gRPC
        elif not self._tls_verify:
            tls = {"verify": False}
        with self._errors("connect"):
            return QdrantClient(
                **tls,
                url=self._url,
                api_key=self._api_key.get_secret_value() if self._api_key else None,
                prefer_grpc=self._prefer_grpc,
                timeout=math.ceil(self._timeout_s),
                # Skips a version request at construction whose failure is only
                # a warning; open() reaches the server right after anyway.
                check_compatibility=False,
            )

    def _create(self, client: QdrantClient, name: str, size: int) -> None:
        try:
            vectors = models.VectorParams(size=size, distance=models.Distance.COSINE)
            client.create_collection(
                name, vectors_config=vectors, shard_number=self._shard_number,
                replication_factor=self._replication_factor,
                write_consistency_factor=self._write_consistency_factor)
        except Exception as exc:
            # Another consumer created it just now: carry on with its collection.
            if not is_conflict(exc):
                raise

    def _check_leftover(self, client: QdrantClient, name: str, size: int) -> None:
        params = client.get_collection(name).config.params.vectors
        if not (isinstance(params, models.VectorParams) and params.size == size
                and params.distance == models.Distance.COSINE):
            raise FingerprintMismatch(not_ours_message(name, f"vectors {params}"))
        held = client.count(name, exact=True).count
        if held:
            raise FingerprintMismatch(not_ours_message(name, f"{held} points"))

    # -- reads and writes --------------------------------------------------

    def document_states(self, doc_ids: Collection[str]) -> dict[str, DocState]:
        client = self._open()
        if not doc_ids:
            return {}
        wanted = set(doc_ids)
        with self._errors("retrieve"):
            records = client.retrieve(self._state_collection,
                                      [doc_state_point_id(d) for d in wanted], with_payload=True)
        found = (state_from_payload(r.payload) for r in records)
        return {doc_id: s for doc_id, s in filter(None, found) if doc_id in wanted}

    def apply(self, writes: Sequence[DocumentWrite]) -> None:
        client = self._open()
        plan = plan_writes(writes)
        points = [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in plan.chunks]
        step = max(1, _MAX_FLOATS_PER_REQUEST // len(plan.chunks[0][1])) if plan.chunks else 1
        requests: list[list[models.UpdateOperation]] = [
            [models.UpsertOperation(upsert=models.PointsList(points=points[i:i + step]))]
            for i in range(0, len(points), step)] or [[]]
        # Leftover deletes ride in the last request, after every upsert; they
        # never touch the new chunks (their indexes are below the cut).
        requests[-1].extend(
            models.DeleteOperation(delete=models.FilterSelector(filter=_trim_filter(ids, keep)))
            for keep, ids in plan.trims.items())
        with self._errors("write"):
            for operations in requests:
                if operations:
                    client.batch_update_points(self._collection, operations, wait=True)
            # States last: a crash before this line leaves the old states, so the
            # writes are replayed (see sinks.base).
            if plan.states:
                client.upsert(self._state_collection, wait=True, points=[
                    models.PointStruct(id=pid, vector=STATE_VECTOR, payload=payload)
                    for pid, payload in plan.states])

    def stored_vectors(self, doc_ids: Collection[str]) -> dict[str, list[float]]:
        if not doc_ids:
            return {}
        only = models.Filter(must=[models.FieldCondition(
            key="doc_id", match=models.MatchAny(any=sorted(doc_ids)))])
        return {
            digest: dense_vector(record.vector)
            for record in self._scroll(only, ["content_hash"])
            if isinstance(digest := (record.payload or {}).get("content_hash"), str)
        }

    def search(self, vector: Sequence[float], limit: int) -> list[Hit]:
        client = self._open()
        if limit <= 0:
            return []
        with self._errors("search"):
            found = client.query_points(self._collection, query=as_floats(vector), limit=limit,
                                        with_payload=True).points
        return [Hit(str(p.id), p.score, p.payload or {}) for p in found]

    def points(self) -> Iterator[StoredPoint]:
        for record in self._scroll(None, True):
            yield StoredPoint(str(record.id), dense_vector(record.vector), record.payload or {})

    # -- handover (the record's logic is in HandoverMethods) ----------------

    def _handover_payload(self) -> Mapping[str, Any] | None:
        client = self._open()
        with self._errors("read the handover record"):
            found = client.retrieve(self._state_collection, [HANDOVER_POINT_ID],
                                    with_payload=True)
        return found[0].payload if found else None

    def _replace_handover_payload(self, payload: dict[str, Any]) -> None:
        client = self._open()
        with self._errors("write the handover record"):
            client.upsert(self._state_collection, wait=True, points=[models.PointStruct(
                id=HANDOVER_POINT_ID, vector=STATE_VECTOR, payload=payload)])

    def _scroll(
        self, only: models.Filter | None, payload: bool | list[str]
    ) -> Iterator[models.Record]:
        """Every chunk record (matching ``only``), with its vector, page by page."""
        client = self._open()
        offset: Any = None
        while True:
            with self._errors("scroll"):
                records, offset = client.scroll(
                    self._collection, scroll_filter=only, limit=SCROLL_PAGE, offset=offset,
                    with_payload=payload, with_vectors=True)
            yield from records
            if offset is None:
                return

    # -- errors ------------------------------------------------------------

    def _open(self) -> QdrantClient:
        if self._client is None:
            raise SinkError(f"{self._where} is not open")
        return self._client

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except (SinkError, FingerprintMismatch):
            raise
        except Exception as exc:
            raise self._translate(what, exc) from None  # the cause may quote the request

    def _translate(self, what: str, exc: Exception) -> SinkError:
        return translate(exc, f"{self._where}: {what} failed", self._api_key)


def _trim_filter(doc_ids: list[str], keep: int) -> models.Filter:
    must: list[models.Condition] = [
        models.FieldCondition(key="doc_id", match=models.MatchAny(any=doc_ids))]
    if keep > 0:
        must.append(models.FieldCondition(key="chunk_index", range=models.Range(gte=keep)))
    return models.Filter(must=must)
