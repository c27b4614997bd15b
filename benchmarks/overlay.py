"""What the WireGuard overlay costs (`python -m splitlora_mpi.links`), on 3 hosts in network namespaces.

    python benchmarks/overlay.py [--trials 3] [--steps 24]     # -> benchmarks/results/overlay.json

In one run, interleaved trial by trial so load elsewhere hits every setting alike: the same
training job over the plain links and over the overlay (both with the job secret), and over
the plain links without the secret; per job the median step time, the bytes on the client links
and their rate. Then MPI ping-pong between the server's and a client's host at three message
sizes (latency, an activation message, a large one) over both; `links up` per host, and the
CPU cost of the secret's challenge-response. The overlay here is wireguard-go, userspace, on
2 shared cores (the kernel has no WireGuard module): the JSON labels it so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

from common import machine
from multihost import write_json
from netns import Network, network, overlay, splitlora, unavailable

ROOT = Path(__file__).resolve().parents[1]
SIZES = (64, 131072, 4194304)  # latency; one client's activations in the job below; large
MODES = ("plain", "overlay", "plain, no secret")


def run_job(net: Network, cmd: list[str], out: Path) -> dict:
    """One job; its step time (median of the logged steps after the first two), wall time and
    the bytes that crossed the client links while it ran."""
    before = {h: net.counters(h) for h in net.client_hosts}
    job = net.run([*cmd, "--set", f"run.out_dir={out}"], timeout=600)
    if job.returncode:
        sys.exit(f"job failed ({job.returncode}):\n{job.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in rows if "train_loss" in r]
    steps = [b - a for a, b in zip(walls[2:], walls[3:])]
    summary = json.loads((out / "summary.json").read_text())
    wire = sum(net.counters(h)[k] - before[h][k] for h in net.client_hosts for k in ("tx_bytes", "rx_bytes"))
    train_s = walls[-1] - walls[0]
    return {"step_s": statistics.median(steps), "job_s": job.wall_s, "train_s": train_s,
            "client_link_bytes": wire, "sent_bytes": rows[-1]["sent_bytes"],
            "final_train_loss": summary["final_train_loss"],
            "startup_handshake_s": max(s["handshake"] for s in summary["startup_s"].values()),
            "startup_preflight_s": max(s["preflight"] for s in summary["startup_s"].values())}  # fmt: skip


def pingpong(net: Network, cmd: list[str]) -> dict[int, float]:
    """Median round trip (s) per message size, server host <-> first client host."""
    job = net.run(cmd, timeout=300)
    if job.returncode:
        sys.exit(f"ping-pong failed ({job.returncode}):\n{job.stderr[-3000:]}")
    return {r["size"]: r["rtt_s"] for r in map(json.loads, (x for x in job.stdout.splitlines() if x[:1] == "{"))}


def secret_cpu_s() -> float:
    """Rank 0's and one client's CPU for the challenge-response of one client (nonce, HMAC, check)."""
    sys.path.insert(0, str(ROOT))
    from splitlora_mpi.run import secret

    key, fingerprint = b"k" * 44, {"model": "x" * 2000, "train": "y" * 500}  # a fingerprint of this size

    def one() -> None:
        challenge = secret.nonce(key)
        proof = secret.answer(key, challenge, 1, fingerprint)
        assert secret.refusal(key, {1: challenge}, fingerprint, {1: proof}) is None

    n = 2000
    return min(timeit.repeat(one, number=n, repeat=5)) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overlay.json")
    args = p.parse_args()
    if reason := unavailable():
        sys.exit(f"overlay: {reason}")
    sets = (f"train.steps={args.steps}", "train.log_every=1", "train.aggregate_every=4", "train.eval_every=0")
    jobs: dict[str, list[dict]] = {m: [] for m in MODES}
    rtt: dict[str, dict[int, list[float]]] = {m: {s: [] for s in SIZES} for m in MODES[:2]}
    up_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, network(2) as net:
        ov = overlay(net, Path(tmp) / "links")
        for host in ov.dirs:
            start = time.perf_counter()
            r = ov.links(host, "up")
            up_s[host] = time.perf_counter() - start
            if r.returncode:
                sys.exit(f"links up in {host}: {r.stderr.strip()}")
        start = time.perf_counter()
        check = ov.links(net.server, "check", "--wait", "10")
        check_s = time.perf_counter() - start
        if check.returncode:
            sys.exit(f"links check: {check.stdout}{check.stderr}")
        with_secret = (*sets, f"comm.secret_file={ov.dirs[net.server] / 'job.secret'}")
        plain = net.mpirun([], hostfile=net.workdir / "hosts", localhost=net.hosts[0].addr)
        commands = {
            "plain": net.on(net.server, *plain, *splitlora(*with_secret)),
            "overlay": ov.mpirun(splitlora(*with_secret)),
            "plain, no secret": net.on(net.server, *plain, *splitlora(*sets)),
        }
        pong = [sys.executable, str(ROOT / "benchmarks" / "multihost.py"), "pingpong",
                "--sizes", ",".join(map(str, SIZES))]  # fmt: skip
        pongs = {"plain": net.on(net.server, *plain, *pong), "overlay": ov.mpirun(pong)}
        for trial in range(args.trials):
            for mode in MODES:
                jobs[mode].append(run_job(net, commands[mode], Path(tmp) / f"{trial}-{mode}"))
                print(trial, mode, jobs[mode][-1], flush=True)
            for mode, cmd in pongs.items():
                for size, seconds in pingpong(net, cmd).items():  # rank 2 takes part in the bcasts only
                    rtt[mode][size].append(seconds)
                print(trial, mode, {s: rtt[mode][s][-1] for s in SIZES}, flush=True)

    def med(mode: str, key: str) -> float:
        return statistics.median(j[key] for j in jobs[mode])

    per_mode = {m: {k: med(m, k) for k in jobs[m][0]} for m in MODES}
    for m in MODES:
        per_mode[m]["client_link_mbit_s"] = med(m, "client_link_bytes") * 8 / med(m, "train_s") / 1e6
    rtt_med = {m: {s: statistics.median(v) for s, v in by.items()} for m, by in rtt.items()}
    result = {
        "benchmark": "overlay", "machine": machine(),
        "wireguard": "userspace wireguard-go (Debian), in network namespaces on one 2-core machine; no kernel module",
        "trials": args.trials, "job": splitlora(*with_secret), "jobs": jobs, "median": per_mode,
        "ratios_overlay_over_plain": {
            "step_s": per_mode["overlay"]["step_s"] / per_mode["plain"]["step_s"],
            "client_link_bytes": per_mode["overlay"]["client_link_bytes"] / per_mode["plain"]["client_link_bytes"],
            "client_link_mbit_s": per_mode["overlay"]["client_link_mbit_s"] / per_mode["plain"]["client_link_mbit_s"],
            **{f"pingpong_rtt_{s}B": rtt_med["overlay"][s] / rtt_med["plain"][s] for s in SIZES},
        },
        "pingpong_rtt_s": rtt, "pingpong_median_s": rtt_med,
        "pingpong_mbit_s": {m: {s: 2 * s * 8 / t / 1e6 for s, t in by.items()} for m, by in rtt_med.items()},
        "secret": {
            "cpu_s_per_client": secret_cpu_s(),
            "startup_handshake_s": {m: med(m, "startup_handshake_s") for m in ("plain", "plain, no secret")},
            "startup_preflight_s": {m: med(m, "startup_preflight_s") for m in ("plain", "plain, no secret")},
        },
        "links_up_s": up_s, "links_check_s": check_s, "links_check": check.stdout.splitlines(),
    }  # fmt: skip
    write_json(args.out, result)
    print(json.dumps(result["ratios_overlay_over_plain"], indent=1))


if __name__ == "__main__":
    main()
