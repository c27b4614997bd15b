"""The rendered overlays read as a cluster operator reads them (issue 29 item 6): each check is
one line of an operator's checklist for a locked-down cluster."""

from __future__ import annotations

import copy
from pathlib import PurePosixPath

import pytest
import yaml
from test_k8s import OVERLAYS, _by_kind, render

DNS_PORT = 53
SECRET_MODE = 0o400  # the kubelet ORs in 0440 under fsGroup: root:<fsGroup> 0440 (run/secret.py)


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


def _job_secret_problems(name: str, objects: list[dict]) -> list[str]:
    """What keeps the rendered job from reading its secret the one intended way: the config's
    comm.secret_file lies, in every container of the launcher and the workers, in a read-only
    mount of one Secret volume (defaultMode 0400, not optional, the file one of its items)."""
    path = (_job_config(objects).get("comm") or {}).get("secret_file")
    if not path:
        return [f"{name}: the config sets no comm.secret_file (any process that reaches rank 0 becomes a client)"]
    problems, secrets = [], set()
    for role, pod in _pods(objects).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            holding = [m for m in c.get("volumeMounts", []) if PurePosixPath(path).is_relative_to(m["mountPath"])]
            if not holding:
                problems.append(f"{name}: the {role} container {c['name']} mounts nothing at comm.secret_file {path}")
                continue
            mount = max(holding, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))  # (the innermost serves it)
            volume = volumes[mount["name"]]
            source = volume.get("secret")
            if source is None:
                kind = next(k for k in volume if k != "name")
                problems.append(f"{name}: the {role} reads comm.secret_file {path} from volume {mount['name']} "
                                f"({kind}), not a Secret")  # fmt: skip
                continue
            secrets.add(source["secretName"])
            if not mount.get("readOnly"):
                problems.append(f"{name}: the {role} mounts the job Secret writable at {mount['mountPath']}")
            if source.get("defaultMode") != SECRET_MODE:
                mode = source.get("defaultMode")
                problems.append(f"{name}: the {role}'s job Secret volume has defaultMode {mode!r}, expected 0400")
            if source.get("optional", False) is not False:
                problems.append(f"{name}: the {role}'s job Secret volume is optional: the pods would start without it")
            inside = str(PurePosixPath(path).relative_to(mount["mountPath"]))
            items = {i["path"] for i in source.get("items", [])}
            if inside not in items:
                problems.append(f"{name}: the {role}'s job Secret volume projects {sorted(items)}, not {inside!r}")
    if len(secrets) > 1:
        problems.append(f"{name}: the pods mount different Secrets {sorted(secrets)} as the job secret")
    return problems


def test_every_rank_reads_the_job_secret_from_a_read_only_secret_mount(overlay):
    """The job secret (comm.secret_file) comes from a Kubernetes Secret the user creates, mounted
    read-only in the launcher and every worker; no secret value is in the manifests."""
    name, objects = overlay
    assert _job_secret_problems(name, objects) == []
    assert not _by_kind(objects, "Secret")  # (created once by the user: README, Deploying on Kubernetes)


def _with_config(objects: list[dict], secret_file: str | None) -> None:
    (cm,) = [c for c in _by_kind(objects, "ConfigMap") if "config.yaml" in c.get("data", {})]
    config = yaml.safe_load(cm["data"]["config.yaml"])
    config.setdefault("comm", {})["secret_file"] = secret_file
    cm["data"]["config.yaml"] = yaml.safe_dump(config)


def _secret_mount(pod: dict) -> dict:
    return next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "job-secret")


def _secret_volume(pod: dict) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == "job-secret")["secret"]


MUTATIONS = {
    "writable mount": (lambda o: _secret_mount(_pods(o)["Worker"]).update(readOnly=False),
                       "the Worker mounts the job Secret writable at /etc/splitlora-secret"),
    "mount left out": (lambda o: _pods(o)["Launcher"]["containers"][0]["volumeMounts"].remove(
                           _secret_mount(_pods(o)["Launcher"])),
                       "the Launcher container launcher mounts nothing at comm.secret_file"),
    "config path outside the mount": (lambda o: _with_config(o, "/etc/splitlora/job.secret"),
                                      "comm.secret_file /etc/splitlora/job.secret from volume config (configMap)"),
    "config path on scratch": (lambda o: _with_config(o, "/tmp/job.secret"),
                               "from volume tmp (emptyDir), not a Secret"),
    "config path unmounted": (lambda o: _with_config(o, "/run/job.secret"), "mounts nothing at comm.secret_file"),
    "no secret configured": (lambda o: _with_config(o, None), "the config sets no comm.secret_file"),
    "file not projected": (lambda o: _with_config(o, "/etc/splitlora-secret/other.secret"),
                           "projects ['job.secret'], not 'other.secret'"),
    "mode 0644": (lambda o: _secret_volume(_pods(o)["Worker"]).update(defaultMode=0o644),
                  "job Secret volume has defaultMode 420, expected 0400"),
    "optional": (lambda o: _secret_volume(_pods(o)["Launcher"]).update(optional=True),
                 "job Secret volume is optional"),
    "another Secret": (lambda o: _secret_volume(_pods(o)["Worker"]).update(secretName="other"),
                       "the pods mount different Secrets"),
}  # fmt: skip


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_job_secret_check_fails_on_a_broken_render(overlay, mutation):
    """The check above can fail: each mutation of a rendered overlay is reported."""
    name, objects = overlay
    objects = copy.deepcopy(objects)
    mutate, expected = MUTATIONS[mutation]
    mutate(objects)
    problems = _job_secret_problems(name, objects)
    assert any(expected in p for p in problems), problems
