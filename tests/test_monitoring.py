"""Metrics against real tools: exact counting, a real Prometheus scraping a real mpirun job,
every dashboard panel's PromQL, promtool on the alert rules, a real Pushgateway."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from conftest import run_cmd, splitlora
from prometheus_client.parser import text_string_to_metric_families

from splitlora_mpi.config import load_config
from splitlora_mpi.data import packaged_data_paths, read_examples
from splitlora_mpi.metrics import KINDS, LOST_REASONS, Metrics

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "k8s" / "base" / "monitoring"
RANKS = 3


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install the Debian packages prometheus and prometheus-pushgateway: docs/testing.md"
    return path


def free_port(n: int = 1) -> int:
    """A base port with n consecutive free ports on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free ports")


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _wait_until_ready(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        assert proc.poll() is None, f"{what} exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            _get(url, timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} not ready")


# ---------------------------------------------------------------- exact counting (no tools)


def test_counting_is_exact():
    m = Metrics(rank=1, role="client")
    sizes = [131072, 4096, 64, 64, 131072, 8200]
    kinds = ["activations", "labels", "control", "control", "activations", "adapters"]
    for n, kind in zip(sizes, kinds):
        m.sent(0, kind, n)
    m.received(0, "gradients", 131072)
    assert m.sent_by_kind() == {"activations": 262144, "gradients": 0, "labels": 4096, "adapters": 8200, "control": 128}
    assert m.received_by_kind()["gradients"] == 131072 and m.total_sent() == sum(sizes)
    assert m.sent_messages[("0", "control")] == 2 and m.sent_messages[("0", "activations")] == 2


def test_endpoint_serves_the_same_exact_counts():
    m = Metrics(rank=2, role="client", export=True)
    port = free_port()
    m.serve("127.0.0.1", port)
    try:
        for i in range(7):
            m.sent(0, "activations", 1000 + i)
        m.received("clients", "adapters", 808)
        m.step(3, 0.25, 512)
        families = {f.name: f for f in text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics"))}
    finally:
        m.stop()
    sent = [s for s in families["splitlora_sent_bytes"].samples if s.name.endswith("_total")]
    assert [(s.labels, s.value) for s in sent] == [
        ({"rank": "2", "role": "client", "peer": "0", "kind": "activations"}, 7 * 1000 + 21)
    ]
    messages = [s for s in families["splitlora_sent_messages"].samples if s.name.endswith("_total")]
    assert messages[0].value == 7
    received = [s for s in families["splitlora_received_bytes"].samples if s.name.endswith("_total")]
    assert received[0].labels["peer"] == "clients" and received[0].value == 808
    assert next(s.value for s in families["splitlora_step"].samples) == 3
    assert "process_resident_memory_bytes" in families


def _served(m: Metrics) -> dict:
    port = free_port()
    m.serve("127.0.0.1", port)
    try:
        return {f.name: f for f in text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics"))}
    finally:
        m.stop()


def _totals(family) -> list[tuple[dict, float]]:
    return sorted(((s.labels, s.value) for s in family.samples if s.name.endswith("_total")),
                  key=lambda x: sorted(x[0].items()))  # fmt: skip


def test_client_counts_are_kept_without_prometheus():
    """In a fresh interpreter: the plain counts (for summary.json), and prometheus_client never imported."""
    code = """
import json, sys
from splitlora_mpi.metrics import Metrics
m = Metrics(rank=0, role="server")
before = [m.live, dict(m.lost_by_reason), m.joined]
m.clients_live(4)
m.client_lost("timeout"); m.client_lost("killed"); m.client_lost("timeout")
m.client_joined()
m.clients_live(3)
print(json.dumps([before, [m.live, m.lost_by_reason, m.joined], "prometheus_client" in sys.modules]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [[None, {}, 0], [3, {"timeout": 2, "killed": 1}, 1], False]


def test_endpoint_serves_the_client_series():
    server = Metrics(rank=0, role="server", export=True)
    before = _served(server)
    mine = {"rank": "0", "role": "server"}
    # the counters exist at 0 from the start (so that increase() sees the first loss); live once set
    assert _totals(before["splitlora_clients_lost"]) == sorted(
        (({**mine, "reason": r}, 0.0) for r in LOST_REASONS), key=lambda x: sorted(x[0].items())
    )
    assert _totals(before["splitlora_clients_joined"]) == [(mine, 0.0)]
    assert not before["splitlora_clients_live"].samples

    server.clients_live(4)
    for reason in ("timeout", "evicted", "timeout", "preempted"):  # any reason string is a series
        server.client_lost(reason)
    server.client_joined()
    server.client_joined()
    server.clients_live(3)
    after = _served(server)
    lost = dict.fromkeys(LOST_REASONS, 0.0) | {"timeout": 2.0, "evicted": 1.0, "preempted": 1.0}
    assert _totals(after["splitlora_clients_lost"]) == sorted(
        (({**mine, "reason": r}, n) for r, n in lost.items()), key=lambda x: sorted(x[0].items())
    )
    assert _totals(after["splitlora_clients_joined"]) == [(mine, 2.0)]
    assert [(s.labels, s.value) for s in after["splitlora_clients_live"].samples] == [(mine, 3.0)]
    assert (server.live, server.joined) == (3, 2)
    assert server.lost_by_reason == {"timeout": 2, "evicted": 1, "preempted": 1}

    client = _served(Metrics(rank=1, role="client", export=True))  # the server's series only
    for name in ("splitlora_clients_lost", "splitlora_clients_joined", "splitlora_clients_live"):
        assert not client[name].samples, name


def test_port_in_use_is_a_clear_exit_2(tmp_path):
    base = free_port(RANKS)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", base + 1))  # rank 1's port
        blocker.listen()
        r = run_cmd(
            splitlora("--set", "metrics.enabled=true", "--set", f"metrics.port={base}", ranks=RANKS),
            cwd=tmp_path,
            timeout=180,
        )
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{base + 1}" in lines[0] and "rank 1" in lines[0]


# ---------------------------------------------------------------- a real Prometheus


@contextmanager
def _prometheus(tmp: Path, ports: list[int]) -> Iterator[str]:
    """A Prometheus (1 s scrapes, the alert rules loaded) scraping 127.0.0.1:ports as job splitlora; its URL."""
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yaml")],
        "scrape_configs": [
            {"job_name": "splitlora", "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in ports]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom = subprocess.Popen(
        [_tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{prom_port}"
    try:
        _wait_until_ready(f"{url}/-/ready", prom, "prometheus")
        yield url
    finally:
        prom.terminate()
        prom.wait(timeout=30)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A Prometheus watching a real `mpirun -n 3` job."""
    tmp = tmp_path_factory.mktemp("prom")
    base = free_port(RANKS)
    with _prometheus(tmp, [base + i for i in range(RANKS)]) as url:
        started = time.time()
        r = run_cmd(
            splitlora(
                "--set", "metrics.enabled=true", "--set", f"metrics.port={base}", "--set", "metrics.linger_s=4",
                "--set", "train.steps=60", "--set", "train.aggregate_every=5", "--set", "train.eval_every=30",
                "--set", "run.out_dir=run",
                ranks=RANKS,
            ),
            cwd=tmp,
            timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        yield url, _last_time_all_up(url, started, time.time()), tmp / "run"


def _last_time_all_up(url: str, start: float, end: float) -> float:
    """The last moment every rank's endpoint answered: inside the linger window, after the
    final values were recorded and before the ranks shut their endpoints."""
    q = urllib.parse.urlencode({"query": 'count(up{job="splitlora"} == 1)', "start": start, "end": end, "step": 0.5})
    values = json.loads(_get(f"{url}/api/v1/query_range?{q}"))["data"]["result"][0]["values"]
    return max(float(t) for t, v in values if int(v) == RANKS)


def query(url: str, expr: str, at: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"})
    body = json.loads(_get(f"{url}/api/v1/query?{q}"))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _by(result: list[dict], label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in result}


def test_every_rank_serves_every_series(scraped):
    url, at, _ = scraped
    ups = _by(query(url, 'up{job="splitlora"}', at), "instance")
    assert len(ups) == RANKS and set(ups.values()) == {1.0}
    everyone = {str(r) for r in range(RANKS)}
    for metric in ("splitlora_sent_bytes_total", "splitlora_received_bytes_total", "splitlora_sent_messages_total",
                   "splitlora_comm_seconds_count", "splitlora_step_seconds_count", "splitlora_tokens_total",
                   "splitlora_step"):  # fmt: skip
        assert set(_by(query(url, f"count by (rank) ({metric})", at), "rank")) == everyone, metric
    for metric in ("splitlora_train_loss", "splitlora_val_loss"):  # computed where the loss is: the server
        assert set(_by(query(url, metric, at), "rank")) == {"0"}, metric
    # the server's client series: every client live, none lost or joined
    assert _by(query(url, "splitlora_clients_live", at), "rank") == {"0": float(RANKS - 1)}
    lost = query(url, "splitlora_clients_lost_total", at)
    assert {(r["metric"]["rank"], r["metric"]["reason"], float(r["value"][1])) for r in lost} == {
        ("0", reason, 0.0) for reason in LOST_REASONS
    }
    assert _by(query(url, "splitlora_clients_joined_total", at), "rank") == {"0": 0.0}
    roles = _by(query(url, "count by (role) (splitlora_step)", at), "role")
    assert roles == {"server": 1.0, "client": 2.0}
    assert set(_by(query(url, "count by (op) (splitlora_comm_seconds_count)", at), "op")) == {
        "send",
        "recv",
        "allreduce",
    }
    assert _by(query(url, "splitlora_step", at), "rank") == {r: 60.0 for r in everyone}


def test_bytes_agree_with_summary_and_tensor_sizes(scraped):
    url, at, out = scraped
    summary = json.loads((out / "summary.json").read_text())
    sent = _by(query(url, "sum by (kind) (splitlora_sent_bytes_total)", at), "kind")
    received = _by(query(url, "sum by (kind) (splitlora_received_bytes_total)", at), "kind")
    assert {k: int(sent.get(k, 0)) for k in KINDS} == summary["bytes"]
    assert received == sent  # every byte counted once on each side
    cfg = load_config(out / "config.yaml")
    b, t, h = cfg.train.batch_size, cfg.data.max_seq_len, cfg.model.config["n_embd"]
    val_rows = len(read_examples(packaged_data_paths()[1], "e2e"))
    clients, evals = RANKS - 1, 2
    assert sent["activations"] == (cfg.train.steps * b * clients + evals * val_rows) * t * h * 4
    assert sent["gradients"] == cfg.train.steps * b * clients * t * h * 4


def _dashboard() -> dict:
    return json.loads((MONITORING / "splitlora-dashboard.json").read_text())


def _concrete(expr: str) -> str:
    """Grafana's variables as a user viewing 'All' would have them."""
    for var, value in (("$__rate_interval", "10s"), ("$job", ".*"), ("$namespace", ".*"), ("$rank", ".*")):
        expr = expr.replace(var, value)
    return expr


def test_every_dashboard_panel_returns_data(scraped):
    url, at, _ = scraped
    targets = [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p["targets"]]
    assert len(targets) >= 15
    empty = [(title, expr) for title, expr in targets if not query(url, _concrete(expr), at)]
    assert not empty, empty


def _wait_for(what: str, check, timeout: float = 30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise TimeoutError(what)


def test_clients_panel_and_alert_on_an_elastic_server(tmp_path):
    """A server's endpoint scraped by a real Prometheus while it loses a client and another joins:
    every target of the clients panel, and SplitLoRAClientLost firing for that reason only."""
    server, port = Metrics(rank=0, role="server", export=True), free_port()
    server.serve("127.0.0.1", port)
    try:
        with _prometheus(tmp_path, [port]) as url:
            server.clients_live(3)
            _wait_for("two scrapes of the counters at 0", lambda: query(
                url, "count_over_time(splitlora_clients_lost_total[1m]) >= 2", time.time()))  # fmt: skip
            server.client_lost("timeout")
            server.clients_live(2)
            server.client_joined()
            server.clients_live(3)
            firing = _wait_for("SplitLoRAClientLost", lambda: [
                a for a in json.loads(_get(f"{url}/api/v1/alerts"))["data"]["alerts"]
                if a["labels"]["alertname"] == "SplitLoRAClientLost" and a["state"] == "firing"])  # fmt: skip
            at = time.time()
            panel = next(p for p in _dashboard()["panels"] if p["title"] == "Clients live / lost / joined")
            live, lost, joined = (query(url, _concrete(t["expr"]), at) for t in panel["targets"])
    finally:
        server.stop()
    assert [float(r["value"][1]) for r in live] == [3.0]
    lost_by_reason = _by(lost, "reason")
    assert set(lost_by_reason) == set(LOST_REASONS) and lost_by_reason["timeout"] > 0
    assert all(lost_by_reason[r] == 0 for r in LOST_REASONS if r != "timeout"), lost_by_reason
    assert len(joined) == 1 and float(joined[0]["value"][1]) > 0
    assert [a["labels"] for a in firing] == [
        {"alertname": "SplitLoRAClientLost", "job": "splitlora", "instance": f"127.0.0.1:{port}",
         "rank": "0", "role": "server", "reason": "timeout", "severity": "warning"}
    ]  # fmt: skip
    summary = firing[0]["annotations"]["summary"]
    assert summary == "server rank 0 of splitlora lost a client (timeout) in the last 10 minutes"


def test_dashboard_variables_have_values(scraped):
    url, _, _ = scraped
    for var in _dashboard()["templating"]["list"]:
        if var["type"] != "query" or var["name"] == "namespace":  # no namespace label outside Kubernetes
            continue
        q = var["query"]["query"]  # label_values(<selector>, <label>)
        selector, label = (x.strip() for x in q[len("label_values(") : -1].rsplit(",", 1))
        params = urllib.parse.urlencode({"match[]": _concrete(selector)})
        values = json.loads(_get(f"{url}/api/v1/label/{label}/values?{params}"))["data"]
        assert values, var["name"]


def test_alert_rules_load_and_evaluate(scraped):
    url, _, _ = scraped
    groups = json.loads(_get(f"{url}/api/v1/rules"))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules


# ---------------------------------------------------------------- rules and dashboard files


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = _tool("promtool")
    check = subprocess.run(
        [promtool, "check", "rules", str(MONITORING / "alerts.yaml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=REPO / "tests" / "promtool",
                          capture_output=True, text=True)  # fmt: skip
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


def test_prometheusrule_carries_the_same_rules():
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    crd = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert crd["kind"] == "PrometheusRule" and crd["spec"] == rules


def test_each_alert_is_unit_tested_firing_and_silent():
    alerts = {r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}  # fmt: skip
    cases = yaml.safe_load((REPO / "tests" / "promtool" / "alerts_test.yaml").read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    silent = {c["alertname"] for t in cases for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert alerts == fired == silent


# ---------------------------------------------------------------- Pushgateway


def test_final_values_reach_a_pushgateway(tmp_path):
    port = free_port()
    gw = subprocess.Popen([_tool("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_until_ready(f"http://127.0.0.1:{port}/-/ready", gw, "pushgateway")
        r = run_cmd(
            splitlora("--set", f"metrics.pushgateway=127.0.0.1:{port}", "--set", "train.steps=5",
                      "--set", "train.eval_every=0", "--set", "run.name=pushed", ranks=RANKS),
            cwd=tmp_path,
            timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        families = {f.name: f for f in text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics"))}
    finally:
        gw.terminate()
        gw.wait(timeout=30)
    sent = [s for s in families["splitlora_sent_bytes"].samples if s.name.endswith("_total")]
    assert {s.labels["rank"] for s in sent} == {str(r) for r in range(RANKS)}
    assert all(s.labels["job"] == "pushed" for s in sent)
    summary = json.loads((tmp_path / "runs" / "pushed" / "summary.json").read_text())
    for kind in KINDS:
        assert sum(s.value for s in sent if s.labels["kind"] == kind) == summary["bytes"][kind], kind


# ---------------------------------------------------------------- local monitoring stack


def test_local_stack_is_consistent(tmp_path):
    """docker/monitoring: no Docker engine here, so check what can be checked offline."""
    stack = REPO / "docker" / "monitoring"
    compose = yaml.safe_load((stack / "compose.yaml").read_text())
    mounts = {}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (stack / source).resolve().exists(), source
                mounts[target] = (stack / source).resolve()
    assert mounts["/var/lib/grafana/dashboards/splitlora-dashboard.json"] == MONITORING / "splitlora-dashboard.json"
    assert mounts["/etc/prometheus/alerts.yaml"] == MONITORING / "alerts.yaml"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in mounts
    check = subprocess.run([_tool("promtool"), "check", "config", str(stack / "prometheus.yml")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    datasource = yaml.safe_load((stack / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    listen = next(a for a in compose["services"]["prometheus"]["command"] if a.startswith("--web.listen-address="))
    assert datasource["datasources"][0]["url"] == "http://" + listen.split("=", 1)[1]
    targets = yaml.safe_load((stack / "prometheus.yml").read_text())["scrape_configs"][0]["static_configs"][0]
    port = load_config().metrics.port  # each rank: metrics.port + local rank; the default job has 9 ranks
    assert targets["targets"] == [f"127.0.0.1:{port + r}" for r in range(9)]
