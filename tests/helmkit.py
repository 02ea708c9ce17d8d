"""Rendering the Helm chart (helm/embedstream) offline with the real Helm library
(helm-python-sdk), and reading what it renders, for the chart's tests."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.stream.config import Settings, load_settings

__all__ = ["CHART", "CI_FILES", "REGISTRY_ENV", "SECRET_ENV", "ci_values", "container", "helm",
           "render", "rendered_settings", "secret_env"]

helm = pytest.importorskip("helm_python")

CHART = Path(__file__).resolve().parents[1] / "helm" / "embedstream"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
REGISTRY_ENV = "EMBEDSTREAM_KAFKA__SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD"
SECRET_ENV = {
    "EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD",
    "EMBEDSTREAM_KAFKA__SECURITY__SSL_KEY_PASSWORD",
    "EMBEDSTREAM_SINK__API_KEY",
    "EMBEDSTREAM_EMBED__API_KEY",
    REGISTRY_ENV,
}


def ci_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


@cache
def _render(values_json: str) -> tuple[dict[str, Any], ...]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(json.loads(values_json), name="es", namespace="search")
    return tuple(doc for path, text in sorted(manifests.items()) if not path.endswith(".txt")
                 for doc in yaml.safe_load_all(text) if doc)


def render(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifests by kind (and name for the second of a kind)."""
    out: dict[str, dict[str, Any]] = {}
    for doc in _render(json.dumps(values, sort_keys=True)):
        key = doc["kind"] if doc["kind"] not in out else f"{doc['kind']}/{doc['metadata']['name']}"
        out[key] = doc
    return out


def container(pod_owner: dict[str, Any]) -> dict[str, Any]:
    only: dict[str, Any]
    (only,) = pod_owner["spec"]["template"]["spec"]["containers"]
    return only


def secret_env(pod_owner: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The credentials' environment variables and the secretKeyRef each comes from."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container(pod_owner)["env"] if e["name"] in SECRET_ENV}


def rendered_settings(manifests: dict[str, dict[str, Any]], owner: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What ``load_settings`` makes of the rendered config.yaml and the EMBEDSTREAM_*
    environment of ``owner``'s container (each secret as if its key held a value),
    with nothing else from this process's environment."""
    path = tmp_path / "config.yaml"
    path.write_text(manifests["ConfigMap"]["data"]["config.yaml"])
    for name in [n for n in os.environ if n.startswith("EMBEDSTREAM_")]:
        monkeypatch.delenv(name)
    for env in container(manifests[owner])["env"]:
        if env["name"].startswith("EMBEDSTREAM_"):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            monkeypatch.setenv(env["name"], f"not-a-real-{ref['key']}" if ref else env["value"])
    return load_settings(path)
