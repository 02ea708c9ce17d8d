"""One collection-name rule at every entry point: the same bad names are refused
by the settings (``sink.collection``, ``routes[].collection``), by the command
line while it parses (``rebuild --collection``, ``collections drop/switch``,
``--route``: before any config is read or model loaded) and by the Helm chart's
values schema; the same good names pass everywhere. The sinks, ``aliases.json``
and checkpoints use the same function (tests/test_names_and_aliases.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedstream.stream.app import cli
from embedstream.stream.config import load_settings
from embedstream.stream.errors import ConfigError
from embedstream.stream.names import (
    MAX_ALIAS,
    MAX_COLLECTION,
    NAME_PATTERN,
    ROUTE_NAME,
    name_problem,
)

from .conftest import hypothesis_examples

BAD = ["../evil", "..", ".", "a..b", "docs..", ".hidden", "-dash", "a/b", "tab\tname",
       "$(id)", "", "é", "x" * (MAX_COLLECTION + 1)]
GOOD = ["docs", "a.b-c_d", "_private", "v2.", "x" * MAX_ALIAS]
SCHEMA = Path(__file__).resolve().parents[1] / "helm" / "embedstream" / "values.schema.json"


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """``embedstream ARGS``: (exit code, stderr)."""
    monkeypatch.setattr(cli, "_setup_logging", lambda *args: None)

    def call(*args: str) -> tuple[int, str]:
        code = cli.main(list(args))
        return code, capsys.readouterr().err

    return call


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_name_is_refused_at_config_load(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"sink\.collection.*not a valid collection name"):
        load_settings(None, sink={"collection": bad})
    with pytest.raises(ConfigError, match=r"routes.*not a valid collection name"):
        load_settings(None, routes=[{"name": "r", "topics": ["t"], "collection": bad}])


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_name_is_refused_while_the_command_line_is_parsed(
        bad: str, tmp_path: Path, run: Callable[..., tuple[int, str]]) -> None:
    # The config named does not exist: a refusal naming the bad value shows that
    # nothing was read (nor a model loaded, nor a store made) before it.
    missing = str(tmp_path / "missing.yaml")
    shown = repr(bad) if len(bad) <= 60 else repr(bad[:60] + "...")
    for args in (["rebuild", "--source", "x.jsonl", f"--collection={bad}"],
                 ["collections", "drop", "--", bad],
                 ["collections", "switch", "--", bad],
                 ["search", f"--route={bad}", "a query"],
                 ["dlq", "list", f"--route={bad}"]):
        if any(a.startswith("--route=") for a in args) and re.fullmatch(ROUTE_NAME, bad):
            continue  # a valid route name (--route takes those too)
        code, err = run(*args, "--config", missing) if "--" not in args \
            else run(*args[:2], "--config", missing, *args[2:])
        assert code == 2, args
        assert f"{shown} is not a valid collection name" in err, (args, err)
        assert "missing.yaml" not in err
    assert not (tmp_path / "embedstream-data").exists()


def test_good_names_pass_the_command_line_and_the_settings(tmp_path: Path) -> None:
    parser = cli.build_parser()
    for good in GOOD:
        assert load_settings(None, sink={"collection": good}).sink.collection == good
        assert parser.parse_args(["rebuild", "--source", "x", f"--collection={good}"]) \
            .collection == good
        assert parser.parse_args(["collections", "drop", "--", good]).name == good
    # --route also takes a route's name, whose own pattern allows what a name may not.
    assert parser.parse_args(["search", "--route", "a..b", "q"]).route == "a..b"


def test_the_chart_schema_holds_the_same_rule() -> None:
    helm = pytest.importorskip("helm_python")
    schema = json.loads(SCHEMA.read_text())
    assert schema["definitions"]["collection"]["pattern"] == NAME_PATTERN
    assert schema["definitions"]["collection"]["maxLength"] == MAX_ALIAS
    assert schema["definitions"]["route"]["properties"]["name"]["pattern"] == ROUTE_NAME

    def values(name: str) -> list[dict[str, object]]:
        route = {"name": "r", "topics": ["t"], "collection": name}
        return [{"config": {"sink": {"collection": name}}},
                {"config": {"routes": [route]}},
                {"rebuild": {"collection": name}}]

    with helm.Chart.load(SCHEMA.parent) as chart:
        for bad in BAD:
            if not bad:
                continue  # rebuild.collection "" means "the configured one"
            for refused in values(bad):
                with pytest.raises(helm.HelmValuesError):
                    chart.validate_schema(refused)
        for good in GOOD:
            for accepted in values(good):
                chart.validate_schema(accepted)


@settings(max_examples=hypothesis_examples(500), deadline=None)
@given(st.text(alphabet="ab.-_/é\n", max_size=12))
@pytest.mark.parametrize("alias", [True, False])
def test_the_checks_spell_out_the_pattern(alias: bool, name: str) -> None:
    limit = MAX_ALIAS if alias else MAX_COLLECTION
    expected = re.fullmatch(NAME_PATTERN, name) is not None and len(name) <= limit
    assert (name_problem(name, alias=alias) is None) == expected
