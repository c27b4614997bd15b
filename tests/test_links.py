"""The WireGuard overlay (`python -m splitlora_mpi.links`): the files `init` writes, its refusals,
and the proof on the wire — three hosts in network namespaces, `links up` with wireguard-go,
a real mpirun over the overlay and without it, packet captures on every link."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import netns
import pytest
import torch
from canary_rank import canary_bytes
from safetensors.torch import load_file

from splitlora_mpi import links
from splitlora_mpi.run.secret import read_secret

ROOT = Path(__file__).resolve().parents[1]


def _links(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitlora_mpi.links", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def _config(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """A wg-quick config as ([Interface] keys, [[Peer] keys, ...])."""
    sections: list[dict[str, str]] = []
    for line in path.read_text().splitlines():
        if line.startswith("["):
            sections.append({})
        elif "=" in line and not line.startswith("#"):
            key, value = (x.strip() for x in line.split("=", 1))
            sections[-1][key] = value
    return sections[0], sections[1:]


def test_init_writes_a_mesh_whose_keys_and_secret_stay_private(tmp_path):
    hosts = ["server.example", "198.51.100.11", "2001:db8::12"]
    (tmp_path / "hosts").write_text("# the server first\n" + "\n".join(hosts) + "\n\n")
    r = _links("init", str(tmp_path / "hosts"), "--out", str(tmp_path / "links"), "--net", "10.99.0.0/24")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "links"
    dirs = sorted(p.name for p in out.iterdir())
    assert dirs == ["host-0", "host-1", "host-2"]
    addresses = ["10.99.0.1", "10.99.0.2", "10.99.0.3"]
    public = {}
    for i, d in enumerate(dirs):
        conf = out / d / links.CONFIG
        assert conf.stat().st_mode & 0o777 == 0o600 and (out / d / "job.secret").stat().st_mode & 0o777 == 0o600
        me, peers = _config(conf)
        assert me["Address"] == f"{addresses[i]}/24" and me["ListenPort"] == str(links.PORT)
        public[i] = subprocess.run(["wg", "pubkey"], input=me["PrivateKey"], capture_output=True, text=True,
                                   check=True).stdout.strip()  # fmt: skip
        assert [p["AllowedIPs"] for p in peers] == [f"{a}/32" for j, a in enumerate(addresses) if j != i]
        assert all(("PersistentKeepalive" in p) == (i != 0) for p in peers)  # clients keep NAT mappings open
        assert (out / d / "hostfile").read_text().split() == addresses
        assert "FI_TCP_IFACE=splitlora" in (out / d / "mpi.env").read_text().splitlines()
        # wg-quick itself parses it (strip: the config without wg-quick's own keys)
        strip = subprocess.run(["wg-quick", "strip", str(conf)], capture_output=True, text=True, timeout=30)
        assert strip.returncode == 0 and "PrivateKey" in strip.stdout, strip.stderr
    for i, d in enumerate(dirs):  # every peer entry names the right host's public key and endpoint
        for j, peer in zip([j for j in range(3) if j != i], _config(out / d / links.CONFIG)[1]):
            assert peer["PublicKey"] == public[j]
            assert peer["Endpoint"] == ("[2001:db8::12]" if j == 2 else hosts[j]) + f":{links.PORT}"
    secrets = {(out / d / "job.secret").read_bytes() for d in dirs}
    assert len(secrets) == 1 and read_secret(str(out / "host-1" / "job.secret"))  # a valid comm.secret_file
    printed = r.stdout + r.stderr
    for d in dirs:
        assert _config(out / d / links.CONFIG)[0]["PrivateKey"] not in printed
    assert secrets.pop().strip().decode() not in printed
    assert "mpirun -f DIR/hostfile -localhost 10.99.0.1 -n 3" in r.stdout


@pytest.mark.parametrize(
    ("hosts", "extra", "message"),
    [
        ("a.example\n", [], r"hosts file .*: 1 host\(s\); expected the server and at least one client"),
        ("a.example\nb.example\na.example\n", [], r"hosts file .*:3: a.example is listed twice"),
        ("a.example\nb_c!\n", [], r"hosts file .*:2: 'b_c!' is no host name or IP address"),
        ("a.example\nb.example\n", ["--net", "8.8.8.0/24"], r"--net 8.8.8.0/24: not a private range"),
        ("a\nb\nc\n", ["--net", "10.0.0.0/30"], r"--net 10.0.0.0/30: room for 2 hosts; the hosts file has 3"),
        (None, [], r"hosts file .*: cannot read it"),
    ],
)
def test_init_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, hosts, extra, message):
    if hosts is not None:
        (tmp_path / "hosts").write_text(hosts)
    r = _links("init", str(tmp_path / "hosts"), "--out", str(tmp_path / "links"), *extra)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "links").exists()


def test_init_keeps_an_existing_overlay_and_up_refuses_a_key_others_can_read(tmp_path):
    (tmp_path / "hosts").write_text("a.example\nb.example\n")
    assert _links("init", str(tmp_path / "hosts"), "--out", str(tmp_path / "links")).returncode == 0
    conf = tmp_path / "links" / "host-1" / links.CONFIG
    before = conf.read_bytes()
    again = _links("init", str(tmp_path / "hosts"), "--out", str(tmp_path / "links"))
    assert again.returncode == 2 and "exists; expected a new directory" in again.stderr
    assert conf.read_bytes() == before
    conf.chmod(0o644)
    r = _links("up", str(conf.parent))
    assert r.returncode == 2 and "has mode 0644: its private key is readable by others" in r.stderr, r.stderr
    r = _links("check", str(tmp_path))
    assert r.returncode == 2 and f"no {links.CONFIG}; expected one host's directory" in r.stderr, r.stderr


# ---------------------------------------------------------------- proof on the wire

REASON = netns.unavailable()
SETS = ("train.steps=4", "train.log_every=1", "train.aggregate_every=2", "train.eval_every=0")


@pytest.mark.skipif(REASON is not None, reason=f"network namespaces unavailable: {REASON}")
def test_over_the_overlay_no_activation_byte_is_readable_and_the_adapters_are_the_same(tmp_path):
    """3 hosts (server + 2 clients) joined by veth links; `links up` on each (wireguard-go: this
    kernel has no WireGuard module), `links check` fresh, `links down` removes the interface. The
    same job (each client's step-1 activations filled with a canary pattern) runs once over the
    overlay and once over the plain links, a capture on every link: with the overlay every IP
    packet is WireGuard's UDP and the canary appears 0 times; without it, many times; the two
    adapters are bit-identical; no private key or secret is in any output or capture."""
    canary = canary_bytes(torch.float32)
    with netns.network(2) as net:
        ov = netns.overlay(net, tmp_path / "links")
        for host in ov.dirs:
            r = ov.links(host, "up")
            assert r.returncode == 0 and "splitlora: up (userspace wireguard-go)" in r.stdout, r.stderr
        check = ov.links("slm-srv", "check")
        assert check.returncode == 0 and check.stdout.count(": fresh") == 2, check.stdout + check.stderr
        r = ov.links("slm-c2", "down")
        assert r.returncode == 0, r.stderr
        assert "splitlora" not in netns.sh("ip", "-n", "slm-c2", "-o", "link").stdout
        assert ov.links("slm-c2", "up").returncode == 0

        runs = {}
        args = [sys.executable, str(ROOT / "tests" / "canary_rank.py")]
        args += [a for s in (*SETS, f"comm.secret_file={ov.dirs['slm-srv'] / 'job.secret'}") for a in ("--set", s)]
        plain = net.mpirun(args, hostfile=net.workdir / "hosts", localhost=net.hosts[0].addr)
        for name, cmd in (("overlay", ov.mpirun(args)), ("plain", net.on("slm-srv", *plain))):
            out = tmp_path / name
            (tmp_path / f"{name}-pcap").mkdir()
            with net.capture(tmp_path / f"{name}-pcap") as pcaps:
                job = net.run([*cmd, "--set", f"run.out_dir={out}"], timeout=240)
            assert job.returncode == 0, f"{name}:\n{job.stdout[-2000:]}\n{job.stderr[-3000:]}"
            runs[name] = (job, pcaps, out)

    counts = {}
    for name, (_, pcaps, _) in runs.items():
        for host, pcap in pcaps.items():
            data = pcap.read_bytes()
            ip = _packets(pcap, "ip")
            not_wireguard = _packets(pcap, f"ip and not udp port {links.PORT}")
            counts[name, host] = (data.count(canary), ip, not_wireguard)
    print("canary copies, IP packets, IP packets that are not WireGuard's, per link:")
    for (name, host), c in sorted(counts.items()):
        print(f"  {name:8} {host:8} {c[0]:>8,} {c[1]:>8,} {c[2]:>8,}")
    for host in ("slm-srv", "slm-c1", "slm-c2"):
        canaries, ip, plain = counts["overlay", host]
        assert canaries == 0 and ip > 100 and plain == 0, (host, counts["overlay", host])
        assert counts["plain", host][0] > 1000 and counts["plain", host][2] > 100, (host, counts["plain", host])
    adapters = [load_file(out / "adapter" / "adapter_model.safetensors") for _, _, out in runs.values()]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) > 0
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])

    secrets = [(ov.dirs["slm-srv"] / "job.secret").read_text().strip()]
    secrets += [_config(d / links.CONFIG)[0]["PrivateKey"] for d in ov.dirs.values()]
    for name, (job, pcaps, out) in runs.items():
        texts = [job.stdout, job.stderr, check.stdout, check.stderr]
        files = [p for p in out.rglob("*") if p.is_file()] + list(pcaps.values())
        blobs = [t.encode() for t in texts] + [p.read_bytes() for p in files]
        for s in secrets:
            assert not any(s.encode() in b for b in blobs), f"a secret or private key is in the {name} run's output"


def _packets(pcap: Path, expression: str) -> int:
    r = subprocess.run(["tcpdump", "-r", str(pcap), "-n", expression], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return len(r.stdout.splitlines())
