"""Collection names and a lost or damaged alias: one name rule for every name
(config, command line, ``aliases.json``, rebuild checkpoints) checked before
any path is built; no new, empty collection behind an alias that was lost; an
interrupted ``collections drop`` that the next one finishes.

Real stores: Qdrant Edge shards in tmp_path and qdrant-client's in-memory
server; the commands through ``cli.main`` as a user runs them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from qdrant_client import models

from embedstream.bulk.checkpoint import Checkpoint, CheckpointStore
from embedstream.sinks import QdrantEdgeSink, QdrantServerSink
from embedstream.sinks._edge_admin import QdrantEdgeAdmin
from embedstream.stream.app import cli
from embedstream.stream.config import load_settings
from embedstream.stream.errors import ConfigError, NeedsOperator, SinkError, StoreDiskFull
from embedstream.stream.names import MAX_ALIAS, MAX_COLLECTION
from embedstream.stream.store import ChunkPoint, DocState, DocumentWrite

from .test_aliases import FP, Store, docs_in, write

BAD_NAMES = ["../x", "a/b", "/abs/olute", "a\x07b", "tab\tname", "$(id)", "..", ".", "a..b",
             "-dash"]
INDEXED = {f"d{i}": 1 for i in range(30)}


@pytest.fixture(params=["edge", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made = Store(request.param, tmp_path / "store")
    yield made
    made.close()


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``embedstream ARGS``: (exit code, stdout, stderr)."""
    # main() would point the root logger at this test's captured stderr for good.
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)

    def call(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def config_file(tmp_path: Path, collection: str = "docs", **extra: Any) -> str:
    path = tmp_path / "embedstream.yaml"
    path.write_text(yaml.safe_dump({
        "sink": {"kind": "qdrant-edge", "path": str(tmp_path / "store"),
                 "collection": collection},
        "metrics": {"enabled": False}, **extra}))
    return str(path)


def indexed_edge_store(root: Path) -> str:
    """An Edge store whose alias ``docs`` leads to 30 indexed documents; the
    physical collection's name."""
    sink = QdrantEdgeSink(root, "docs")
    sink.open(FP)
    sink.apply([write(doc, n) for doc, n in INDEXED.items()])
    sink.close()
    return sink.collection


def alias_serves_the_index(root: Path) -> str:
    """The alias opens onto every indexed document again; returns its collection."""
    sink = QdrantEdgeSink(root, "docs")
    sink.open(FP)
    try:
        assert docs_in(sink) == set(INDEXED)
        return sink.collection
    finally:
        sink.close()


def shards(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


# -- a lost or damaged alias (issue 14, item 2) ---------------------------------


@pytest.mark.parametrize("damage", ["deleted", "{}"])
def test_a_lost_alias_never_puts_an_empty_collection_in_front_of_the_index(
        tmp_path: Path, damage: str, run: Callable[..., tuple[int, str, str]]) -> None:
    root = tmp_path / "store"
    live = indexed_edge_store(root)
    if damage == "deleted":  # as the old "fix or delete it" message advised
        (root / "aliases.json").unlink()
    else:
        (root / "aliases.json").write_text(damage)
    before = shards(root)
    with pytest.raises(NeedsOperator) as refused:
        QdrantEdgeSink(root, "docs").open(FP)
    assert live in str(refused.value) and "collections switch" in str(refused.value)
    assert shards(root) == before  # no new collection was made
    config = config_file(tmp_path)
    code, out, _ = run("collections", "list", "--config", config)
    assert code == 0 and live in out
    assert run("collections", "switch", live, "--config", config)[0] == 0
    assert alias_serves_the_index(root) == live


def test_the_consumer_stops_with_the_refusal_instead_of_indexing_into_a_new_collection(
        tmp_path: Path, tiny_model_dir: Path, run: Callable[..., tuple[int, str, str]]) -> None:
    root = tmp_path / "store"
    # Made with the tiny model's fingerprint: the consumer opens it under its own.
    from embedstream.stream.app.service import build_pipeline

    config = config_file(tmp_path, embed={"model": str(tiny_model_dir)},
                         kafka={"bootstrap_servers": "127.0.0.1:9"})
    pipeline = build_pipeline(load_settings(config))
    live = pipeline.sink.collection
    vector = np.ones(pipeline.embedder.dimension, np.float32)
    pipeline.sink.apply([DocumentWrite("a", DocState(1, 0, False), [
        ChunkPoint(0, vector, {"doc_id": "a", "chunk_index": 0})])])
    pipeline.close()
    (root / "aliases.json").unlink()
    before = shards(root)
    code, _, err = run("consume", "--config", config)
    assert code == 2
    assert "embedstream: error: alias 'docs'" in err and live in err
    assert "collections switch" in err
    assert shards(root) == before


def test_a_first_creation_cut_short_by_a_full_disk_is_adopted_not_refused(
        tmp_path: Path) -> None:
    """The disk fills between creating the first collection and writing the alias:
    once space returns the store opens that (empty) collection, rather than
    taking it for a lost alias's or making a second one."""
    root, free = tmp_path / "store", [10**12]
    sink = QdrantEdgeSink(root, "docs", min_free_bytes=2**26, free=lambda path: free[0])
    original_flush = sink.flush

    def flush_on_a_filling_disk() -> None:
        free[0] = 2**20  # the creation's own writes took the last of it
        original_flush()

    sink.flush = flush_on_a_filling_disk  # type: ignore[method-assign]
    with pytest.raises(StoreDiskFull):
        sink.open(FP)
    [made] = {name for name in shards(root) if not name.endswith("_state")}
    assert not (root / "aliases.json").exists()
    free[0] = 10**12
    again = QdrantEdgeSink(root, "docs", min_free_bytes=2**26, free=lambda path: free[0])
    again.open(FP)
    try:
        assert again.collection == made and docs_in(again) == set()
        assert json.loads((root / "aliases.json").read_text()) == {"docs": made}
    finally:
        again.close()


def test_a_damaged_aliases_json_is_repaired_by_switch_not_by_deleting_it(
        tmp_path: Path, run: Callable[..., tuple[int, str, str]]) -> None:
    root = tmp_path / "store"
    live = indexed_edge_store(root)
    (root / "aliases.json").write_text('{"docs": "' + live)  # torn
    with pytest.raises(NeedsOperator, match=r"aliases\.json is damaged.*Do not delete it"):
        QdrantEdgeSink(root, "docs").open(FP)
    config = config_file(tmp_path)
    # The message sends the operator to `list` (which still lists) and `switch`.
    code, out, err = run("collections", "list", "--config", config)
    assert code == 2 and live in out
    assert "aliases.json is damaged" in err and "collections switch NAME" in err
    assert run("collections", "switch", live, "--config", config)[0] == 0
    assert json.loads((root / "aliases.json").read_text()) == {"docs": live}
    assert (root / "aliases.json.damaged").read_text() == '{"docs": "' + live
    alias_serves_the_index(root)


@pytest.mark.parametrize("target", ["../../x", "../outside/victim", "/tmp/x", "a/b"])
def test_an_alias_target_with_a_path_in_aliases_json_is_a_clear_error(
        tmp_path: Path, target: str, run: Callable[..., tuple[int, str, str]]) -> None:
    root = tmp_path / "store"
    live = indexed_edge_store(root)
    (tmp_path / "outside").mkdir()
    damaged = json.dumps({"docs": target, "other": live})
    (root / "aliases.json").write_text(damaged)
    config = config_file(tmp_path)
    code, _, err = run("export", "--config", config)
    assert code == 2
    assert "aliases.json is damaged" in err and repr(target) in err
    assert list((tmp_path / "outside").iterdir()) == []  # nothing made outside the store
    # The repair keeps the entries that were sound.
    assert run("collections", "switch", live, "--config", config)[0] == 0
    assert json.loads((root / "aliases.json").read_text()) == {"docs": live, "other": live}
    assert (root / "aliases.json.damaged").read_text() == damaged
    alias_serves_the_index(root)


def test_server_a_lost_alias_never_puts_an_empty_collection_in_front_of_the_index(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(QdrantServerSink, "_CREATION_GRACE_S", 0.2, raising=False)
    store = Store("server", tmp_path)
    try:
        live = store.open(docs=INDEXED)
        live.close()
        assert store.client is not None
        store.client.update_collection_aliases([models.DeleteAliasOperation(
            delete_alias=models.DeleteAlias(alias_name="docs"))])
        before = {c.name for c in store.client.get_collections().collections}
        with pytest.raises(NeedsOperator, match=rf"{live.collection}.*collections switch"):
            store.sink().open(FP)
        assert {c.name for c in store.client.get_collections().collections} == before
        store.admin().switch("docs", live.collection)
        assert docs_in(store.open()) == set(INDEXED)
    finally:
        store.close()


def test_fresh_and_legacy_stores_and_other_aliases_still_open(store: Store) -> None:
    other = store.sink(alias="docs_v2")  # another alias's collections are not ours
    other.open(FP)
    other.close()
    fresh = store.open(docs={"a": 1})
    assert fresh.collection.startswith("docs_2") and docs_in(fresh) == {"a"}
    legacy = Store(store.kind, store.root.with_name("legacy"))
    try:
        legacy.open(physical="docs", docs={"old": 1}).close()  # made before aliases
        assert legacy.open().collection == "docs"
    finally:
        legacy.close()


# -- one name rule (item 5 and the clear errors) --------------------------------


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_with_paths_or_odd_characters_are_refused_everywhere(
        store: Store, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"sink\.collection"):
        load_settings(None, sink={"collection": bad})
    with pytest.raises(ConfigError, match=r"sink\.collection"):
        store.sink(alias=bad)
    admin = store.admin()
    try:
        with pytest.raises(SinkError, match="not a valid"):
            admin.drop(bad)
        with pytest.raises(SinkError, match="not a valid"):
            admin.switch("docs", bad)
        with pytest.raises(SinkError, match="not a valid"):
            admin.switch(bad, "docs")
    finally:
        admin.close()


def test_a_250_character_name_is_a_clear_error_not_a_traceback(
        tmp_path: Path, run: Callable[..., tuple[int, str, str]]) -> None:
    long = "x" * 250
    code, _, err = run("export", "--config", config_file(tmp_path, collection=long))
    assert code == 2 and "sink.collection" in err and "at most 200" in err
    config = config_file(tmp_path)
    for args in (["collections", "drop", long], ["collections", "switch", long]):
        code, _, err = run(*args, "--config", config)
        assert code == 2 and "not a valid collection name" in err, args


def test_the_longest_names_allowed_fit_every_name_made_from_them(tmp_path: Path) -> None:
    alias = "a" * MAX_ALIAS
    sink = QdrantEdgeSink(tmp_path / "store", alias)  # <alias>_<ts>, _state, .lock
    sink.open(FP)
    sink.apply([write("d", 2)])
    sink.close()
    physical = sink.collection
    assert len(physical) <= MAX_COLLECTION
    assert [i.name for i in QdrantEdgeAdmin(tmp_path / "store").collections()] == [physical]
    checkpoints = CheckpointStore(tmp_path / "state")
    checkpoints.save(Checkpoint(alias, "kafka", [], "{}", None, physical))
    assert checkpoints.load_or_new(alias, restart=False, source="kafka", files=[],
                                   fingerprint="{}", output=None, target=None).target == physical
    with pytest.raises(ConfigError, match="at most 200"):
        QdrantEdgeSink(tmp_path / "store", "a" * (MAX_ALIAS + 1))


def outside_files(tmp_path: Path) -> dict[str, str]:
    """Files a rebuild of ``../../outside/victim`` would reach from the state
    directory ``<tmp>/store/.rebuild``."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    files = {"victim.json": Checkpoint("docs", "elsewhere", [], "{}", None, "docs_x").to_json(),
             "victim.failures.jsonl": "keep me\n"}
    for name, text in files.items():
        (outside / name).write_text(text)
    return files


@pytest.mark.parametrize("restart", [True, False])
def test_rebuild_never_touches_files_outside_the_store(
        tmp_path: Path, tiny_model_dir: Path, restart: bool,
        run: Callable[..., tuple[int, str, str]]) -> None:
    files = outside_files(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "text": "alpha"}\n')
    config = config_file(tmp_path, embed={"model": str(tiny_model_dir)},
                         source={"text_fields": ["text"]})
    code, _, err = run("rebuild", "--source", str(corpus), "--collection",
                       "../../outside/victim", "--no-handover", "--config", config,
                       *(["--restart"] if restart else []))
    assert {p.name: p.read_text() for p in (tmp_path / "outside").iterdir()} == files
    # Refused while the command line is parsed, naming what was typed.
    assert code == 2 and "--collection: '../../outside/victim' is not a valid" in err
    assert not (tmp_path / "store").exists()  # refused before anything was built


def test_checkpoint_names_are_checked_before_a_path_is_built(tmp_path: Path) -> None:
    files = outside_files(tmp_path)
    checkpoints = CheckpointStore(tmp_path / "store" / ".rebuild")
    for restart in (True, False):
        with pytest.raises(ConfigError, match="not a valid collection name"):
            checkpoints.load_or_new("../../outside/victim", restart=restart, source="x",
                                    files=[], fingerprint="{}", output=None, target="docs_1")
    with pytest.raises(ConfigError, match="not a valid collection name"):
        checkpoints.remove("../../outside/victim")
    assert {p.name: p.read_text() for p in (tmp_path / "outside").iterdir()} == files


@pytest.mark.parametrize("content", [
    "[]", "null", "3", '"docs"',
    # names that would become paths when the rebuild saves, removes or opens them
    json.dumps({**json.loads(Checkpoint("docs", "x", [], "{}", None, "docs_1").to_json()),
                "name": "../../victim"}),
    json.dumps({**json.loads(Checkpoint("docs", "x", [], "{}", None, "docs_1").to_json()),
                "target": "../../victim"}),
    Checkpoint("other", "x", [], "{}", None, "docs_1").to_json(),
])
def test_a_damaged_rebuild_checkpoint_is_a_clear_error(tmp_path: Path, content: str) -> None:
    checkpoints = CheckpointStore(tmp_path)
    checkpoints.path("docs").write_text(content)
    with pytest.raises(ConfigError, match=r"docs\.json is unreadable.*--restart"):
        checkpoints.load_or_new("docs", restart=False, source="x", files=[],
                                fingerprint="{}", output=None, target="docs_2")
    fresh = checkpoints.load_or_new("docs", restart=True, source="x", files=[],
                                    fingerprint="{}", output=None, target="docs_2")
    assert fresh.target == "docs_2"


# -- an interrupted drop (clear errors) -----------------------------------------


def test_a_drop_interrupted_after_the_chunks_is_listed_and_finished(store: Store) -> None:
    live = store.open(docs={"a": 1})
    store.open(physical="docs_20200101T000000Z", docs={"b": 2}).close()
    live.close()
    # As a drop killed between deleting the chunk collection and its state.
    if store.client is None:
        shutil.rmtree(store.root / "docs_20200101T000000Z")
    else:
        store.client.delete_collection("docs_20200101T000000Z")
    admin = store.admin()
    try:
        infos = {i.name: i for i in admin.collections()}
        assert set(infos) == {live.collection, "docs_20200101T000000Z"}
        assert infos["docs_20200101T000000Z"].fingerprint == FP
        with pytest.raises(SinkError, match="belongs to collection 'docs_20200101T000000Z'"):
            admin.drop("docs_20200101T000000Z_state")
        with pytest.raises(SinkError, match="lost its chunks"):
            admin.switch("docs", "docs_20200101T000000Z")
        admin.drop("docs_20200101T000000Z")
        assert [i.name for i in admin.collections()] == [live.collection]
    finally:
        admin.close()
    if store.client is None:
        assert not [p for p in store.root.iterdir() if "2020" in p.name
                    and not p.name.endswith(".lock")]
    else:
        assert {c.name for c in store.client.get_collections().collections} == {
            live.collection, f"{live.collection}_state"}


@pytest.mark.parametrize("killed_in", [1, 2])  # deleting the chunks, deleting the state
def test_edge_a_drop_killed_while_deleting_leaves_nothing_half_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, killed_in: int) -> None:
    root = tmp_path / "store"
    for name in ("docs_20200101T000000Z", "docs_20210101T000000Z"):
        sink = QdrantEdgeSink(root, "docs", physical=name)
        sink.open(FP)
        sink.apply([write("a", 1)])
        sink.close()
    real, calls = shutil.rmtree, []

    def killed(path: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == killed_in:  # part of the directory is gone when the kill comes
            real(Path(path) / "wal")
            raise KeyboardInterrupt
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    admin = QdrantEdgeAdmin(root)
    with pytest.raises(KeyboardInterrupt):
        admin.drop("docs_20200101T000000Z")
    monkeypatch.setattr(shutil, "rmtree", real)
    listed = [i.name for i in admin.collections()]
    if killed_in == 1:  # the state is left: listed as the collection, dropped by name
        assert listed == ["docs_20200101T000000Z", "docs_20210101T000000Z"]
        admin.drop("docs_20200101T000000Z")
    else:  # nothing left under the collection's name; the next drop clears the rest
        assert listed == ["docs_20210101T000000Z"]
        admin.drop("docs_20210101T000000Z")
    assert not [p for p in root.iterdir() if "2020" in p.name and not p.name.endswith(".lock")]
