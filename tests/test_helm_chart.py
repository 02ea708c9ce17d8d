"""The Helm chart (helm/embedstream), rendered offline with the real Helm library.

Each ``ci/*.yaml`` values file is rendered and linted with helm-python-sdk, every
manifest is validated against the Kubernetes schemas of kubernetes-validate (the
CRDs it has no schema for are checked here by hand), and the rendered config.yaml,
with the pod's EMBEDSTREAM_* environment, is loaded by embedstream's own
``load_settings``, so a chart default the settings refuse fails here. No cluster
is needed. Routes and the Schema Registry: tests/test_helm_routes.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helmkit import (
    CHART,
    CI_FILES,
    ci_values,
    container,
    helm,
    render,
    rendered_settings,
    secret_env,
)

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE_VERSION = kubernetes_validate.latest_version()
CRDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_ci_values_lint_and_validate(ci_file: Path) -> None:
    values = ci_values(ci_file.name)
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
    manifests = render(values)
    assert {"Deployment", "ConfigMap", "Service", "ServiceAccount"} <= manifests.keys()
    for doc in manifests.values():
        if doc["kind"] in CRDS:
            assert doc["apiVersion"] == CRDS[doc["kind"]]
            assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "search"
            assert isinstance(doc["spec"], dict) and doc["spec"]
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_consumer_pod(ci_file: Path) -> None:
    manifests = render(ci_values(ci_file.name))
    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    main = container(deployment)
    assert main["command"] == ["embedstream"]
    assert main["args"][-3:] == ["consume", "--config", "/etc/embedstream/config.yaml"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert main["ports"] == [{"name": "metrics", "containerPort": 9108, "protocol": "TCP"}]
    probes = {kind: main[f"{kind}Probe"]["httpGet"]
              for kind in ("startup", "liveness", "readiness")}
    assert probes == {"startup": {"path": "/healthz", "port": "metrics"},
                      "liveness": {"path": "/healthz", "port": "metrics"},
                      "readiness": {"path": "/readyz", "port": "metrics"}}
    assert main["startupProbe"]["failureThreshold"] * main["startupProbe"]["periodSeconds"] >= 300
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    env = {e["name"]: e for e in main["env"]}
    assert {"/tmp", env["HF_HOME"]["value"]} <= mounts

    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    assert config["metrics"]["port"] == 9108 and config["metrics"]["enabled"] is True
    user_config = ci_values(ci_file.name).get("config", {})
    for section, settings in user_config.items():
        if not isinstance(settings, dict):  # routes: a list, passed as given
            assert config[section] == settings, section
            continue
        for key, value in settings.items():
            if not (section == "sink" and key == "path"):
                assert config[section][key] == value, (section, key)
    if config["sink"]["kind"] == "qdrant-edge":
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        data = next(m for m in main["volumeMounts"] if m["name"] == "data")
        assert config["sink"]["path"].startswith(data["mountPath"] + "/")
    else:
        assert "data" not in {m["name"] for m in main["volumeMounts"]}
    keda = ci_values(ci_file.name).get("keda", {}).get("enabled", False)
    assert ("ScaledObject" in manifests) == keda
    service = manifests["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == "metrics"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_ci_config_is_one_the_settings_accept(ci_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    values = ci_values(ci_file.name)
    manifests = render(values)
    owners = ["Deployment", *(["Job"] if "Job" in manifests else [])]
    for owner in owners:
        settings = rendered_settings(manifests, owner, tmp_path, monkeypatch)
        routes = values.get("config", {}).get("routes")
        assert [r.name for r in settings.all_routes()] == (
            [r["name"] for r in routes] if routes else ["default"])
        assert settings.metrics.port == values.get("metricsPort", 9108)
        registry = settings.kafka.schema_registry
        if registry is not None and registry.basic_auth_user is not None:
            password = registry.basic_auth_password
            assert password is not None and password.get_secret_value().startswith("not-a-real")
        args = container(manifests[owner])["args"]
        if "--route" in args:  # the rebuild Job's route is one the command finds
            route = args[args.index("--route") + 1]
            assert route in {r.name for r in settings.for_route(route).routes}


def test_the_default_route_is_what_the_chart_always_read(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # values.yaml no longer sets kafka.topics, source and sink.collection (they
    # would clash with routes): the app's defaults, the same as the chart's were.
    settings = rendered_settings(render({}), "Deployment", tmp_path, monkeypatch)
    (route,) = settings.all_routes()
    assert (route.name, route.topics, route.topic_pattern, route.collection) == (
        "default", ("dbserver1.inventory.products",), None, "documents")
    assert route.source.format == "debezium"
    assert settings.kafka.bootstrap_servers == "kafka:9092"


def test_defaults_config_is_the_values_config() -> None:
    manifests = render({})
    with helm.Chart.load(CHART) as chart:
        values_config = chart.values["config"]
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    values_config["metrics"]["port"] = 9108
    values_config["sink"]["path"] = "/var/lib/embedstream/data"
    values_config["embed"]["cache_dir"] = "/var/lib/embedstream/embed-cache"
    assert config == values_config
    assert manifests["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert {"Secret", "ScaledObject", "Job", "ServiceMonitor", "PrometheusRule"}.isdisjoint(
        manifests)


def test_metrics_port_is_forced_into_the_config() -> None:
    manifests = render({"metricsPort": 9200, "config": {"metrics": {"port": 1234}}})
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    assert config["metrics"]["port"] == 9200
    assert container(manifests["Deployment"])["ports"][0]["containerPort"] == 9200


def test_chart_secret_goes_through_env_only() -> None:
    values = {"secrets": {"saslPassword": "s3cret-sasl", "sinkApiKey": "s3cret-key",
                          "embedApiKey": "s3cret-embed"},
              "config": {"sink": {"kind": "qdrant", "url": "https://q:6333"}}, "replicaCount": 2}
    manifests = render(values)
    assert "s3cret" not in json.dumps(manifests["ConfigMap"])
    assert "s3cret" not in json.dumps(manifests["Deployment"])
    secret = manifests["Secret"]
    env = secret_env(manifests["Deployment"])
    assert set(env) == {"EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD", "EMBEDSTREAM_SINK__API_KEY",
                        "EMBEDSTREAM_EMBED__API_KEY"}
    for ref in env.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
    pod_annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" in pod_annotations


def test_existing_secret_and_kafka_tls() -> None:
    manifests = render(ci_values("secrets-values.yaml"))
    assert "Secret" not in manifests
    main = container(manifests["Deployment"])
    env = secret_env(manifests["Deployment"])
    assert env == {
        "EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD":
            {"name": "embedstream-kafka-credentials", "key": "password", "optional": True},
        "EMBEDSTREAM_KAFKA__SECURITY__SSL_KEY_PASSWORD":
            {"name": "embedstream-kafka-credentials", "key": "key-password", "optional": True},
    }
    tls = next(m for m in main["volumeMounts"] if m["name"] == "kafka-tls")
    volume = next(v for v in manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "kafka-tls")
    assert volume["secret"]["secretName"] == "embedstream-kafka-tls" and tls["readOnly"] is True
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    assert config["kafka"]["security"]["ssl_ca_location"].startswith(tls["mountPath"] + "/")


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": 2}, "replicaCount is 2 but config.sink.kind is qdrant-edge"),
    ({"keda": {"enabled": True}}, "keda.enabled needs config.sink.kind: qdrant"),
    ({"config": {"sink": {"kind": "qdrant"}}}, "set config.sink.url"),
    ({"config": {"sink": {"api_key": "x"}}}, "config.sink.api_key is a secret"),
    ({"config": {"embed": {"api_key": "x"}}}, "config.embed.api_key is a secret"),
    ({"config": {"bulk": {"precision": "bf16"}}},
     "config.bulk.precision has moved to config.embed.precision"),
    ({"config": {"bulk": {"min_cosine": 0.99}}},
     "config.bulk.min_cosine has moved to config.embed.quality_guard"),
])
def test_misconfiguration_fails_clearly(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name="es")


def test_schema_rejects_bad_values() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(ci_values("server-values.yaml"))
        for bad in ({"replicaCount": "two"}, {"config": {"sink": {"kind": "milvus"}}},
                    {"replicaCunt": 1}, {"config": {"embed": {"backend": "tensorrt"}}},
                    {"config": {"embed": {"precision": "int4"}}},
                    {"config": {"embed": {"batching": "eager"}}},
                    {"config": {"embed": {"quality_guard": {"min_cosine": 0.99}}}},
                    {"config": {"embed": {"cache_dir": "relative/dir"}}},
                    {"embedCache": {"mountPath": "var/cache"}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)
    report = helm.lint(CHART, {"replicaCount": "two"})
    assert any("replicaCount" in error for error in report["errors"])


def _mounts_and_volumes(pod_owner: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """The container's mount paths and the pod's volumes, by volume name."""
    return ({m["name"]: m["mountPath"] for m in container(pod_owner)["volumeMounts"]},
            {v["name"]: v for v in pod_owner["spec"]["template"]["spec"]["volumes"]})


def test_embed_cache_is_kept_on_the_stores_volume(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The decision and the exported graphs survive a restart, and the rebuild Job
    # (same volume) reads what the consumer decided: neither measures again.
    manifests = render({"rebuild": {"enabled": True}})
    for owner in ("Deployment", "Job"):
        settings = rendered_settings(manifests, owner, tmp_path, monkeypatch)
        mounts, volumes = _mounts_and_volumes(manifests[owner])
        assert settings.embed.cache_dir == Path(mounts["data"]) / "embed-cache"
        assert "persistentVolumeClaim" in volumes["data"] and "embed-cache" not in volumes
    moved = render({"persistence": {"mountPath": "/srv/es/"},
                    "config": {"sink": {"path": "/srv/es/store"}}})
    config = yaml.safe_load(moved["ConfigMap"]["data"]["config.yaml"])
    assert config["embed"]["cache_dir"] == "/srv/es/embed-cache"


def test_embed_cache_without_a_volume_is_an_empty_dir(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = render(ci_values("server-values.yaml"))
    settings = rendered_settings(manifests, "Deployment", tmp_path, monkeypatch)
    mounts, volumes = _mounts_and_volumes(manifests["Deployment"])
    assert settings.embed.cache_dir == Path(mounts["embed-cache"]) == Path(
        "/var/cache/embedstream")
    assert volumes["embed-cache"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert (settings.embed.backend, settings.embed.precision) == ("onnx", "int8")


@pytest.mark.parametrize("values", [
    {"config": {"embed": {"cache_dir": "/models/embed-cache"}}},
    {"config": {"embed": {"cache_dir": "/models/embed-cache"}, "sink": {
        "kind": "qdrant", "url": "http://q:6333"}}},
    ci_values("remote-embedder-values.yaml"),
], ids=["own-dir-edge", "own-dir-server", "remote-api"])
def test_embed_cache_left_alone(values: dict[str, Any]) -> None:
    # A cache_dir of the user's own is kept as given; a remote API has no local model.
    manifests = render(values)
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    assert config["embed"].get("cache_dir") == values["config"]["embed"].get("cache_dir")
    mounts, volumes = _mounts_and_volumes(manifests["Deployment"])
    assert "embed-cache" not in mounts and "embed-cache" not in volumes
