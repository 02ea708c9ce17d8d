"""The Helm chart with routes (many topics to many collections) and a Schema
Registry: what the chart renders for them, what it refuses at render time (what
the settings would refuse at start, no more), and the values schema against the
settings it mirrors."""

from __future__ import annotations

import base64
import json
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedstream.stream.config import (
    BulkSettings,
    EmbedSettings,
    KafkaSettings,
    QualityGuardSettings,
    RouteSettings,
    SchemaRegistrySettings,
    Settings,
    SinkSettings,
    SourceSettings,
    load_settings,
)
from embedstream.stream.errors import ConfigError

from .helmkit import CHART, REGISTRY_ENV, ci_values, container, helm, render, secret_env


def test_routes_and_the_registry_password() -> None:
    values = ci_values("routes-values.yaml")
    manifests = render(values)
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    assert "topics" not in config["kafka"] and "topic_pattern" not in config["kafka"]
    assert "source" not in config and "collection" not in config["sink"]
    assert [(r["name"], r["collection"]) for r in config["routes"]] == [
        ("articles", "articles"), ("shop", "products"), ("tickets", "tickets")]
    assert config["routes"][0]["source"]["text_template"] == "{title}\n\n{body}"
    assert config["kafka"]["schema_registry"]["url"].startswith("https://")
    secret = manifests["Secret"]
    for owner in ("Deployment", "Job"):
        assert secret_env(manifests[owner]) == {
            REGISTRY_ENV: {"name": secret["metadata"]["name"], "key": "schema-registry-password"}}
        assert "not-a-real-password" not in json.dumps(manifests[owner])
    assert "not-a-real-password" not in json.dumps(manifests["ConfigMap"])
    assert base64.b64decode(secret["data"]["schema-registry-password"]) == b"not-a-real-password"
    assert container(manifests["Job"])["args"][-4:] == ["--source", "kafka", "--route", "shop"]
    # From an existing Secret: read when a registry is configured, never without one
    # (the password alone would make the settings ask for the registry's url).
    existing = render({**values, "existingSecret": "creds"})
    assert "Secret" not in existing
    assert secret_env(existing["Deployment"])[REGISTRY_ENV] == {
        "name": "creds", "key": "schema-registry-password", "optional": True}
    assert REGISTRY_ENV not in secret_env(render({"existingSecret": "creds"})["Deployment"])


ONE_ROUTE = [{"name": "a", "topics": ["t"], "collection": "a"}]


@pytest.mark.parametrize("clash, named", [
    ({"kafka": {"topics": ["t2"]}}, "config.kafka.topics"),
    ({"kafka": {"topic_pattern": "^t.*"}}, "config.kafka.topic_pattern"),
    ({"source": {"format": "native"}}, "config.source"),
    ({"sink": {"collection": "c"}}, "config.sink.collection"),
])
def test_routes_beside_a_top_level_route_key_are_refused_by_chart_and_settings(
        clash: dict[str, Any], named: str, tmp_path: Path) -> None:
    config = {"routes": ONE_ROUTE, **clash}
    with helm.Chart.load(CHART) as chart, pytest.raises(
            helm.HelmRenderError, match=f"config.routes is set, and so is {named}: "):
        chart.render({"config": config}, name="es")
    # The chart refuses what the settings would refuse at start, not more.
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="with routes, give"):
        load_settings(path)
    path.write_text(yaml.safe_dump({"routes": ONE_ROUTE}))
    assert load_settings(path).all_routes() == (RouteSettings.model_validate(ONE_ROUTE[0]),)


@pytest.mark.parametrize("values, message", [
    ({"config": {"kafka": {"schema_registry": {"url": "http://r:8081",
                                               "basic_auth_password": "x"}}}},
     "config.kafka.schema_registry.basic_auth_password is a secret"),
    ({"secrets": {"schemaRegistryPassword": "x"}}, "config.kafka.schema_registry is not"),
    ({"config": {"routes": [*ONE_ROUTE, {"name": "b", "topics": ["u"], "collection": "b"}]},
      "rebuild": {"enabled": True}}, "set rebuild.route to the one to rebuild"),
    ({"config": {"routes": ONE_ROUTE}, "rebuild": {"enabled": True, "route": "nope"}},
     'rebuild.route is "nope", which is no route'),
])
def test_registry_and_route_misconfiguration_fails_clearly(values: dict[str, Any],
                                                            message: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name="es")


@pytest.mark.parametrize("route", [
    {"name": "-a", "topics": ["t"], "collection": "a"},
    {"name": "a" * 65, "topics": ["t"], "collection": "a"},
    {"name": "a b", "topics": ["t"], "collection": "a"},
    {"name": "a", "topics": ["t"], "topic_pattern": "^t", "collection": "a"},
    {"name": "a", "collection": "a"},
    {"name": "a", "topics": ["t"]},
    {"name": "a", "topics": [""], "collection": "a"},
    {"name": "a", "topics": ["t"], "collection": "a/b"},
    {"name": "a", "topics": ["t"], "collection": "a", "sink": {}},
    {"name": "a", "topics": ["t"], "collection": "a", "source": {"format": "avro"}},
    {"name": "a", "topics": ["t"], "collection": "a", "source": {"encoding": "protobuf"}},
    {"name": "a", "topics": ["t"], "collection": "a",
     "source": {"filter_fields": {"price": "money"}}},
], ids=lambda r: json.dumps(r)[:60])
def test_schema_refuses_a_route_the_settings_refuse(route: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"config": {"routes": [route]}})
    with pytest.raises(ValueError):  # pydantic's ValidationError is one
        RouteSettings.model_validate(route)


def test_schema_takes_the_new_settings_and_refuses_bad_ones() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(ci_values("routes-values.yaml"))
        chart.validate_schema({"config": {
            "kafka": {"topic_pattern": "^db1\\.shop\\.[a-z_]+$",
                      "schema_registry": {"url": "http://registry:8081"}},
            "source": {"format": "debezium-flat", "encoding": "auto", "title_field": "name",
                       "text_template": "{name}", "filter_fields": {"tenant": "keyword"}}},
            "secrets": {"schemaRegistryPassword": "x"},
            "existingSecretKeys": {"schemaRegistryPassword": "registry-password"}})
        bads: list[dict[str, Any]] = [
            {"config": {"routes": []}},
            {"config": {"kafka": {"schema_registry": {}}}},
            {"config": {"kafka": {"schema_registry": {"url": "registry:8081"}}}},
            {"config": {"kafka": {"schema_registry": {"url": "http://r", "user": "u"}}}},
            {"config": {"kafka": {"topic_pattern": ""}}},
            {"config": {"source": {"format": "debezium-unwrapped"}}},
            {"secrets": {"schemaRegistryPasswd": "x"}}]
        for bad in bads:
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


def test_schema_names_only_settings_fields_and_every_choice() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defs, config = schema["definitions"], schema["properties"]["config"]["properties"]
    sections: list[tuple[dict[str, Any], type[Any]]] = [
        (schema["properties"]["config"], Settings), (config["kafka"], KafkaSettings),
        (config["embed"], EmbedSettings), (config["sink"], SinkSettings),
        (config["bulk"], BulkSettings), (defs["source"], SourceSettings),
        (defs["route"], RouteSettings), (defs["schemaRegistry"], SchemaRegistrySettings)]
    for section, model in sections:
        assert set(section["properties"]) <= set(model.model_fields), model.__name__
    # A choice the settings gained (debezium-flat was missing) must reach the schema.
    for name in ("format", "encoding", "version"):
        choices = typing.get_args(SourceSettings.model_fields[name].annotation)
        assert defs["source"]["properties"][name]["enum"] == list(choices), name
    for name in ("backend", "precision", "batching"):
        choices = typing.get_args(EmbedSettings.model_fields[name].annotation)
        assert config["embed"]["properties"][name]["enum"] == list(choices), name
    guard = config["embed"]["properties"]["quality_guard"]["properties"]
    assert set(guard) == set(QualityGuardSettings.model_fields)


def test_monitoring_objects() -> None:
    manifests = render(ci_values("server-values.yaml"))
    dashboard = manifests["ConfigMap/es-embedstream-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["embedstream.json"])["title"]
    relabelled = render({"dashboard": {"enabled": True, "label": "dash", "labelValue": "yes"}})
    assert relabelled["ConfigMap/es-embedstream-dashboard"]["metadata"]["labels"]["dash"] == "yes"
    rules = manifests["PrometheusRule"]["spec"]
    expected = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    assert rules == {"groups": expected} and isinstance(rules["groups"], list)
    monitor = manifests["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= manifests["Service"]["metadata"][
        "labels"].items()
    assert manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    scaled = manifests["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == manifests["Deployment"]["metadata"]["name"]
    assert "replicas" not in manifests["Deployment"]["spec"]  # KEDA owns the count
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"].startswith("sum(embedstream_consumer_lag_messages{")
    assert trigger["metadata"]["threshold"] == "5000"
    assert (scaled["minReplicaCount"], scaled["maxReplicaCount"]) == (1, 6)


def test_rebuild_job_and_gpu() -> None:
    manifests = render(ci_values("edge-gpu-values.yaml"))
    job = manifests["Job"]
    assert job["spec"]["backoffLimit"] == 1 and job["spec"]["ttlSecondsAfterFinished"] == 3600
    rebuild = container(job)
    assert rebuild["args"][1:] == ["rebuild", "--config", "/etc/embedstream/config.yaml",
                                   "--source", "kafka", "--collection", "documents_v2",
                                   "--engine", "local"]
    consumer = container(manifests["Deployment"])
    assert rebuild["volumeMounts"] == consumer["volumeMounts"]
    assert rebuild["securityContext"] == consumer["securityContext"]
    assert consumer["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]
    assert claim["claimName"] == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    minimal = container(render({"rebuild": {"enabled": True, "source": "/data/*.parquet"}})["Job"])
    assert minimal["args"][-2:] == ["--source", "/data/*.parquet"]
