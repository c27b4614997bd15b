"""Failure timing and checkpoint cost, measured on real mpirun jobs.

    python benchmarks/reliability.py [--ranks 5] [--repeats 3] [--out FILE]

- kill -9 of a client mid-run: seconds from the kill to mpirun's exit;
- a client that stops answering (SIGSTOP) with comm.timeout_s=10: seconds to the exit;
- checkpoints of the default tiny model and of a GPT-2-small-sized one (random init): bytes
  per rank file, and the time of `checkpoint.save_rank` (write + fsync + rename) per file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from common import MPIRUN, machine

from splitlora_mpi.run import checkpoint

GPT2_SMALL = ["--set", "model.config={model_type: gpt2, n_embd: 768, n_layer: 12, n_head: 12, n_positions: 128}"]


def _cmd(ranks: int, out: Path, *extra: str) -> list[str]:
    return [MPIRUN, "-n", str(ranks), sys.executable, "-m", "splitlora_mpi", "--set", f"run.out_dir={out}",
            "--set", "train.eval_every=0", "--set", "train.log_every=1", *extra]  # fmt: skip


def _failure(ranks: int, workdir: Path, sig: signal.Signals, timeout_s: float) -> dict:
    """Start a long run, wait for step 5, send `sig` to the last client; time mpirun's exit."""
    out = workdir / "failure"
    shutil.rmtree(out, ignore_errors=True)
    log = workdir / "stdout.txt"
    with open(log, "w") as stdout:
        proc = subprocess.Popen(_cmd(ranks, out, "--set", "train.steps=100000", "--set", f"comm.timeout_s={timeout_s}"),
                                stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        pids = dict(re.findall(r"(\d+)=(\d+)", log.read_text().split("process ids by rank", 1)[1].splitlines()[0]))
        victim = int(pids[str(ranks - 1)])
        start = time.perf_counter()
        os.kill(victim, sig)
        _, err = proc.communicate(timeout=timeout_s + 120)
        elapsed = time.perf_counter() - start
    if sig == signal.SIGSTOP:
        os.kill(victim, signal.SIGKILL)
    named = re.search(r"no answer from rank\(s\) \[[\d, ]+\]", err)
    return {"exit_code": proc.returncode, "seconds_to_exit": round(elapsed, 3),
            "rank_0_says": named.group(0) if named else None}  # fmt: skip


def _checkpoint_cost(ranks: int, workdir: Path, name: str, extra: list[str], repeats: int) -> dict:
    out = workdir / name
    r = subprocess.run(_cmd(ranks, out, "--set", "train.steps=4", "--set", "checkpoint.every=2", *extra),
                       capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if x.startswith("checkpoint ")][-1]
    newest = max(checkpoint.root(out).glob("step-*"))
    per_rank = {}
    for path in sorted(newest.glob("rank-*.pt"), key=lambda p: int(p.stem.split("-")[1])):
        data = path.read_bytes()
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            checkpoint.save_rank(workdir / "rewrite", i, 0, data)  # the real path: temp + fsync + rename
            times.append(time.perf_counter() - start)
        per_rank[path.stem] = {"bytes": len(data), "write_ms_median": round(median(times) * 1e3, 2)}
    shutil.rmtree(workdir / "rewrite", ignore_errors=True)
    return {"config": name, "ranks": ranks, "job_line": line, "per_rank": per_rank}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/reliability.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        killed = [_failure(args.ranks, work, signal.SIGKILL, 60) for _ in range(args.repeats)]
        print("kill -9 -> exit (s):", [k["seconds_to_exit"] for k in killed], flush=True)
        silent = [_failure(args.ranks, work, signal.SIGSTOP, 10) for _ in range(args.repeats)]
        print("SIGSTOP -> exit (s), timeout 10 s:", [s["seconds_to_exit"] for s in silent], flush=True)
        ckpts = [_checkpoint_cost(args.ranks, work, "tiny", [], 20),
                 _checkpoint_cost(args.ranks, work, "gpt2-small-sized", GPT2_SMALL, 20)]  # fmt: skip
        for c in ckpts:
            print(c["config"], c["per_rank"], flush=True)
    result = {
        "benchmark": "reliability",
        "machine": machine(),
        "killed_client": killed,
        "silent_client_timeout_10s": silent,
        "checkpoints": ckpts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
