"""Collection aliases, the collection admin, the handover record and the
``collections`` commands, on both Qdrant sinks.

The server side runs on qdrant-client's in-memory store (it keeps aliases with
the server's rules); the Edge side on real shards in tmp_path.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import qdrant_edge as qe
import yaml
from qdrant_client import QdrantClient, models

from embedstream.sinks import QdrantEdgeSink, QdrantServerSink, build_admin, build_sink
from embedstream.sinks import qdrant_server as qdrant_server_module
from embedstream.sinks._edge_admin import QdrantEdgeAdmin
from embedstream.sinks._layout import looks_physical, new_physical_name, state_from_payload
from embedstream.sinks._server_admin import QdrantServerAdmin
from embedstream.stream.app import cli
from embedstream.stream.config import SinkSettings
from embedstream.stream.errors import SinkError
from embedstream.stream.fingerprint import Fingerprint
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite, Handover, Sink, SinkAdmin

DIM = 4
FP = Fingerprint(model="test/model", revision="r1", dimension=DIM, normalized=True,
                 chunker="tokens:64")
PHYSICAL = re.compile(r"docs_\d{8}T\d{6}Z(_\d+)?")


class Store:
    """One store of either kind, and the sinks and admins made on it."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.client = QdrantClient(":memory:") if kind == "server" else None
        self.opened: list[Sink] = []

    def sink(self, physical: str | None = None, alias: str = "docs") -> Sink:
        if self.client is None:
            return QdrantEdgeSink(self.root, alias, physical=physical)
        return QdrantServerSink(":memory:", alias, client=self.client, physical=physical)

    def open(self, physical: str | None = None, docs: dict[str, int] | None = None) -> Sink:
        """An open sink, holding ``docs`` (doc id -> chunk count)."""
        sink = self.sink(physical)
        sink.open(FP)
        self.opened.append(sink)
        if docs:
            sink.apply([write(doc, n) for doc, n in docs.items()])
        return sink

    def admin(self) -> SinkAdmin:
        if self.client is None:
            return QdrantEdgeAdmin(self.root)
        return QdrantServerAdmin(SinkSettings(kind="qdrant", url=":memory:"), client=self.client)

    def foreign(self, name: str) -> None:
        """A collection with a point but no embedstream fingerprint."""
        if self.client is None:
            shard = qe.EdgeShard.create(str(self.root / name), qe.EdgeConfig(
                vectors=qe.EdgeVectorParams(size=DIM, distance=qe.Distance.Cosine)))
            shard.update(qe.UpdateOperation.upsert_points([qe.Point(1, [1.0] * DIM, {})]))
            shard.close()
        else:
            self.client.create_collection(name, vectors_config=models.VectorParams(
                size=DIM, distance=models.Distance.COSINE))
            self.client.upsert(name, [models.PointStruct(id=1, vector=[1.0] * DIM)])

    def close(self) -> None:
        for sink in self.opened:
            sink.close()
        if self.client is not None:
            self.client.close()


def write(doc: str, n: int) -> DocumentWrite:
    vectors = np.eye(DIM, dtype=np.float32)
    return DocumentWrite(doc, DocState(1, 0, False), [
        ChunkPoint(i, vectors[i % DIM], {"doc_id": doc, "chunk_index": i}) for i in range(n)])


def docs_in(sink: Sink) -> set[str]:
    return {str(p.payload["doc_id"]) for p in sink.points()}


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made = Store(request.param, tmp_path / "data")
    yield made
    made.close()


# -- opening through the alias -------------------------------------------------


def test_first_open_creates_a_timestamped_collection_and_the_alias(store: Store) -> None:
    first = store.open(docs={"a": 2})
    assert PHYSICAL.fullmatch(first.collection), first.collection
    assert store.admin().resolve("docs") == first.collection
    first.close()
    again = store.open()
    assert again.collection == first.collection
    assert docs_in(again) == {"a"}


def test_a_collection_named_like_the_alias_is_opened_directly(store: Store) -> None:
    store.open(physical="docs", docs={"old": 1}).close()  # a store made before aliases
    sink = store.open()
    assert sink.collection == "docs" and docs_in(sink) == {"old"}
    assert store.admin().resolve("docs") is None  # and no alias was made


def test_physical_creates_exactly_that_and_leaves_the_alias_alone(store: Store) -> None:
    live = store.open(docs={"a": 1})
    rebuilt = store.open(physical="docs_next", docs={"b": 1})
    assert rebuilt.collection == "docs_next"
    assert store.admin().resolve("docs") == live.collection
    assert docs_in(live) == {"a"} and docs_in(rebuilt) == {"b"}
    rebuilt.close()
    assert docs_in(store.open(physical="docs_next")) == {"b"}  # reopened, not recreated


def test_switch_is_atomic_returns_the_previous_target_and_reopens_see_it(store: Store) -> None:
    old = store.open(docs={"a": 1})
    new = store.open(physical="docs_new", docs={"b": 2})
    admin = store.admin()
    assert admin.switch("docs", "docs_new") == old.collection
    assert admin.resolve("docs") == "docs_new"
    assert docs_in(old) == {"a"}  # an open sink keeps its collection until reopened
    new.close()
    reopened = store.open()
    assert reopened.collection == "docs_new" and docs_in(reopened) == {"b"}
    assert admin.switch("docs", old.collection) == "docs_new"  # and back
    assert admin.switch("fresh", "docs_new") is None  # a new alias: no previous target
    admin.close()


def test_switch_refuses_a_missing_foreign_or_alias_target(store: Store) -> None:
    live = store.open()
    store.foreign("foreign")
    admin = store.admin()
    with pytest.raises(SinkError, match="no collection named 'nope'"):
        admin.switch("docs", "nope")
    with pytest.raises(SinkError, match="no embedstream fingerprint"):
        admin.switch("docs", "foreign")
    with pytest.raises(SinkError, match="is an alias"):
        admin.switch("other", "docs")
    with pytest.raises(SinkError, match="not a valid"):
        admin.switch("docs", "../x")
    assert admin.resolve("docs") == live.collection


def test_server_switch_refuses_an_alias_named_like_a_collection() -> None:
    client = QdrantClient(":memory:")
    QdrantServerSink(":memory:", "docs", client=client, physical="docs").open(FP)
    QdrantServerSink(":memory:", "docs", client=client, physical="docs_new").open(FP)
    admin = QdrantServerAdmin(SinkSettings(kind="qdrant", url=":memory:"), client=client)
    with pytest.raises(SinkError, match=r"made before embedstream used aliases.*drop it"):
        admin.switch("docs", "docs_new")
    assert admin.resolve("docs") is None


def test_server_open_joins_an_alias_made_meanwhile_and_deletes_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = QdrantClient(":memory:")
    other = QdrantServerSink(":memory:", "docs", client=client)
    real = new_physical_name

    def racing(alias: str, taken: Any, now: float | None = None) -> str:
        if other.collection == "docs":  # first call: not opened yet
            monkeypatch.setattr(qdrant_server_module, "new_physical_name", real)
            other.open(FP)  # another process creates its collection and the alias first
        return "docs_20000101T000000Z"

    monkeypatch.setattr(qdrant_server_module, "new_physical_name", racing)
    sink = QdrantServerSink(":memory:", "docs", client=client)
    sink.open(FP)
    assert sink.collection == other.collection != "docs_20000101T000000Z"
    names = {c.name for c in client.get_collections().collections}
    assert not any(n.startswith("docs_2000") for n in names)  # its own was deleted


def test_edge_aliases_file_is_replaced_whole(tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path, "docs")
    sink.open(FP)
    sink.close()
    admin = QdrantEdgeAdmin(tmp_path)
    target = admin.resolve("docs")
    assert json.loads((tmp_path / "aliases.json").read_text()) == {"docs": target}
    assert not list(tmp_path.glob(".aliases.*.tmp"))


def test_edge_open_refuses_an_alias_to_nothing(tmp_path: Path) -> None:
    (tmp_path / "aliases.json").write_text(json.dumps({"docs": "docs_gone"}))
    with pytest.raises(SinkError, match="points at 'docs_gone', which does not exist"):
        QdrantEdgeSink(tmp_path, "docs").open(FP)


def test_edge_switch_moves_a_store_made_before_aliases_onto_the_alias(tmp_path: Path) -> None:
    legacy = QdrantEdgeSink(tmp_path, "docs", physical="docs")
    legacy.open(FP)
    legacy.close()
    rebuilt = QdrantEdgeSink(tmp_path, "docs", physical="docs_new")
    rebuilt.open(FP)
    rebuilt.close()
    # Unlike a server, Edge lets the alias share the old collection's name; the alias wins.
    assert QdrantEdgeAdmin(tmp_path).switch("docs", "docs_new") is None
    sink = QdrantEdgeSink(tmp_path, "docs")
    sink.open(FP)
    sink.close()
    assert sink.collection == "docs_new"


def test_edge_processes_creating_a_store_at_once_share_one_collection(tmp_path: Path) -> None:
    start, tried = threading.Barrier(3), threading.Barrier(3, timeout=30)
    results: list[str] = []

    def opener() -> None:
        sink = QdrantEdgeSink(tmp_path, "docs")
        start.wait(timeout=30)
        try:
            sink.open(FP)
            results.append("opened")
        except SinkError as error:  # the collection is held by the one that made it
            results.append("in use" if "in use" in str(error) else str(error))
        tried.wait()  # the winner holds it open until every opener has tried
        sink.close()

    threads = [threading.Thread(target=opener) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == ["in use", "in use", "opened"]
    assert [d.name for d in tmp_path.iterdir() if PHYSICAL.fullmatch(d.name)] == [
        QdrantEdgeAdmin(tmp_path).resolve("docs")]


def test_new_physical_names_take_a_suffix_when_taken() -> None:
    now = 1_795_000_000.0
    first = new_physical_name("docs", lambda n: False, now)
    assert PHYSICAL.fullmatch(first) and looks_physical(first)
    taken = {first, f"{first}_2_state"}
    assert new_physical_name("docs", taken.__contains__, now) == f"{first}_3"
    assert not looks_physical("docs") and not looks_physical("docs_state")


# -- listing and dropping ------------------------------------------------------


def test_list_shows_aliases_counts_and_fingerprints_and_skips_state(store: Store) -> None:
    live = store.open(docs={"a": 3, "b": 1})
    store.open(physical="docs_next", docs={"c": 1}).close()
    store.foreign("foreign")
    live.write_handover({("t", 0): 5})  # a state point, not a chunk
    live.close()
    infos = {info.name: info for info in store.admin().collections()}
    assert set(infos) == {live.collection, "docs_next", "foreign"}
    assert infos[live.collection].aliases == ("docs",)
    assert infos[live.collection].points == 4
    assert infos[live.collection].fingerprint == FP
    assert infos["docs_next"].aliases == () and infos["docs_next"].points == 1
    assert infos["foreign"].fingerprint is None and infos["foreign"].points == 1


def test_edge_list_shows_an_open_collection_as_in_use(tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path, "docs")
    sink.open(FP)
    try:
        [info] = QdrantEdgeAdmin(tmp_path).collections()
        assert info.in_use and info.points is None
        assert info.fingerprint == FP  # open in this process: known without reading
    finally:
        sink.close()


def test_drop_refuses_the_alias_target_without_force(store: Store) -> None:
    live = store.open(docs={"a": 1})
    store.open(physical="docs_next").close()
    live.close()
    admin = store.admin()
    with pytest.raises(SinkError, match=r"alias 'docs' points at it.*--force"):
        admin.drop(live.collection)
    admin.drop("docs_next")
    admin.drop(live.collection, force=True)
    assert admin.collections() == [] and admin.resolve("docs") is None
    with pytest.raises(SinkError, match="no collection named"):
        admin.drop("docs_next")


def test_drop_refuses_what_is_not_an_embedstream_collection(store: Store) -> None:
    live = store.open()
    live.close()
    store.foreign("foreign")
    admin = store.admin()
    with pytest.raises(SinkError, match="not made by embedstream"):
        admin.drop("foreign")
    with pytest.raises(SinkError, match="is an alias"):
        admin.drop("docs")
    with pytest.raises(SinkError, match="belongs to collection"):
        admin.drop(f"{live.collection}_state")
    assert {i.name for i in admin.collections()} == {live.collection, "foreign"}


def test_edge_drop_refuses_a_collection_another_sink_has_open(tmp_path: Path) -> None:
    sink = QdrantEdgeSink(tmp_path, "docs", physical="docs_next")
    sink.open(FP)
    admin = QdrantEdgeAdmin(tmp_path)
    try:
        with pytest.raises(SinkError, match=r"is open in this process.*stop it"):
            admin.drop("docs_next")
    finally:
        sink.close()
    admin.drop("docs_next")
    assert not (tmp_path / "docs_next").exists()
    assert not (tmp_path / "docs_next_state").exists()


def test_build_admin_chooses_by_kind(tmp_path: Path) -> None:
    assert isinstance(build_admin(SinkSettings(kind="qdrant-edge", path=tmp_path)),
                      QdrantEdgeAdmin)
    server = build_admin(SinkSettings(kind="qdrant", url=":memory:"))
    assert isinstance(server, QdrantServerAdmin)
    server.close()
    edge = build_sink(SinkSettings(kind="qdrant-edge", path=tmp_path), physical="documents_x")
    assert edge.collection == "documents_x"


# -- the handover record -------------------------------------------------------


def test_handover_round_trips_and_acknowledgements_accumulate(store: Store) -> None:
    sink = store.open(physical="docs_next", docs={"a": 2})
    assert sink.read_handover() is None
    with pytest.raises(SinkError, match="no handover record"):
        sink.acknowledge_handover("g", [("t", 0)])
    sink.write_handover({("t", 0): 10, ("t", 1): 7, ("u", 0): 0})
    sink.acknowledge_handover("g1", [("t", 0)])
    sink.acknowledge_handover("g1", [("t", 1)])
    sink.acknowledge_handover("g2", {("u", 0)})
    sink.close()
    again = store.open(physical="docs_next")
    assert again.read_handover() == Handover(
        {("t", 0): 10, ("t", 1): 7, ("u", 0): 0},
        {"g1": frozenset({("t", 0), ("t", 1)}), "g2": frozenset({("u", 0)})})
    again.write_handover({("t", 0): 11})  # replaces the record and its acknowledgements
    assert again.read_handover() == Handover({("t", 0): 11}, {})


def test_special_points_are_never_documents(store: Store) -> None:
    sink = store.open(docs={"a": 2})
    sink.write_handover({("t", 0): 1})
    sink.acknowledge_handover("g", [("t", 0)])
    assert {p.payload["doc_id"] for p in sink.points()} == {"a"}
    assert len(list(sink.points())) == 2
    assert sink.document_states(["a", "handover", "fingerprint", ""]) == {
        "a": DocState(1, 0, False)}
    sink.close()
    state = f"{sink.collection}_state"  # a scroll of the whole state collection, too
    if store.client is None:
        shard = qe.EdgeShard.load(str(store.root / state), None)
        records, _ = shard.scroll(qe.ScrollRequest(limit=100, with_payload=True))
        shard.close()
    else:
        records, _ = store.client.scroll(state, limit=100, with_payload=True)
    assert len(records) == 3  # the document, the fingerprint and the handover
    assert [found for r in records if (found := state_from_payload(r.payload))] == [
        ("a", DocState(1, 0, False))]


# -- the commands --------------------------------------------------------------


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "embedstream.yaml"
    path.write_text(yaml.safe_dump({"sink": {"kind": "qdrant-edge",
                                             "path": str(tmp_path / "store"),
                                             "collection": "docs"}}))
    return path


def test_collections_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    # main() would point the root logger at this test's captured stderr for good.
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)
    config = str(config_file(tmp_path))
    live = QdrantEdgeSink(tmp_path / "store", "docs")
    live.open(FP)
    live.apply([write("a", 2)])
    live.write_handover({("t", 0): 3})
    live.close()
    old = QdrantEdgeSink(tmp_path / "store", "docs", physical="docs_old")
    old.open(FP)
    old.close()

    assert cli.main(["collections", "list", "--config", config]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "POINTS", "ALIASES", "MODEL", "DIM"]
    assert table[1].split() == ["*", live.collection, "2", "docs", "test/model", str(DIM)]
    assert table[2].split() == ["docs_old", "0", "-", "test/model", str(DIM)]
    assert "'docs'" in table[-1]  # the legend of the mark

    assert cli.main(["collections", "list", "--json", "--config", config]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == {"name": live.collection, "points": 2, "aliases": ["docs"],
                       "model": "test/model", "dimension": DIM, "current": True,
                       "route": "default", "in_use": False}

    assert cli.main(["collections", "switch", "docs_old", "--config", config]) == 0
    assert capsys.readouterr().out == f"docs -> docs_old (was {live.collection})\n"
    assert cli.main(["collections", "switch", "docs_missing", "--config", config]) == 2
    capsys.readouterr()
    assert cli.main(["collections", "switch", live.collection, "--config", config]) == 0
    capsys.readouterr()

    assert cli.main(["collections", "drop", live.collection, "--config", config]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("embedstream: error:") and "--force" in error
    assert "\n" not in error
    assert cli.main(["collections", "drop", live.collection, "--force", "--config",
                     config]) == 0
    assert capsys.readouterr().out == f"dropped {live.collection}\n"
