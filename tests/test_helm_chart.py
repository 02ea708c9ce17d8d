"""The Helm chart (helm/embedstream), rendered offline with the real Helm library.

Each ``ci/*.yaml`` values file is rendered and linted with helm-python-sdk, and
every manifest is validated against the Kubernetes schemas of kubernetes-validate
(the CRDs it has no schema for are checked here by hand). No cluster is needed.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = Path(__file__).resolve().parents[1] / "helm" / "embedstream"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
KUBE_VERSION = kubernetes_validate.latest_version()
CRDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}
SECRET_ENV = {
    "EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD",
    "EMBEDSTREAM_KAFKA__SECURITY__SSL_KEY_PASSWORD",
    "EMBEDSTREAM_SINK__API_KEY",
    "EMBEDSTREAM_EMBED__API_KEY",
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
    (only,) = pod_owner["spec"]["template"]["spec"]["containers"]
    return only


def secret_env(pod_owner: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The credentials' environment variables and the secretKeyRef each comes from."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container(pod_owner)["env"] if e["name"] in SECRET_ENV}


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


def test_defaults_config_is_the_values_config() -> None:
    manifests = render({})
    with helm.Chart.load(CHART) as chart:
        values_config = chart.values["config"]
    config = yaml.safe_load(manifests["ConfigMap"]["data"]["config.yaml"])
    values_config["metrics"]["port"] = 9108
    values_config["sink"]["path"] = "/var/lib/embedstream/data"
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
])
def test_misconfiguration_fails_clearly(values: dict[str, Any], message: str) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmRenderError, match=message):
        chart.render(values, name="es")


def test_schema_rejects_bad_values() -> None:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(ci_values("server-values.yaml"))
        for bad in ({"replicaCount": "two"}, {"config": {"sink": {"kind": "milvus"}}},
                    {"replicaCunt": 1}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)
    report = helm.lint(CHART, {"replicaCount": "two"})
    assert any("replicaCount" in error for error in report["errors"])


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
