"""Kubernetes manifests and Dockerfiles, validated offline with the real tools and schemas:
kubectl kustomize renders each overlay; MPIJob / PodMonitor / PrometheusRule validate against
their vendored CRD schemas (strict: unknown fields fail), core kinds with kubernetes-validate;
checkov on the rendered objects (the MPIJob's pod templates scanned as Pods); hadolint."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ["gpu", "cpu", "edge"]
CRD_FILES = {
    ("kubeflow.org/v2beta1", "MPIJob"): "kubeflow.org_mpijobs.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found on PATH (docs/testing.md: how to install it)"
    return path


def render(overlay: str) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _strict(schema: dict) -> dict:
    """Reject fields a schema does not declare, as the API server's strict field validation does."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        props = node.get("properties")
        if (
            props is not None
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for child in (props or {}).values():
            walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(schema)
    return schema


def _validate(obj: dict, schema: dict) -> None:
    """OpenAPI v3 schemas are JSON Schema draft 4 plus extensions (patterns are Go/RE2 regexes,
    which Python's re reads; the metaschema's ECMA check would reject some of them)."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft4Validator(schema).iter_errors(obj))
    if error is not None:
        raise error


def _crd_schema(api_version: str, kind: str) -> dict:
    crd = yaml.safe_load((K8S / "crds" / CRD_FILES[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)


# ---------------------------------------------------------------- rendering and schemas


def test_overlay_renders_the_whole_job(rendered):
    name, objects = rendered
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "ConfigMap", "PersistentVolumeClaim",
                            "MPIJob", "NetworkPolicy", "PodMonitor", "PrometheusRule"])  # fmt: skip
    namespace = _by_kind(objects, "Namespace")[0]["metadata"]["name"]
    assert all(o["metadata"].get("namespace") == namespace for o in objects if o["kind"] != "Namespace")
    dashboard = next(o for o in objects if o["metadata"]["name"] == "splitlora-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["splitlora-dashboard.json"])["uid"] == "splitlora-mpi"


@pytest.mark.parametrize("api_version, kind", sorted(CRD_FILES))
def test_custom_resources_validate_against_their_crds(rendered, api_version, kind):
    _, objects = rendered
    found = [o for o in objects if o["kind"] == kind and o["apiVersion"] == api_version]
    assert len(found) == 1
    _validate(found[0], _strict(_crd_schema(api_version, kind)))


def test_strict_crd_validation_catches_a_typo(rendered):
    """The validation above can fail: a misspelled field is rejected."""
    _, objects = rendered
    job = copy.deepcopy(_by_kind(objects, "MPIJob")[0])
    job["spec"]["slotPerWorker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="slotPerWorker"):
        _validate(job, _strict(_crd_schema("kubeflow.org/v2beta1", "MPIJob")))


def test_core_objects_and_pod_templates_validate_for_a_current_kubernetes(rendered):
    _, objects = rendered
    version = kubernetes_validate.latest_version()
    core = [o for o in objects if (o["apiVersion"], o["kind"]) not in CRD_FILES]
    for obj in core + _pods(objects):
        kubernetes_validate.validate(obj, version, strict=True)


# ---------------------------------------------------------------- what the job does


def test_mpijob_launches_the_server_and_clients(rendered):
    name, objects = rendered
    job = _by_kind(objects, "MPIJob")[0]["spec"]
    launcher = job["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    workers = job["mpiReplicaSpecs"]["Worker"]
    command = launcher["containers"][0]["command"]
    assert command[:4] == ["python", "-m", "splitlora_mpi.elastic", "-n"] and int(command[4]) == 1 + workers["replicas"]
    assert command[5:] == ["--hosts", "/etc/mpi/hostfile", "--config", "/etc/splitlora/config.yaml"]
    assert job["slotsPerWorker"] == 1 and job["runLauncherAsWorker"] is True and job["mpiImplementation"] == "MPICH"
    assert job["runPolicy"]["backoffLimit"] >= 1 and job["runPolicy"]["cleanPodPolicy"] == "Running"
    config_map = next(o for o in objects if o["metadata"]["name"].startswith("splitlora-config"))
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["run"]["out_dir"].startswith("/data/") and config["metrics"]["addr"] == "0.0.0.0"
    for pod in (launcher, workers["template"]["spec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]  # hash suffix followed
        assert ("data" in volumes) == (pod is launcher)  # outputs: rank 0 writes them all, no client mounts them
        assert pod["serviceAccountName"] == "splitlora" and pod["automountServiceAccountToken"] is False
    if name == "gpu":
        for pod in (launcher, workers["template"]["spec"]):
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_edge_clients_read_their_own_device_and_nothing_shared(tmp_path):
    """edge: the server on a GPU node; each client on its own edge device (one per node),
    reading its data read-only from the device; no client mounts the shared volume, and the
    config makes each client train on all of its own file (the server opens none)."""
    objects = render("edge")
    job = _by_kind(objects, "MPIJob")[0]["spec"]
    launcher = job["mpiReplicaSpecs"]["Launcher"]["template"]["spec"]
    worker = job["mpiReplicaSpecs"]["Worker"]["template"]["spec"]
    assert launcher["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert launcher["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert launcher["containers"][0]["image"].endswith(":cuda") and worker["containers"][0]["image"].endswith(":cpu")
    assert worker["nodeSelector"] == {"splitlora.io/edge": "true"}
    anti = worker["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"] == {"app.kubernetes.io/component": "client"}
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert set(volumes) == {"config", "tmp", "local-data", "model", "job-secret"}  # not the shared PVC
    assert volumes["local-data"]["hostPath"] == {"path": "/var/lib/splitlora/data", "type": "Directory"}
    mount = next(m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "local-data")
    assert mount["readOnly"] is True
    assert "local-data" not in {v["name"] for v in launcher["volumes"]}
    assert int(launcher["containers"][0]["command"][4]) == 1 + job["mpiReplicaSpecs"]["Worker"]["replicas"]
    from splitlora_mpi.config import load_config

    config_map = next(o for o in objects if o["metadata"]["name"].startswith("splitlora-config"))
    (tmp_path / "config.yaml").write_text(config_map["data"]["config.yaml"])
    data = load_config(tmp_path / "config.yaml").data
    assert data.scheme == "local" and mount["mountPath"] == "/local-data"
    assert data.train_path.startswith("/local-data/") and data.val_path.startswith("/local-data/")


def test_the_packaged_config_accepts_each_overlays_config(rendered, tmp_path):
    from splitlora_mpi.config import load_config

    _, objects = rendered
    config_map = next(o for o in objects if o["metadata"]["name"].startswith("splitlora-config"))
    (tmp_path / "config.yaml").write_text(config_map["data"]["config.yaml"])
    assert load_config(tmp_path / "config.yaml").metrics.enabled


def test_pods_run_restricted(rendered):
    _, objects = rendered
    for pod in _pods(objects):
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] >= 10000
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True
        assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "splitlora-mpi"
    policy = _by_kind(objects, "NetworkPolicy")[0]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "splitlora-mpi"}
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    monitor = _by_kind(objects, "PodMonitor")[0]["spec"]
    assert monitor["podMetricsEndpoints"][0]["port"] == "metrics"


def _pods(objects: list[dict]) -> list[dict]:
    """The MPIJob's pod templates as the Pods the operator will create (for pod-level checks)."""
    pods = []
    for job in _by_kind(objects, "MPIJob"):
        for role, replica in job["spec"]["mpiReplicaSpecs"].items():
            template = replica["template"]
            metadata = {**template.get("metadata", {}), "name": f"{job['metadata']['name']}-{role.lower()}",
                        "namespace": job["metadata"]["namespace"]}  # fmt: skip
            pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]})
    return pods


# ---------------------------------------------------------------- linters


def test_checkov_finds_no_failed_checks(rendered, tmp_path):
    name, objects = rendered
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(objects + _pods(objects)))
    r = subprocess.run([_tool("checkov"), "-f", str(manifest), "--framework", "kubernetes", "--skip-download",
                        "--compact", "--output", "json"], capture_output=True, text=True)  # fmt: skip
    report = json.loads(r.stdout)
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert not failed and report["summary"]["passed"] > 100, failed
    skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
    justified = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_43"}  # in k8s/base/mpijob.yaml
    if name == "cpu":
        justified.add("CKV_K8S_15")  # in k8s/overlays/cpu: images loaded into kind, not pulled
    assert skipped <= justified, skipped


def test_hadolint_passes_every_dockerfile():
    dockerfiles = sorted((REPO / "docker").glob("Dockerfile*"))
    assert len(dockerfiles) == 3  # cpu, cuda, model
    r = subprocess.run([_tool("hadolint"), *map(str, dockerfiles)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_crds_are_vendored_with_their_licenses():
    notice = (K8S / "crds" / "README.md").read_text()
    for name in CRD_FILES.values():
        assert (K8S / "crds" / name).is_file() and name in notice
    assert "Apache License" in (K8S / "crds" / "LICENSE.mpi-operator").read_text()
    assert "Apache License" in (K8S / "crds" / "LICENSE.prometheus-operator").read_text()
