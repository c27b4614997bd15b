"""Multi-host MPI on one machine (the hosts: netns.py): link rates vs time to target, bytes on the wire.

    python benchmarks/multihost.py bench [--profiles 200,50,10,2,50/25] [--steps 32]   # time to target per link
    python benchmarks/multihost.py wire         # bytes on each client's veth vs the job's byte counters
    python benchmarks/multihost.py transport    # which netmod settings cross the links; eager threshold
    python benchmarks/multihost.py cleanup      # remove what a harness killed with -9 left behind

The hosts, links and jobs are the harness in netns.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from common import machine
from netns import (
    COUNTERS,
    TRANSPORT_ENV,
    WIRE_SETS,
    Link,
    Network,
    cleanup_stale,
    lock,
    network,
    overhead,
    splitlora,
    unavailable,
    wire_vs_counted,
)

ROOT = Path(__file__).resolve().parents[1]


def pingpong(sizes: Sequence[int], seconds: float = 0.3) -> None:
    """Rank program (under mpirun): ranks 0 and 1 bounce a message of each size for about
    `seconds`, three times; rank 0 prints one JSON line per size with the median round trip."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    peer = 1 - comm.rank

    def bounce(buf: np.ndarray, n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            if comm.rank == 0:
                comm.Send(buf, peer)
                comm.Recv(buf, peer)
            elif comm.rank == 1:
                comm.Recv(buf, peer)
                comm.Send(buf, peer)
        return (time.perf_counter() - start) / n

    for size in sizes:
        buf = np.zeros(size, dtype=np.uint8)
        bounce(buf, 2)  # opens the connection, warms the buffers
        reps = comm.bcast(max(5, min(1000, int(seconds / bounce(buf, 3)))))
        trials = sorted(bounce(buf, reps) for _ in range(3))
        if comm.rank == 0:
            print(json.dumps({"size": size, "rtt_s": trials[1], "reps": reps}), flush=True)


def wire(args: argparse.Namespace) -> None:
    """Framing overhead on the wire: the bytes on each client's link against its rank's
    counters, for a short training job and for a job that only starts MPI (the fixed cost)."""
    with tempfile.TemporaryDirectory() as tmp, network(2) as net:
        job, hosts = wire_vs_counted(net, splitlora(f"run.out_dir={tmp}/run", *WIRE_SETS), timeout=300)
        if job.returncode:
            sys.exit(f"job failed ({job.returncode}):\n{job.stderr[-3000:]}")
        summary = json.loads(Path(tmp, "run", "summary.json").read_text())
        before = {h: net.counters(h) for h in net.client_hosts}
        null = net.run(net.mpirun([sys.executable, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"]), 60)
        fixed = {h: {k: net.counters(h)[k] - before[h][k] for k in COUNTERS} for h in net.client_hosts}
    for h in net.client_hosts:
        hosts[h]["overhead"] = overhead(hosts[h])
        print(h, {k: f"{v:+.2%}" for k, v in hosts[h]["overhead"].items()})
    write_json(args.out_dir / "multihost_wire.json", {
        "benchmark": "multihost_wire", "machine": machine(), "job": splitlora("run.out_dir=RUN", *WIRE_SETS),
        "summary_bytes": summary["bytes"], "hosts": hosts, "mpi_init_only": {"returncode": null.returncode,
                                                                            "wire": fixed},
    })  # fmt: skip


NETMODS: dict[str, dict[str, str]] = {
    "defaults (ch4:ucx)": {},
    "ucx, UCX_TLS=tcp": {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "tcp"},
    "ofi (provider chosen by libfabric)": {"MPIR_CVAR_CH4_NETMOD": "ofi"},
    "ofi, FI_PROVIDER=sockets": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "sockets"},
    "ofi, FI_PROVIDER=tcp": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"},
    "TRANSPORT_ENV (ofi, tcp, NOLOCAL=1, FI_TCP_IFACE=eth0)": TRANSPORT_ENV,
}
THRESHOLDS = (None, 16384, 65536, 262144, 1048576)  # MPIR_CVAR_CH4_OFI_EAGER_THRESHOLD; None = default
SIZES = (64, 16384, 131072, 262144, 1048576, 4194304)  # 131072: an activation message of WIRE_SETS' job


def transport(args: argparse.Namespace) -> None:
    """Which netmod settings put the traffic on the links, and the eager/rendezvous threshold
    against round-trip time (ping-pong between the server host and one client host)."""
    pong = [sys.executable, str(Path(__file__).resolve()), "pingpong"]
    netmods, rtt = {}, {}
    with network(1) as net:
        client = net.client_hosts[0]
        for name, env in NETMODS.items():
            before = net.counters(client)
            job = net.run(net.mpirun([*pong, "--sizes", "4194304", "--seconds", "0.2"], env=env), 120)
            after = net.counters(client)
            reps = [json.loads(line)["reps"] for line in job.stdout.splitlines() if line.startswith("{")]
            payload = 2 * 4194304 * (2 + 3 + 3 * reps[0]) if reps else 0
            wire_bytes = after["tx_bytes"] + after["rx_bytes"] - before["tx_bytes"] - before["rx_bytes"]
            ratio = wire_bytes / payload if payload else None
            netmods[name] = {"env": env, "returncode": job.returncode, "payload_bytes": payload,
                             "wire_bytes": wire_bytes, "wire_per_payload": ratio}  # fmt: skip
            print(name, netmods[name], flush=True)
        for trial in range(3):  # interleaved, so a burst of load elsewhere hits every setting alike
            for threshold in THRESHOLDS:
                extra = {} if threshold is None else {"MPIR_CVAR_CH4_OFI_EAGER_THRESHOLD": str(threshold)}
                cmd = net.mpirun([*pong, "--sizes", ",".join(map(str, SIZES))], env={**TRANSPORT_ENV, **extra})
                job = net.run(cmd, 120)
                for line in job.stdout.splitlines():
                    if line.startswith("{"):
                        r = json.loads(line)
                        rtt.setdefault(str(threshold or "default"), {}).setdefault(r["size"], []).append(r["rtt_s"])
                print(f"trial {trial} threshold {threshold}: exit {job.returncode}", flush=True)
    medians = {t: {size: sorted(v)[len(v) // 2] for size, v in by.items()} for t, by in rtt.items()}
    write_json(args.out_dir / "multihost_transport.json", {
        "benchmark": "multihost_transport", "machine": machine(), "netmods": netmods,
        "eager_threshold_rtt_s": {"median_of_3": medians, "trials": rtt},
    })  # fmt: skip


MODES = ("splitlora", "fedlora", "sl")


def profile(text: str) -> Link:
    """A link profile as written on the command line: RATE (Mbit/s) or RATE/DELAY (ms, each way)."""
    rate, _, delay = text.partition("/")
    return Link(rate_mbit=float(rate), delay_ms=float(delay or 0))


def profile_name(link: Link) -> str:
    return f"{link.rate_mbit:g}mbit" + (f"-{link.delay_ms:g}ms" if link.delay_ms else "")


def bench(args: argparse.Namespace) -> None:
    """splitlora, fedlora and sl on real E2E data with every client link shaped by each
    profile: wall time, time to a target validation loss, bytes per client per round
    (counted and on the wire)."""
    profiles = [profile(p) for p in args.profiles.split(",")]
    keep = args.out_dir / "multihost_runs"  # one directory per profile, replaced when run again
    if not args.reuse:
        with tempfile.TemporaryDirectory() as tmp, network(args.clients) as net:
            from paper_convergence import fast_bpe_tokenizer, test_subset

            tok, val = fast_bpe_tokenizer(Path(tmp)), test_subset(Path(tmp), args.test_every)
            for link in profiles:
                for host in net.client_hosts:
                    net.shape(host, link)
                for mode in MODES:
                    _bench_run(net, args, mode, link, tok, val, Path(tmp) / f"{mode}-{profile_name(link)}", keep)
    _bench_report(args, profiles, keep)


def _bench_run(net: Network, args: argparse.Namespace, mode: str, link: Link, tok: Path, val: Path, out: Path,
               keep: Path) -> None:  # fmt: skip
    # paper_convergence's GPT-2 without dropout: every mode follows the same losses at every link
    from paper_convergence import MODEL_NO_DROPOUT, SHARED

    n = args.clients
    steps, per_eval = (n * args.steps, n * args.eval_every) if mode == "sl" else (args.steps, args.eval_every)
    cmd = splitlora(
        f"run.mode={mode}", f"run.out_dir={out}", f"model.config={MODEL_NO_DROPOUT}", f"model.tokenizer={tok}",
        f"data.train_path={SHARED / 'e2e' / 'valid.txt'}", f"data.val_path={val}", f"data.max_seq_len={args.seq_len}",
        f"train.steps={steps}", f"train.batch_size={args.batch_size}", f"train.warmup_steps={steps // 12}",
        f"train.aggregate_every={args.aggregate_every}", f"train.eval_every={per_eval}", "train.log_every=1",
    )  # fmt: skip
    before = {h: net.counters(h) for h in net.client_hosts}
    load_before = os.getloadavg()[0]
    where = f"{mode} at {profile_name(link)}"
    print(f"{where}: running", flush=True)
    job = net.run(net.mpirun(cmd), timeout=1800)
    if job.returncode:
        sys.exit(f"{where} failed ({job.returncode}):\n{job.stderr[-3000:]}")
    wire_bytes = {h: sum(net.counters(h)[k] - before[h][k] for k in ("tx_bytes", "rx_bytes")) for h in before}
    dest = keep / profile_name(link) / mode
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(out / name, dest / name)
    info = {
        "job_wall_s": job.wall_s,
        "client_link_bytes": wire_bytes,
        "command": " ".join(net.mpirun(cmd)),
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }  # fmt: skip  (the job's 3 ranks alone: ~2-3)
    (dest / "job.json").write_text(json.dumps(info, indent=2) + "\n")
    s = json.loads((out / "summary.json").read_text())
    print(f"{where}: val {s['final_val_loss']:.4f}, {s['wall_s']:.1f} s training, "
          f"{job.wall_s:.1f} s job", flush=True)  # fmt: skip
    shutil.rmtree(out)


def _bench_report(args: argparse.Namespace, profiles: list[Link], keep: Path) -> None:
    from splitlora_mpi.plot import paper_name, time_to_target

    def load(link: Link, mode: str, name: str) -> dict:
        return json.loads((keep / profile_name(link) / mode / name).read_text())

    fastest = profiles[0]
    target = max(load(fastest, m, "summary.json")["final_val_loss"] for m in MODES)
    rows = []
    for link in profiles:
        for mode in MODES:
            s, job = load(link, mode, "summary.json"), load(link, mode, "job.json")
            hit = time_to_target(keep / profile_name(link) / mode, target)
            rounds = max(1, s["steps"] // args.aggregate_every)
            rows.append({
                "mode": mode, "link_mbit": link.rate_mbit, "delay_ms": link.delay_ms,
                "final_val_loss": s["final_val_loss"], "tokens": s["tokens"],
                "train_wall_s": s["wall_s"], "job_wall_s": job["job_wall_s"],
                "time_to_target_s": hit["wall_s"] if hit else None, "rounds": rounds,
                "counted_bytes_per_client_per_round": sum(s["bytes"].values()) / args.clients / rounds,
                "link_bytes_per_client_per_round": sum(job["client_link_bytes"].values()) / args.clients / rounds,
                "bytes": s["bytes"], "command": job["command"],
            })  # fmt: skip
    png = args.out_dir / "multihost.png"
    _bench_plot(rows, target, png, paper_name)
    table = _bench_table(rows, target, paper_name)
    (args.out_dir / "multihost.md").write_text(table)
    print(table)
    rule = f"worst final validation loss among the modes at {profile_name(fastest)}"
    write_json(args.out_dir / "multihost.json", {
        "benchmark": "multihost", "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
        "target_val_loss": target, "target_rule": rule,
        "runs": rows, "figure": png.name,
    })  # fmt: skip


def _bench_table(rows: list[dict], target: float, name: Callable[[str], str]) -> str:
    lines = [f"| scheme | link Mbit/s | delay ms (each way) | final val loss | training s | to val {target:.4f}: s "
             "| job s (with start-up) | kB / client / round (counted) | kB / client / round (on the link) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        tt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "not reached"
        lines.append(f"| {name(r['mode'])} | {r['link_mbit']:g} | {r['delay_ms']:g} | {r['final_val_loss']:.4f} "
                     f"| {r['train_wall_s']:.1f} | {tt} | {r['job_wall_s']:.1f} "
                     f"| {r['counted_bytes_per_client_per_round'] / 1e3:.1f} "
                     f"| {r['link_bytes_per_client_per_round'] / 1e3:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _bench_plot(rows: list[dict], target: float, png: Path, name: Callable[[str], str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, mode in enumerate(MODES):
        for j, delay in enumerate(sorted({r["delay_ms"] for r in rows})):
            same = [r for r in rows if (r["mode"], r["delay_ms"]) == (mode, delay) and r["time_to_target_s"]]
            pts = sorted((r["link_mbit"], r["time_to_target_s"]) for r in same)
            label = name(mode) + (f", +{delay:g} ms each way" if delay else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^"[j % 3], ls=("-", "--", ":")[j % 3],
                    color=f"C{i}", label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("client link rate, Mbit/s (tc tbf, each direction)")
    ax.set_ylabel(f"time to validation loss {target:.4f}, s")
    ax.set_title("Time to target over shaped client links (2 clients, TCP)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cleanup", help="remove namespaces/links left by a killed harness")
    sub.add_parser("wire", help="bytes on each client's link vs its rank's byte counters")
    sub.add_parser("transport", help="netmod settings and eager threshold over TCP")
    b = sub.add_parser("bench", help="splitlora / fedlora / sl per link rate: time to target, bytes")
    b.add_argument("--clients", type=int, default=2)
    b.add_argument(
        "--profiles",
        default="200,50,10,2,50/25,10/25",
        help="client links, fastest first: RATE in Mbit/s, or RATE/DELAY with DELAY in ms each way",
    )
    b.add_argument("--steps", type=int, default=32, help="splitlora / fedlora steps (sl: clients x)")
    b.add_argument("--batch-size", type=int, default=4)
    b.add_argument("--seq-len", type=int, default=64)
    b.add_argument("--aggregate-every", type=int, default=8)
    b.add_argument("--eval-every", type=int, default=8)
    b.add_argument("--test-every", type=int, default=100, help="evaluate on every k-th line of test.txt")
    b.add_argument("--reuse", action="store_true", help="no training: re-analyse the kept runs")
    pp = sub.add_parser("pingpong", help="rank program of `transport` (run under mpirun)")
    pp.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], required=True)
    pp.add_argument("--seconds", type=float, default=0.3, help="per size and trial")
    args = p.parse_args()
    if args.cmd == "pingpong":
        return pingpong(args.sizes, args.seconds)
    if args.cmd == "cleanup":
        with lock():
            return print("removed:", cleanup_stale() or "nothing")
    if reason := unavailable():
        sys.exit(f"multihost: {reason}")
    {"wire": wire, "transport": transport, "bench": bench}[args.cmd](args)


if __name__ == "__main__":
    main()
