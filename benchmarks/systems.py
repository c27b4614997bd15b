"""Systems benchmarks: split overhead, protocol vs raw MPI throughput, scaling, overlap, memory.

    python benchmarks/systems.py [--only overhead throughput scaling overlap memory] [--out-dir benchmarks/results]

- overhead: 1 client + server (mpirun -n 2) vs central, one thread per rank, same work;
  tokens/s split / central (target >= 0.98). Alternating runs, best of 3 each.
- throughput: cut activations of the default tiny model (131 kB), GPT-2 small (1.5 MB) and a
  2048-wide Llama (4.2 MB) through the MPI Transport vs raw blocking mpi4py Send/Recv of the
  same bytes: one-way MB/s and round-trip latency, best of 5 alternating (target >= 0.9).
- startup, fast_failure: benchmarks/startup.py (per-rank start-up of the default 9-rank run;
  every bad-input case of the failures table under mpirun -n 3, target <= 3 s).
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
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import MPIRUN, machine
from startup import fast_failure, startup

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


def overhead(work: Path, repeats: int = 3) -> dict:
    """1 client + server vs central, alternating, best of `repeats` each (the machine's noise
    only ever slows a run down)."""
    sets = {"model.config": WIDE, "data.max_seq_len": 128, "train.steps": 40, "train.batch_size": 8,
            "train.eval_every": 0, "train.log_every": 40}  # fmt: skip
    one_thread = {"OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(repeats):
        for mode in ("splitlora", "central"):
            s = run_job(mode, 1, work, sets, one_thread)
            runs.append({"mode": mode, "tokens_per_s": s["tokens_per_s"], "wall_s": s["wall_s"]})
            print(f"overhead: {mode} {s['tokens_per_s']:,.0f} tok/s", flush=True)
    split = max(r["tokens_per_s"] for r in runs if r["mode"] == "splitlora")
    central = max(r["tokens_per_s"] for r in runs if r["mode"] == "central")
    return {"sets": sets, "env": one_thread, "runs": runs, "best_of": repeats, "ratio": split / central,
            "target": ">= 0.98", "pass": split / central >= 0.98}  # fmt: skip


# the cut activations of one 4 x 128-token batch in float32
WIRE_SIZES = {"default tiny model, H=64": (4, 128, 64), "GPT-2 small, H=768": (4, 128, 768),
              "Llama 2048-wide cut, H=2048": (4, 128, 2048)}  # fmt: skip
WIRE_GATED = ("default tiny model, H=64", "GPT-2 small, H=768")  # the sizes with a target (>= 0.9)


def throughput(work: Path, repeats: int = 5) -> dict:
    """The Transport vs raw blocking mpi4py Send/Recv of the same bytes (mpirun -n 2)."""
    results = {}
    for label, shape in WIRE_SIZES.items():
        cmd = [MPIRUN, "-n", "2", sys.executable, __file__, "_wire", str(repeats), *map(str, shape)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        results[label] = res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"wire {label}: one-way {res['one_way_ratio']:.3f}, round trip {res['round_trip_ratio']:.3f}", flush=True)
    gated = [results[label] for label in WIRE_GATED]
    worst = min(min(r["one_way_ratio"], r["round_trip_ratio"]) for r in gated)
    return {"sizes": results, "best_of": repeats, "worst_ratio_131kb_1.5mb": worst, "target": ">= 0.9",
            "pass": worst >= 0.9}  # fmt: skip


def timed(comm: Any, fn: Callable[[int], None], messages: int) -> float:
    """Seconds for fn(0), ..., fn(messages - 1) between two barriers, after 20 warm-up calls
    (the one-way sender is done when the receiver is)."""
    for i in range(20):
        fn(i)
    comm.Barrier()
    start = time.perf_counter()
    for i in range(messages):
        fn(i)
    comm.Barrier()
    return time.perf_counter() - start


def raw_round_trip(comm: Any, buf: Any, got: Any) -> Callable[[int], None]:
    """Under mpirun -n 2: rank 1 sends `buf` with blocking mpi4py calls, rank 0 answers with as many bytes."""
    rank = comm.Get_rank()

    def one(i: int) -> None:
        if rank == 1:
            comm.Send(buf, dest=0, tag=7)
            comm.Recv(got, source=0, tag=7)
        else:
            comm.Recv(got, source=1, tag=7)
            comm.Send(buf, dest=1, tag=7)

    return one


def transport_round_trip(t: Any, x: Any) -> Callable[[int], None]:
    """Under mpirun -n 2: rank 1 sends `x` over the Transport, rank 0 answers with as many bytes."""
    from splitlora_mpi.wire import TRAIN

    def one(i: int) -> None:
        if t.rank == 1:
            t.send_tensors(TRAIN, i, {0: [(x, "activations")]})
            t.recv_tensors([0], TRAIN, ["gradients"])
        else:
            t.recv_tensors([1], TRAIN, ["activations"])
            t.send_tensors(TRAIN, i, {1: [(x, "gradients")]})

    return one


def wire(repeats: int, shape: list[int], messages: int = 400) -> None:
    """Worker under mpirun -n 2. One way: rank 1 sends `messages` tensors, rank 0 receives them
    and acknowledges the last. Round trip: rank 1 sends, rank 0 answers with as many bytes.
    Raw and protocol alternate `repeats` times; each keeps its best."""
    import numpy as np
    import torch
    from mpi4py import MPI

    from splitlora_mpi.metrics import Metrics
    from splitlora_mpi.wire import TRAIN
    from splitlora_mpi.wire.mpi import MpiTransport

    comm = MPI.COMM_WORLD
    rank, peer = comm.Get_rank(), 1 - comm.Get_rank()
    t = MpiTransport(60.0, Metrics(rank))
    x = torch.randn(*shape)
    buf, got = x.numpy(), np.empty_like(x.numpy())  # (the same memory: torch's is slower to send from)

    def raw_one_way(i: int) -> None:
        if rank == 1:
            comm.Send(buf, dest=peer, tag=7)
        else:
            comm.Recv(got, source=peer, tag=7)

    def protocol_one_way(i: int) -> None:
        if rank == 1:
            t.send_tensors(TRAIN, i, {0: [(x, "activations")]})
        else:
            t.recv_tensors([1], TRAIN, ["activations"])

    best: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in (("raw_one_way", raw_one_way), ("protocol_one_way", protocol_one_way),
                         ("raw_round_trip", raw_round_trip(comm, buf, got)),
                         ("protocol_round_trip", transport_round_trip(t, x))):  # fmt: skip
            best[name] = min(best.get(name, math.inf), timed(comm, fn, messages))
    if rank == 0:
        mb = x.numel() * 4 / 1e6
        out: dict[str, Any] = {"shape": shape, "bytes_per_message": x.numel() * 4, "messages": messages}
        for way in ("one_way", "round_trip"):
            for impl in ("raw", "protocol"):
                s = best[f"{impl}_{way}"]
                if way == "one_way":
                    out[f"{impl}_{way}_mb_per_s"] = messages * mb / s
                else:
                    out[f"{impl}_{way}_us"] = s / messages * 1e6
            out[f"{way}_ratio"] = best[f"raw_{way}"] / best[f"protocol_{way}"]
        out["receive_buffers_allocated"] = t.pool.allocations
        print(json.dumps(out))


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
        rows.append((f"split overhead: tokens/s, 1 client + server / central (best of {r['best_of']}, 1 thread/rank)",
                     f"{r['ratio']:.3f}", "≥ 0.98", r["pass"]))  # fmt: skip
    if "throughput" in result:
        for label, r in result["throughput"]["sizes"].items():
            gate, kb = label in WIRE_GATED, r["bytes_per_message"] / 1e3
            mbs = f"{r['protocol_one_way_mb_per_s']:,.0f} vs {r['raw_one_way_mb_per_s']:,.0f} MB/s"
            rows.append((f"wire / raw mpi4py, one way, {label} ({kb:,.0f} kB)", f"{r['one_way_ratio']:.3f} ({mbs})",
                         "≥ 0.9" if gate else "", r["one_way_ratio"] >= 0.9 if gate else ""))  # fmt: skip
            us = f"{r['protocol_round_trip_us']:,.0f} vs {r['raw_round_trip_us']:,.0f} µs"
            rows.append((f"wire / raw mpi4py, round trip, {label}", f"{r['round_trip_ratio']:.3f} ({us})",
                         "≥ 0.9" if gate else "", r["round_trip_ratio"] >= 0.9 if gate else ""))  # fmt: skip
    if "startup" in result:
        r = result["startup"]["over_ranks"]
        phases = ", ".join(f"{p} {v['median']:.2f}" for p, v in r.items() if p != "total")
        rows.append((f"start-up of the default 9-rank run, median s over ranks ({phases})",
                     f"{r['total']['median']:.1f} s", "", ""))  # fmt: skip
    if "fast_failure" in result:
        r = result["fast_failure"]
        rows.append((f"bad input under mpirun -n 3: slowest of {len(r['cases']) - 1} start-up cases, exit 2",
                     f"{r['max_s']:.2f} s", "≤ 3 s", r["all_within_target"]))  # fmt: skip
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
    if len(sys.argv) > 1 and sys.argv[1] == "_wire":
        return wire(int(sys.argv[2]), [int(x) for x in sys.argv[3:]])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", default=["overhead", "throughput", "startup", "fast_failure", "scaling",
                                                 "overlap", "memory"])  # fmt: skip
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    benches = {"overhead": overhead, "throughput": throughput, "startup": startup, "fast_failure": fast_failure,
               "scaling": scaling, "overlap": overlap, "memory": memory}  # fmt: skip
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
