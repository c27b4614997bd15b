"""The rendered overlays read as a cluster operator reads them (issue 29 item 6): each check is
one line of an operator's checklist for a locked-down cluster."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
import yaml
from test_k8s import OVERLAYS, _by_kind, render

DNS_PORT = 53


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def _mpijob(objects: list[dict]) -> dict:
    (job,) = _by_kind(objects, "MPIJob")
    return job


def _pods(objects: list[dict]) -> dict[str, dict]:
    """Launcher and Worker pod specs."""
    return {role: s["template"]["spec"] for role, s in _mpijob(objects)["spec"]["mpiReplicaSpecs"].items()}


def _job_config(objects: list[dict]) -> dict:
    (cm,) = [c for c in _by_kind(objects, "ConfigMap") if "config.yaml" in c.get("data", {})]
    return yaml.safe_load(cm["data"]["config.yaml"])


def test_the_model_is_no_hub_id_and_every_rank_mounts_it_read_only(overlay):
    """The pods have no egress: a model they would download cannot start. A model path must be a
    volume mounted read-only in the launcher and every worker (default: the tiny model built from
    its config, no file at all)."""
    name, objects = overlay
    model = _job_config(objects).get("model", {})
    for key in ("name_or_path", "tokenizer"):
        path = model.get(key)
        if path is None or (key == "tokenizer" and path == "byte"):
            continue  # (built in: nothing to read)
        assert path.startswith("/"), f"{name}: model.{key} {path!r} is a Hub id or a relative path"
        for role, pod in _pods(objects).items():
            mounts = [m for c in pod["containers"] for m in c.get("volumeMounts", [])]
            holding = [m for m in mounts if PurePosixPath(path).is_relative_to(m["mountPath"])]
            assert holding, f"{name}: the {role} mounts nothing at model.{key} {path}"
            assert all(m.get("readOnly") for m in holding), f"{name}: the {role} mounts {path} writable"
            volumes = {v["name"]: v for v in pod["volumes"]}
            for m in holding:
                image = volumes[m["name"]].get("image", {}).get("reference", "")
                assert "/" in image or "image" not in volumes[m["name"]], (
                    f"{name}: the model image {image!r} names no registry (the overlay's images: entry)"
                )


def test_no_egress_beyond_the_job_and_dns(overlay):
    name, objects = overlay
    for policy in _by_kind(objects, "NetworkPolicy"):
        if policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") != "splitlora-mpi":
            continue  # (a model-provisioning Job's own policy)
        for rule in policy["spec"].get("egress", []):
            peers = rule.get("to", [])
            assert peers, f"{name}: an egress rule without 'to' allows every destination"
            job_only = all(set(p) == {"podSelector"} for p in peers)
            dns_only = {p["port"] for p in rule.get("ports", [])} == {DNS_PORT}
            assert job_only or dns_only, f"{name}: egress beyond the job's pods and DNS: {rule}"


def test_no_read_write_many_claim_without_a_reason(overlay):
    name, objects = overlay
    for claim in _by_kind(objects, "PersistentVolumeClaim"):
        if "ReadWriteMany" in claim["spec"]["accessModes"]:
            why = claim["metadata"].get("annotations", {}).get("splitlora.io/why-read-write-many")
            assert why, f"{name}: claim {claim['metadata']['name']} is ReadWriteMany with no reason given"


def test_worker_volumes_are_read_only_except_scratch(overlay):
    name, objects = overlay
    worker = _pods(objects)["Worker"]
    scratch = {v["name"] for v in worker.get("volumes", []) if "emptyDir" in v}
    for container in worker["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount.get("readOnly") or mount["name"] in scratch, f"{name}: worker mounts {mount['name']} writable"
    claims = [v["name"] for v in worker.get("volumes", []) if "persistentVolumeClaim" in v]
    assert not claims, f"{name}: workers mount claims {claims} (outputs are the launcher's alone)"


def test_the_image_fits_the_role(overlay):
    """Edge workers are CPU devices: the CPU image; a container asking for a GPU runs the CUDA one."""
    name, objects = overlay
    for role, pod in _pods(objects).items():
        for c in pod["containers"]:
            gpu = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            cuda = c["image"].rsplit(":", 1)[-1].startswith("cuda")
            assert gpu == cuda, f"{name}: {role} image {c['image']} with{'' if gpu else 'out'} a GPU"
    if name == "edge":
        assert not any(c["image"].endswith(":cuda") for c in _pods(objects)["Worker"]["containers"])


def test_every_container_requests_resources(overlay):
    name, objects = overlay
    for role, pod in _pods(objects).items():
        for c in [*pod.get("initContainers", []), *pod["containers"]]:
            requests = c.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(requests), f"{name}: {role} container {c['name']} requests {requests}"


def test_the_launcher_starts_one_rank_per_worker_plus_the_server(overlay):
    name, objects = overlay
    specs = _mpijob(objects)["spec"]["mpiReplicaSpecs"]
    (launcher,) = specs["Launcher"]["template"]["spec"]["containers"]
    command = launcher.get("command", []) + launcher.get("args", [])
    n = int(command[command.index("-n") + 1])
    assert n == specs["Worker"]["replicas"] + 1, f"{name}: -n {n} with {specs['Worker']['replicas']} workers"


def test_monitoring_objects_carry_the_release_label(overlay):
    name, objects = overlay
    for kind in ("PodMonitor", "PrometheusRule"):
        for o in _by_kind(objects, kind):
            assert "release" in o["metadata"].get("labels", {}), f"{name}: {kind} has no release label"


def test_the_dashboard_configmap_carries_the_grafana_sidecar_label(overlay):
    name, objects = overlay
    dashboards = [c for c in _by_kind(objects, "ConfigMap") if any(k.endswith(".json") for k in c.get("data", {}))]
    assert dashboards, f"{name}: no dashboard ConfigMap"
    for c in dashboards:
        assert "grafana_dashboard" in c["metadata"].get("labels", {}), (
            f"{name}: {c['metadata']['name']} has no sidecar label"
        )
