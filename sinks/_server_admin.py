"""Collections and aliases on a Qdrant server (or qdrant-client's local mode).

Aliases are Qdrant's own. A switch is one ``update_collection_aliases`` call
holding a delete-alias and a create-alias operation: the server applies the
operations of one call under one lock, so no request ever sees the alias
missing or half-switched. Not guaranteed by the server: rollback. A call whose
create fails after its delete (the target deleted by someone else in between)
leaves the alias deleted; :meth:`QdrantServerAdmin.switch` checks the target
just before, so that takes a concurrent drop. (The local mode applies the call
all or nothing.)

Qdrant refuses an alias named like an existing collection, and the other way
round. A store made before aliases has a collection named like the alias, so
the alias cannot be created until that collection is gone (see ``switch``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from qdrant_client import QdrantClient, models

from embedstream.sinks._admin_rules import (
    aliases_by_target,
    aliases_to_drop,
    check_names,
    not_found,
    refuse_part,
)
from embedstream.sinks._layout import (
    FINGERPRINT_POINT_ID,
    STATE_SUFFIX,
    listed_names,
    looks_physical,
    orphan_owner,
    parse_fingerprint,
)
from embedstream.sinks._server_client import Endpoint, aliases_of, physical_names
from embedstream.stream.config import SinkSettings
from embedstream.stream.errors import FingerprintMismatch, SinkError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import CollectionInfo

__all__ = ["QdrantServerAdmin"]


class QdrantServerAdmin:
    """:class:`~embedstream.stream.store.SinkAdmin` of a Qdrant server (see the module
    docstring).

    ``client`` shares an existing client (tests use it for an in-memory store);
    a shared client is not closed by :meth:`close`. Nothing here can tell
    whether a consumer is using a collection: ``drop`` trusts the aliases."""

    def __init__(self, settings: SinkSettings, *, client: QdrantClient | None = None) -> None:
        self._endpoint = Endpoint.from_settings(settings)
        self._where = f"Qdrant at {settings.url}"
        self._owns_client = client is None
        self._client: QdrantClient | None = client or self._endpoint.connect(self._where)

    def resolve(self, alias: str) -> str | None:
        with self._errors("read the aliases"):
            return aliases_of(self._open()).get(alias)

    def probe(self, alias: str) -> None:
        """Creates nothing: the server answers (and knows the alias, or not)."""
        self.resolve(alias)

    def switch(self, alias: str, target: str) -> str | None:
        check_names(target, alias=alias)
        client = self._open()
        with self._errors(f"point alias {alias!r} at {target!r}"):
            names, aliases = physical_names(client), aliases_of(client)
            if alias in names:
                raise SinkError(
                    f"a collection named {alias!r} exists (made before embedstream used "
                    f"aliases), and Qdrant cannot give an alias the name of a collection. Stop "
                    f"the consumers writing into it, drop it (`embedstream collections drop "
                    f"{alias}`), then switch again: consumers then open {alias!r} through the "
                    "alias. Searches of that name fail in between.")
            self._require_ours(client, target, names, aliases)
            if target not in names:
                raise SinkError(f"collection {target!r} at {self._where} has lost its chunks "
                                "(an interrupted drop?); drop it instead")
            # One call: the server applies both under one lock (see the module docstring).
            client.update_collection_aliases([
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)),
                models.CreateAliasOperation(create_alias=models.CreateAlias(
                    collection_name=target, alias_name=alias)),
            ])
        return aliases.get(alias)

    def collections(self) -> list[CollectionInfo]:
        client = self._open()
        with self._errors("list the collections"):
            names = physical_names(client)
            pointing = aliases_by_target(aliases_of(client))
            infos = []
            for name in listed_names(names):
                owner = orphan_owner(name, names)
                found = owner and _fingerprint(client, owner, names)
                if owner and found:  # the state of a half-dropped collection is listed as it
                    infos.append(CollectionInfo(owner, 0, pointing(owner), found))
                else:
                    infos.append(CollectionInfo(name, client.count(name, exact=True).count,
                                                pointing(name), _fingerprint(client, name, names)))
            return infos

    def drop(self, name: str, force: bool = False) -> None:
        check_names(name)
        client = self._open()
        with self._errors(f"drop {name!r}"):
            names, aliases = physical_names(client), aliases_of(client)
            self._require_ours(client, name, names, aliases)
            pointing = aliases_to_drop(name, aliases, force)
            if pointing:  # first, so no alias ever leads to a half-deleted collection
                client.update_collection_aliases([
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=a))
                    for a in pointing])
            # Chunks before state: an interrupted drop leaves the state, whose
            # fingerprint lets `list` show it as this collection and the next drop finish.
            if name in names:
                client.delete_collection(name)
            if f"{name}{STATE_SUFFIX}" in names:
                client.delete_collection(f"{name}{STATE_SUFFIX}")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            with self._errors("close"):
                client.close()

    # -- helpers -----------------------------------------------------------

    def _require_ours(self, client: QdrantClient, name: str, names: set[str],
                      aliases: dict[str, str]) -> None:
        """Refuse ``name`` unless it is an embedstream collection: one with a
        fingerprint, or an empty leftover of an interrupted creation."""
        state = f"{name}{STATE_SUFFIX}"
        if name not in names and state not in names:
            raise not_found(name, aliases, f"{self._where} has no collection named {name!r}")
        # <x>_state belongs to <x> while <x> is there, and also after an
        # interrupted drop deleted <x>: then its fingerprint says so.
        orphaned = orphan_owner(name, names)
        refuse_part(name, lambda owner: owner in names or (
            owner == orphaned and _fingerprint(client, owner, names) is not None))
        if _fingerprint(client, name, names) is not None:
            return
        if looks_physical(name) and name in names and client.count(
                name, exact=True).count == 0 and (
                state not in names or client.count(state, exact=True).count == 0):
            return
        raise SinkError(f"collection {name!r} holds no embedstream fingerprint: it was not "
                        "made by embedstream; refusing to touch it")

    def _open(self) -> QdrantClient:
        if self._client is None:
            raise SinkError(f"{self._where}: the admin is closed")
        return self._client

    def _errors(self, what: str) -> AbstractContextManager[None]:
        return self._endpoint.errors(self._where, what)


def _fingerprint(client: QdrantClient, name: str, names: set[str]) -> Fingerprint | None:
    """The fingerprint of collection ``name``; None when it has none, or one
    this version cannot read."""
    if f"{name}{STATE_SUFFIX}" not in names:
        return None
    found = client.retrieve(f"{name}{STATE_SUFFIX}", [FINGERPRINT_POINT_ID], with_payload=True)
    try:
        return parse_fingerprint(found[0].payload if found else None, name)
    except FingerprintMismatch:
        return None
