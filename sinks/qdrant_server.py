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

A missing alias with collections made for it (``<alias>_<timestamp>``) is a
lost alias: ``open`` refuses to create another (see
:class:`~embedstream.sinks._collection.CollectionSink`), after waiting
``_CREATION_GRACE_S`` for the alias in case another consumer is creating it.

Not guaranteed: detection of two consumers with different fingerprints
creating the same collection at the same instant; consistency of ``points()``
with writes made while iterating. Two processes creating a new store at once
each create a collection; one that then finds the alias taken joins its target
(deleting its own), but Qdrant has no compare-and-set for aliases: two that
create the alias within milliseconds of each other can end up apart. One that
starts while another's creation takes longer than ``_CREATION_GRACE_S`` stops
with the lost-alias refusal; started again, it finds the alias.

``url=":memory:"`` runs an in-process store with the server's semantics (for
tests and trials; it keeps nothing, and ignores payload indexes).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from qdrant_client import QdrantClient, models

from embedstream.sinks._collection import CHUNKS, STATE, CollectionSink, Part, Schema
from embedstream.sinks._layout import (
    SCROLL_PAGE,
    STATE_SUFFIX,
    STATE_VECTOR,
    StatePoint,
    WritePlan,
    made_for,
    new_physical_name,
    not_ours_message,
)
from embedstream.sinks._server_client import Endpoint, aliases_of, create_alias, physical_names
from embedstream.sinks._server_errors import is_conflict
from embedstream.sinks._server_index import collection_params, search_params
from embedstream.stream.config import IndexSettings, SinkSettings
from embedstream.stream.errors import FingerprintMismatch, SinkError
from embedstream.stream.filters import Condition, FieldType, Filter, Match
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.sparse import SPARSE_NAME, SparseVector

__all__ = ["QdrantServerSink"]

_SCHEMAS: dict[Schema, models.PayloadSchemaType] = {
    "keyword": models.PayloadSchemaType.KEYWORD, "integer": models.PayloadSchemaType.INTEGER,
    "float": models.PayloadSchemaType.FLOAT, "bool": models.PayloadSchemaType.BOOL,
    "datetime": models.PayloadSchemaType.DATETIME}
# Vector floats per request: JSON costs up to ~20 bytes a float, and Qdrant
# refuses requests over 32 MB by default. 1,000 chunks of dimension 384 fit.
_MAX_FLOATS_PER_REQUEST = 500_000


class QdrantServerSink(CollectionSink):
    """Chunk points in a Qdrant server collection (see the module docstring).

    ``collection`` is the configured name (an alias). ``physical``, when given,
    is the physical collection ``open`` uses or creates instead, without
    reading or touching any alias (a rebuild fills a new collection this way
    while the live consumer keeps using the alias). ``filter_fields``
    (``source.filter_fields``) get payload indexes of their types. ``client`` lets a caller
    share an existing client (tests use it to reopen an in-memory store); a
    shared client is not closed by :meth:`close`.
    """

    _STORE = "Qdrant"
    _KEEP_CAUSE = False  # the cause may quote the request
    _CREATION_GRACE_S = 3.0  # see _alias_appears
    _INDEXING_WAIT_S = 3600.0  # see maintain

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
        filter_fields: Mapping[str, FieldType] | None = None,
        index: IndexSettings | None = None,
    ) -> None:
        self._endpoint = Endpoint(url, api_key, prefer_grpc, timeout_s, tls_ca_file, tls_verify)
        super().__init__(collection, physical, url, filter_fields)
        # None leaves each to the server's default (the client omits it).
        self._shard_number = shard_number
        self._replication_factor = replication_factor
        self._write_consistency_factor = write_consistency_factor
        self._client = client
        self._owns_client = client is None
        # sink.index: given to a chunk collection when it is created (a change applies to
        # collections created after it); the search parameters to every search.
        index = index or IndexSettings()
        self._index_params = collection_params(index)
        self._on_disk_vectors = index.on_disk_vectors or None
        # qdrant-client's in-process store scans exactly and warns at every search given any.
        self._search_params = None if url == ":memory:" else search_params(index)

    @classmethod
    def from_settings(cls, settings: SinkSettings, physical: str | None = None,
                      filter_fields: Mapping[str, FieldType] | None = None
                      ) -> QdrantServerSink:
        server = Endpoint.from_settings(settings)
        return cls(
            server.url, settings.collection, api_key=server.api_key,
            prefer_grpc=server.prefer_grpc, timeout_s=server.timeout_s,
            tls_ca_file=server.tls_ca_file, tls_verify=server.tls_verify,
            shard_number=settings.shard_number, replication_factor=settings.replication_factor,
            write_consistency_factor=settings.write_consistency_factor, physical=physical,
            filter_fields=filter_fields, index=settings.index,
        )

    # -- lifecycle ---------------------------------------------------------

    def _start(self) -> None:
        if self._client is None:
            self._client = self._connect()

    def _connect(self) -> QdrantClient:
        return self._endpoint.connect(self._where)

    def _read_aliases(self) -> Mapping[str, str]:
        return aliases_of(self._open())

    def _create_behind_alias(self, fingerprint: Fingerprint) -> bool:
        """Qdrant has no compare-and-set for aliases: create the collection,
        then the alias unless another process made it meanwhile; join that one's
        collection then."""
        client = self._open()
        with self._errors("create"):
            names = physical_names(client)
            taken = names | set(aliases_of(client))
        if made_for(self._alias, names) and self._alias_appears(client):
            return False  # another consumer made it meanwhile: resolve again
        leftover = self._open_leftover(names, fingerprint)
        name = leftover or new_physical_name(self._alias, taken.__contains__)
        if leftover is None:
            self._open_physical(name, fingerprint, via_alias=False)
        with self._errors("create the alias"):
            winner = aliases_of(client).get(self._alias)
            if winner is None:
                create_alias(client, self._alias, name)
                winner = aliases_of(client).get(self._alias)
        if winner == name:
            return True
        # Delete ours (empty, and nothing leads to it) so no orphan is left.
        for part in (name, f"{name}{STATE_SUFFIX}"):
            with contextlib.suppress(Exception):
                client.delete_collection(part)
        if winner is None:
            raise SinkError(f"alias {self._alias!r} at {self._at} vanished while it was "
                            "being created; try again")
        return self._open_physical(winner, fingerprint, via_alias=False)

    def _alias_appears(self, client: QdrantClient) -> bool:
        """Whether the alias appears within ``_CREATION_GRACE_S``: a consumer
        starting at the same instant may have created its collection and not
        yet the alias (Qdrant has no lock to wait on instead)."""
        deadline = time.monotonic() + self._CREATION_GRACE_S
        while True:
            with self._errors("read the aliases"):
                if self._alias in aliases_of(client):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def flush(self) -> None:
        """Nothing to do: every write waits for the server (``wait=True``),
        which holds it in its write-ahead log before answering."""

    def maintenance_due(self) -> bool:
        return False  # the server keeps its own index

    def maintain(self) -> None:
        """The server indexes in its own process; this waits until it has caught up
        with what was written (collection status green, or grey: nothing running), at
        most an hour. A rebuild calls it before the swap, so the new collection is fast
        from its first query; the consumer never does (``maintenance_due`` is False)."""
        self._check_open()
        deadline = time.monotonic() + self._INDEXING_WAIT_S
        while True:
            with self._errors("read the collection's status"):
                status = self._open().get_collection(self._collection).status
            if status == models.CollectionStatus.RED:
                raise SinkError(f"{self._chunks_where}: the server reports the collection "
                                "failed (status red); see the server's log")
            if status != models.CollectionStatus.YELLOW or time.monotonic() >= deadline:
                return
            time.sleep(2.0)

    def close(self) -> None:
        """Close the client if this sink made it. Writes are already durable
        (``wait=True``), so there is nothing to flush. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            with self._errors("close"):
                client.close()

    # -- the primitives of CollectionSink ------------------------------------

    def _check_open(self) -> None:
        self._open()

    def _open(self) -> QdrantClient:
        if self._client is None:
            raise SinkError(f"{self._where} is not open")
        return self._client

    def _has(self, name: str) -> bool:
        return self._open().collection_exists(name)

    def _load(self, part: Part, size: int | None = None) -> None:
        """Nothing to load: the server holds the collection open."""

    def _adopt(self, part: Part, size: int) -> None:
        client, name = self._open(), self._name(part)
        params = client.get_collection(name).config.params.vectors
        if not (isinstance(params, models.VectorParams) and params.size == size
                and params.distance == models.Distance.COSINE):
            raise FingerprintMismatch(not_ours_message(name, f"vectors {params}"))
        held = client.count(name, exact=True).count
        if held:
            raise FingerprintMismatch(not_ours_message(name, f"{held} points"))
        if part == STATE:  # made for another retrieval.sparse, its writes would all fail
            found = (client.get_collection(name).config.params.sparse_vectors or {}).get(
                SPARSE_NAME)
            self._check_leftover_sparse(found is not None, found is not None
                                        and found.modifier == models.Modifier.IDF)

    def _make(self, part: Part, size: int) -> None:
        try:
            self._open().create_collection(
                self._name(part),
                vectors_config=models.VectorParams(
                    size=size, distance=models.Distance.COSINE,
                    on_disk=self._on_disk_vectors if part == CHUNKS else None),
                sparse_vectors_config=({SPARSE_NAME: models.SparseVectorParams(
                    modifier=models.Modifier.IDF if self._sparse_idf else None)}
                    if part == STATE and self.sparse else None),
                shard_number=self._shard_number, replication_factor=self._replication_factor,
                write_consistency_factor=self._write_consistency_factor,
                **(self._index_params if part == CHUNKS else {}))
        except Exception as exc:
            # Another consumer created it just now: carry on with its collection.
            if not is_conflict(exc):
                raise

    def _index(self, part: Part, field: str, schema: Schema) -> None:
        with warnings.catch_warnings():
            # The in-memory store warns that it ignores payload indexes.
            warnings.filterwarnings("ignore", "Payload indexes have no effect")
            self._open().create_payload_index(self._name(part), field, _SCHEMAS[schema],
                                              wait=True)

    def _indexed(self, part: Part) -> Mapping[str, str]:
        # The in-memory store lists none: its indexes are asked for at every open (harmless).
        schema = self._open().get_collection(self._name(part)).payload_schema
        return {field: str(getattr(info.data_type, "value", info.data_type))
                for field, info in schema.items()}

    def _state_payloads(self, ids: Sequence[str]) -> list[Mapping[str, Any] | None]:
        found = self._open().retrieve(self._name(STATE), ids, with_payload=True)
        return [record.payload for record in found]

    def _put_states(self, points: list[StatePoint], durable: bool = False) -> None:
        # durable changes nothing: every write is in the server's WAL when it returns.
        self._open().upsert(self._name(STATE), wait=True, points=[
            models.PointStruct(id=pid, vector=_state_vectors(sparse), payload=payload)
            for pid, payload, sparse in points])

    def _write_chunks(self, plan: WritePlan) -> None:
        client = self._open()
        points = [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in plan.chunks]
        step = max(1, _MAX_FLOATS_PER_REQUEST // len(plan.chunks[0][1])) if plan.chunks else 1
        requests: list[list[models.UpdateOperation]] = [
            [models.UpsertOperation(upsert=models.PointsList(points=points[i:i + step]))]
            for i in range(0, len(points), step)] or [[]]
        # Leftover deletes ride in the last request, after every upsert; they
        # never touch the new chunks (their indexes are below the cut).
        requests[-1].extend(
            models.DeleteOperation(delete=models.FilterSelector(filter=_chunk_filter(ids, keep)))
            for keep, ids in plan.trims.items())
        for operations in requests:
            if operations:
                client.batch_update_points(self._collection, operations, wait=True)

    def _scroll_page(self, doc_ids: list[str] | None, payload: bool | list[str],
                     offset: Any) -> tuple[list[models.Record], Any]:
        only = None if doc_ids is None else _chunk_filter(doc_ids)
        return self._open().scroll(self._collection, scroll_filter=only, limit=SCROLL_PAGE,
                                   offset=offset, with_payload=payload, with_vectors=True)

    def _nearest(self, vector: list[float], limit: int,
                 only: Filter | None) -> list[models.ScoredPoint]:
        return self._open().query_points(
            self._collection, query=vector, limit=limit, with_payload=True,
            query_filter=None if only is None else _server_filter(only),
            search_params=self._search_params).points

    def _nearest_documents(self, vector: SparseVector, limit: int,
                           only: Filter | None) -> list[models.ScoredPoint]:
        return self._open().query_points(
            self._name(STATE), query=_server_sparse(vector), using=SPARSE_NAME, limit=limit,
            with_payload=True, query_filter=None if only is None else _server_filter(only)).points

    def _documents_page(self, offset: Any) -> tuple[list[models.Record], Any]:
        return self._open().scroll(self._name(STATE), limit=SCROLL_PAGE, offset=offset,
                                   with_payload=True, with_vectors=[SPARSE_NAME])

    def _translate(self, what: str, exc: Exception) -> SinkError:
        return self._endpoint.failure(exc, self._where, what)


def _server_sparse(vector: SparseVector) -> models.SparseVector:
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


def _state_vectors(sparse: SparseVector | None) -> models.VectorStruct:
    """A state point's vectors: the unused dense one, and the document's sparse one."""
    if sparse is None:
        return STATE_VECTOR
    return {"": STATE_VECTOR, SPARSE_NAME: _server_sparse(sparse)}


def _chunk_filter(doc_ids: list[str], from_index: int = 0) -> models.Filter:
    """The chunks of ``doc_ids`` (at ``from_index`` or above)."""
    must: list[models.Condition] = [
        models.FieldCondition(key="doc_id", match=models.MatchAny(any=doc_ids))]
    if from_index > 0:
        must.append(models.FieldCondition(key="chunk_index", range=models.Range(gte=from_index)))
    return models.Filter(must=must)


def _server_filter(only: Filter) -> models.Filter:
    """``only`` as a qdrant-client filter."""
    return models.Filter(must=[_server_condition(c) for c in only.must] or None,
                         must_not=[_server_condition(c) for c in only.must_not] or None)


def _server_condition(condition: Condition) -> models.Condition:
    if isinstance(condition, Match):
        return models.FieldCondition(key=condition.field,
                                     match=models.MatchValue(value=condition.value))
    bounds = {"gt": condition.gt, "gte": condition.gte, "lt": condition.lt,
              "lte": condition.lte}
    if condition.datetime:
        return models.FieldCondition(key=condition.field, range=models.DatetimeRange(
            **{k: None if v is None else datetime.fromisoformat(str(v))
               for k, v in bounds.items()}))
    return models.FieldCondition(key=condition.field, range=models.Range(
        **{k: None if v is None else float(v) for k, v in bounds.items()}))
