"""deploy/k8s: every manifest validates against the Kubernetes schemas (offline, the `kubernetes-validate`
package's bundled ones), and the manifests agree with the service and with each other: probe paths are the
service's routes, the grace period covers the drain, the autoscaler reads a metric the service exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import Metrics
from service.routes import ops
from service.settings import Settings
from tests.deploy.support import REPO_ROOT

K8S = REPO_ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
KEDA = K8S / "keda" / "scaledobject.yaml"
# The oldest Kubernetes the manifests are meant for (autoscaling/v2 and policy/v1 are GA since 1.23/1.21) and
# the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Kinds of operators' CRDs, which have no schema in the validator: checked by the structural tests below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}


def load(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def kustomization() -> dict[str, Any]:
    (doc,) = load(K8S / "kustomization.yaml")
    return doc


def resources() -> list[dict[str, Any]]:
    return [doc for name in kustomization()["resources"] for doc in load(K8S / name)]


def one(kind: str) -> dict[str, Any]:
    (doc,) = [doc for doc in resources() if doc["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    (spec,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return spec


def env_value(name: str) -> str | None:
    return next((e.get("value") for e in container().get("env", []) if e["name"] == name), None)


def exported_metric_names() -> set[str]:
    """The series names in the service's own /metrics text (a fresh Metrics(), as the app builds it)."""
    text = Metrics().render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_kustomization_lists_every_manifest_once():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    names = [(doc["kind"], doc["metadata"]["name"]) for doc in resources()]
    assert len(names) == len(set(names)), names
    assert {name for name, _ in names} >= {"Deployment", "Service", "PodDisruptionBudget",
                                           "HorizontalPodAutoscaler", "PodMonitor"}
    images = {image["name"] for image in kustomization()["images"]}
    assert container()["image"] in images, "the kustomization's image override must name the container's image"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    import kubernetes_validate

    checked = 0
    for doc in resources() + load(KEDA):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} is not valid for Kubernetes {version}: "
                        f"{exc.message} at {'.'.join(map(str, exc.path))}")
        checked += 1
    assert checked >= 5  # Namespace, Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler


def test_validation_catches_a_broken_manifest():
    # The check above can fail: a misspelt field and a wrong type are both reported.
    import kubernetes_validate

    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)
    deployment = one("Deployment")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_selectors_ports_and_names_agree():
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one("Service")["spec"]["selector"].items() <= pod_labels.items()
    assert one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert one("PodMonitor")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])

    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    # The container listens where the image's ZUTIS_PORT (or the manifest's) says.
    dockerfile_port = re.search(r"ZUTIS_PORT=(\d+)", (REPO_ROOT / "Dockerfile").read_text()).group(1)
    assert ports["http"] == int(env_value("ZUTIS_PORT") or dockerfile_port)
    assert [p["targetPort"] for p in one("Service")["spec"]["ports"]] == ["http"]
    assert [e["port"] for e in one("PodMonitor")["spec"]["podMetricsEndpoints"]] == ["http"]


def test_probes_are_the_service_routes():
    routes = {route.path for route in ops.router.routes}
    readiness, liveness = container()["readinessProbe"]["httpGet"], container()["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz" and liveness["path"] == "/healthz"
    assert {readiness["path"], liveness["path"]} <= routes
    assert readiness["port"] == liveness["port"] == "http"
    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["path"] in routes


def test_grace_period_covers_the_prestop_pause_and_the_drain():
    pod = one("Deployment")["spec"]["template"]["spec"]
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause_s = float(command[1])
    # The drain the service will really wait for: the manifest's ZUTIS_DRAIN_* values, else Settings' defaults.
    drain_s = 0.0
    for field, info in Settings.model_fields.items():
        if field.startswith("drain_") and field.endswith("_s"):
            drain_s += float(env_value(f"ZUTIS_{field.upper()}") or info.default)
    assert drain_s >= Settings.model_fields["drain_timeout_s"].default
    assert pod["terminationGracePeriodSeconds"] >= pause_s + drain_s + 5, "the kubelet would SIGKILL mid-drain"


def test_pod_gets_one_gpu_and_runs_as_non_root():
    resources_ = container()["resources"]
    assert resources_["requests"]["nvidia.com/gpu"] == resources_["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= resources_["requests"].keys()
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    uid = re.search(r"^USER (\d+)", (REPO_ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert env_value("ZUTIS_DEVICE") == "cuda"
    for spec in (container(), init_container()):
        assert spec["securityContext"]["allowPrivilegeEscalation"] is False
        # Writable scratch space exists where the root filesystem is read-only.
        if spec["securityContext"].get("readOnlyRootFilesystem"):
            assert any(m["mountPath"] == "/tmp" for m in spec["volumeMounts"]), spec["name"]


def init_container() -> dict[str, Any]:
    (spec,) = one("Deployment")["spec"]["template"]["spec"]["initContainers"]
    return spec


def test_an_init_container_fetches_the_zoo_model_the_service_then_finds():
    from model.fetch import _parser
    from model.zoo import load_manifest, parse_zoo_reference

    checkpoint = env_value("ZUTIS_CHECKPOINT")
    name = parse_zoo_reference(checkpoint)
    assert name in load_manifest(), f"ZUTIS_CHECKPOINT={checkpoint} is not a model of the built-in zoo"
    init = init_container()
    assert init["image"] == container()["image"]
    init_env = {e["name"]: e.get("value") for e in init["env"]}
    assert init_env["ZUTIS_CHECKPOINT"] == checkpoint and init_env["ZUTIS_CACHE_DIR"] == env_value("ZUTIS_CACHE_DIR")
    command = [part.replace("$(ZUTIS_CHECKPOINT)", init_env["ZUTIS_CHECKPOINT"]) for part in init["command"]]
    assert command[:3] == ["python", "-m", "model.fetch"]
    args = _parser().parse_args(command[3:])
    assert parse_zoo_reference(args.name) == name and args.out is None  # into the cache the service reads

    # the same volume: writable for the fetch, read-only for the service, at ZUTIS_CACHE_DIR in both
    cache_dir = env_value("ZUTIS_CACHE_DIR")
    (fetch_mount,) = [m for m in init["volumeMounts"] if m["mountPath"] == cache_dir]
    (serve_mount,) = [m for m in container()["volumeMounts"] if m["mountPath"] == cache_dir]
    assert fetch_mount["name"] == serve_mount["name"]
    assert not fetch_mount.get("readOnly") and serve_mount.get("readOnly") is True
    pod = one("Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == fetch_mount["name"]]
    assert "emptyDir" in volume, "the pod's own cache: no claim to provision, nothing to copy in"
    quantity = volume["emptyDir"]["sizeLimit"]
    assert quantity.endswith("Gi") and int(quantity[:-2]) >= 3, "raw files (~0.85 GB) plus checkpoint (~0.8 GB)"


def test_no_claim_needs_a_storage_class_most_clusters_lack():
    # A ReadOnlyMany claim stays Pending on common storage classes and its pods never start.
    claims = [d for d in resources() if d["kind"] == "PersistentVolumeClaim"]
    assert all("ReadOnlyMany" not in c["spec"]["accessModes"] for c in claims)
    pod = one("Deployment")["spec"]["template"]["spec"]
    claimed = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claimed <= {c["metadata"]["name"] for c in claims}


def test_autoscaler_reads_a_metric_the_service_exports():
    exported = exported_metric_names()
    assert "zutis_queue_depth" in exported
    (metric,) = one("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]

    (values,) = load(ADAPTER_VALUES)
    rules = {rule["name"]["as"]: rule for rule in values["rules"]["custom"]}
    assert name in rules, f"no Prometheus Adapter rule serves {name}"
    series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rules[name]["seriesQuery"]).group(1)
    assert series in exported and re.fullmatch(rules[name]["name"]["matches"], series)
    assert rules[name]["resources"]["overrides"]["pod"] == {"resource": "pod"}, "per-pod, as the HPA asks"

    (scaled,) = load(KEDA)
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    for trigger in scaled["spec"]["triggers"]:
        used = set(re.findall(r"\b(zutis_[a-z_]+)\b", trigger["metadata"]["query"]))
        assert used and used <= exported, used - exported


def test_kustomize_renders_the_kustomization():
    # `kubectl kustomize` needs no cluster; where kubectl is installed, the rendered output is what gets applied.
    import subprocess

    import kubernetes_validate

    from tests.deploy.support import find_executable

    kubectl = find_executable("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional: the checks above read the files directly)")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in resources())
    image = kustomization()["images"][0]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"], doc["kind"]
        if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (spec,) = deployment["spec"]["template"]["spec"]["containers"]
    assert spec["image"] == f"{image['newName']}:{image['newTag']}"
