"""Systems benchmarks: split overhead, protocol vs raw MPI throughput, scaling, overlap, memory.

    python benchmarks/systems.py [--only overhead throughput scaling overlap memory] [--out-dir benchmarks/results]

- overhead: 1 client + server (mpirun -n 2) vs central, one thread per rank, same work;
  throughput ratio split / central (target >= 0.95). Runs interleaved, 2 repeats.
- throughput: ping-pong of activation-sized float32 tensors through protocol.Transport vs
  raw mpi4py Send/Recv of the same bytes (target >= 0.9).
- scaling: splitlora with 1, 2, 4, 8 clients and sl with 8 clients, the same rows in all;
  training time and speed-up over sl (target: 8-client splitlora >= 3x sl).
- overlap: the scaling setup with 4 and 8 clients and comm.micro_batches 1, 2, 4.
- memory: GPT-2-small-sized random-init model (768 x 12, BPE vocabulary): peak RSS of a
  splitlora client (1 block) vs central (target <= 0.55).
Writes systems.json (sections not run are kept from the previous file) and systems.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

from common import MPIRUN, machine

ROOT = Path(__file__).resolve().parents[1]
WIDE = "{model_type: gpt2, n_embd: 256, n_layer: 4, n_head: 4, n_positions: 128}"
GPT2_SMALL = "{model_type: gpt2, n_embd: 768, n_layer: 12, n_head: 12, n_positions: 128}"


def run_job(mode: str, clients: int, work: Path, sets: dict, env: dict | None = None) -> dict:
    """One job (central without mpirun); returns its summary.json."""
    out = work / f"{mode}-{clients}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "splitlora_mpi", "--set", f"run.mode={mode}", "--set", f"run.out_dir={out}"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    if mode != "central":
        cmd = [MPIRUN, "-n", str(clients + 1), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env={**os.environ, **(env or {})})
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    return summary


def overhead(work: Path) -> dict:
    sets = {"model.config": WIDE, "data.max_seq_len": 128, "train.steps": 40, "train.batch_size": 8,
            "train.eval_every": 0, "train.log_every": 40}  # fmt: skip
    one_thread = {"OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(2):
        for mode in ("splitlora", "central"):
            s = run_job(mode, 1, work, sets, one_thread)
            runs.append({"mode": mode, "tokens_per_s": s["tokens_per_s"], "wall_s": s["wall_s"]})
            print(f"overhead: {mode} {s['tokens_per_s']:,.0f} tok/s", flush=True)
    split = mean(r["tokens_per_s"] for r in runs if r["mode"] == "splitlora")
    central = mean(r["tokens_per_s"] for r in runs if r["mode"] == "central")
    return {"sets": sets, "env": one_thread, "runs": runs, "ratio": split / central, "target": ">= 0.95",
            "pass": split / central >= 0.95}  # fmt: skip


def throughput(work: Path) -> dict:
    results = {}
    for label, shape in {"H=64 (4x128x64)": (4, 128, 64), "H=768 (4x128x768)": (4, 128, 768)}.items():
        cmd = [MPIRUN, "-n", "2", sys.executable, __file__, "_pingpong", *map(str, shape)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["ratio"] = res["protocol_msgs_per_s"] / res["raw_msgs_per_s"]
        results[label] = res
        print(f"throughput {label}: ratio {res['ratio']:.3f}", flush=True)
    worst = min(r["ratio"] for r in results.values())
    return {"sizes": results, "worst_ratio": worst, "target": ">= 0.9", "pass": worst >= 0.9}


def pingpong(shape: list[int], rounds: int = 300) -> None:
    """Worker under mpirun -n 2: rank 1 sends a tensor, rank 0 answers with one of the same size."""
    import numpy as np
    import torch
    from mpi4py import MPI

    from splitlora_mpi.metrics import Metrics
    from splitlora_mpi.wire import TRAIN
    from splitlora_mpi.wire.mpi import MpiTransport as Transport

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    t = Transport(60.0, Metrics(rank))
    x = torch.randn(*shape)
    peer = 1 - rank

    def protocol_round(i: int) -> None:
        if rank == 1:
            t.send_tensors(TRAIN, i, {0: [(x, "activations")]})
            t.recv_tensors([0], TRAIN, ["gradients"])
        else:
            t.recv_tensors([1], TRAIN, ["activations"])
            t.send_tensors(TRAIN, i, {1: [(x, "gradients")]})

    buf, got = x.numpy().copy(), np.empty_like(x.numpy())

    def raw_round(i: int) -> None:
        if rank == 1:
            comm.Send(buf, dest=peer, tag=7)
            comm.Recv(got, source=peer, tag=7)
        else:
            comm.Recv(got, source=peer, tag=7)
            comm.Send(buf, dest=peer, tag=7)

    timings = {}
    for name, fn in (
        ("raw", raw_round),
        ("protocol", protocol_round),
        ("raw2", raw_round),
        ("protocol2", protocol_round),
    ):
        for i in range(20):  # warm-up
            fn(i)
        comm.Barrier()
        start = time.perf_counter()
        for i in range(rounds):
            fn(i)
        timings[name] = time.perf_counter() - start
    if rank == 0:
        msgs = 2 * rounds  # one message each way per round
        raw = msgs / min(timings["raw"], timings["raw2"])
        proto = msgs / min(timings["protocol"], timings["protocol2"])
        mb = x.numel() * 4 / 1e6
        print(json.dumps({"shape": shape, "bytes_per_message": x.numel() * 4, "rounds": rounds,
                          "raw_msgs_per_s": raw, "protocol_msgs_per_s": proto,
                          "raw_mb_per_s": raw * mb, "protocol_mb_per_s": proto * mb}))  # fmt: skip


def scaling(work: Path) -> dict:
    rows = 8 * 4 * 40  # 8 clients x 4 rows x 40 steps
    base = {"train.batch_size": 4, "train.eval_every": 0, "train.warmup_steps": 0, "train.aggregate_every": 10}
    runs = {}
    for mode, n in (("sl", 8), ("splitlora", 1), ("splitlora", 2), ("splitlora", 4), ("splitlora", 8)):
        steps = rows // 4 if mode == "sl" else rows // (4 * n)
        s = run_job(mode, n, work, {**base, "train.steps": steps, "train.log_every": steps})
        runs[f"{mode}-{n}"] = {"mode": mode, "clients": n, "steps": steps, "tokens": s["tokens"], "wall_s": s["wall_s"],
                               "tokens_per_s": s["tokens_per_s"]}  # fmt: skip
        print(f"scaling: {mode} {n} clients {s['wall_s']:.1f} s", flush=True)
    sl = runs["sl-8"]["wall_s"]
    for r in runs.values():
        r["speedup_vs_sl"] = sl / r["wall_s"]
    best = runs["splitlora-8"]["speedup_vs_sl"]
    return {"rows": rows, "runs": runs, "speedup_8_clients": best, "target": ">= 3", "pass": best >= 3}


def overlap(work: Path) -> dict:
    """Micro-batches (comm.micro_batches) on the scaling setup: 4 and 8 clients, same rows."""
    rows = 8 * 4 * 40
    base = {"train.batch_size": 4, "train.eval_every": 0, "train.warmup_steps": 0, "train.aggregate_every": 10}
    runs = {}
    for n in (4, 8):
        steps = rows // (4 * n)
        for m in (1, 2, 4):
            s = run_job("splitlora", n, work, {**base, "train.steps": steps, "train.log_every": steps,
                                               "comm.micro_batches": m})  # fmt: skip
            runs[f"{n} clients, {m} micro-batches"] = {"clients": n, "micro_batches": m, "wall_s": s["wall_s"],
                                                       "tokens_per_s": s["tokens_per_s"]}  # fmt: skip
            print(f"overlap: {n} clients {m} micro-batches {s['wall_s']:.1f} s", flush=True)
    for r in runs.values():
        r["speedup_vs_1"] = runs[f"{r['clients']} clients, 1 micro-batches"]["wall_s"] / r["wall_s"]
    return {"rows": rows, "runs": runs}


def memory(work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from paper_convergence import bpe_tokenizer

    tok = bpe_tokenizer(work)
    sets = {"model.config": GPT2_SMALL, "model.tokenizer": tok, "data.max_seq_len": 128, "train.steps": 3,
            "train.batch_size": 2, "train.eval_every": 0, "train.log_every": 3}  # fmt: skip
    central = run_job("central", 1, work, sets)["peak_rss_mb"]["server"]
    split = run_job("splitlora", 1, work, {**sets, "split.client_layers": 1})["peak_rss_mb"]
    ratio = split["client_max"] / central
    print(f"memory: client {split['client_max']:.0f} MB, central {central:.0f} MB", flush=True)
    return {"sets": {k: str(v) for k, v in sets.items()}, "central_peak_rss_mb": central,
            "client_peak_rss_mb": split["client_max"], "server_peak_rss_mb": split["server"], "ratio": ratio,
            "target": "<= 0.55", "pass": ratio <= 0.55}  # fmt: skip


def markdown(result: dict) -> str:
    rows = []
    if "overhead" in result:
        r = result["overhead"]
        rows.append(("split overhead: tokens/s, 1 client + server / central", f"{r['ratio']:.3f}", "≥ 0.95", r["pass"]))
    if "throughput" in result:
        for label, r in result["throughput"]["sizes"].items():
            mbs = f"{r['protocol_mb_per_s']:,.0f} vs {r['raw_mb_per_s']:,.0f} MB/s"
            rows.append((f"protocol / raw mpi4py messages/s, {label}", f"{r['ratio']:.3f} ({mbs})", "≥ 0.9",
                         r["ratio"] >= 0.9))  # fmt: skip
    if "scaling" in result:
        sc = result["scaling"]
        for name, r in sc["runs"].items():
            last = name == "splitlora-8"
            rows.append((f"scaling {name}: {r['wall_s']:.1f} s; speed-up vs sl-8", f"{r['speedup_vs_sl']:.2f}",
                         "≥ 3" if last else "", sc["pass"] if last else ""))  # fmt: skip
    if "overlap" in result:
        for name, r in result["overlap"]["runs"].items():
            if r["micro_batches"] > 1:
                rows.append((f"overlap {name}: {r['wall_s']:.1f} s; speed-up vs 1", f"{r['speedup_vs_1']:.2f}", "", ""))
    if "memory" in result:
        r = result["memory"]
        mb = f"{r['client_peak_rss_mb']:.0f} / {r['central_peak_rss_mb']:.0f} MB"
        rows.append((f"peak RSS client / central, GPT-2-small-sized ({mb})", f"{r['ratio']:.3f}", "≤ 0.55", r["pass"]))
    lines = ["| benchmark | measured | target | pass |", "|---|---|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_pingpong":
        return pingpong([int(x) for x in sys.argv[2:]])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=["overhead", "throughput", "scaling", "overlap", "memory"])
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    benches = {"overhead": overhead, "throughput": throughput, "scaling": scaling, "overlap": overlap, "memory": memory}
    previous = args.out_dir / "systems.json"  # --only updates those sections, keeps the others
    result: dict = json.loads(previous.read_text()) if previous.exists() else {}
    result.update({
        "benchmark": "systems",
        "machine": machine(),
    })  # fmt: skip
    result.setdefault("commands", {})[" ".join(args.only)] = " ".join(sys.argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result[name] = benches[name](Path(tmp))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "systems.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "systems.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
