"""Chaos benchmark of elastic runs: `python benchmarks/chaos.py [--runs 20] [--seed 0]`.

Each run is a seeded draw: a mode (splitlora / fedlora / sl), 1-3 faults (kill -9 or SIGSTOP of a
distinct client, never all of them) at random steps, and in half the splitlora and fedlora runs a
client joining at a random step (`--join`, each client on its own file), launched with `python -m
splitlora_mpi.elastic`. Per run: finished or not, seconds from the last fault to the end, the
outputs complete (the adapter loads with PeftModel.from_pretrained; the newest checkpoint's
files match their manifest), the joiner's fate, and hangs (the launcher not done within its
bound: must be 0). Writes benchmarks/results/chaos.json. A cut link needs hosts of their own:
tests/test_multihost.py cuts one between network namespaces.

`ElasticJob` is the harness tests/test_elastic.py uses too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

TIMEOUT_S = 3  # elastic.client_timeout_s of these runs
JOB = ["--set", "train.steps=40", "--set", "train.log_every=1", "--set", "train.aggregate_every=4",
       "--set", "train.eval_every=20", "--set", f"elastic.client_timeout_s={TIMEOUT_S}"]  # fmt: skip
HANG_S = 240  # a run not done by then is a hang
FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


class ElasticJob:
    """`python -m splitlora_mpi.elastic -n RANKS` in the background, watched through its outputs."""

    def __init__(self, out: Path, ranks: int, *sets: str, grace_s: float = 30):
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        args = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "splitlora_mpi.elastic", "-n", str(ranks), "--grace", str(grace_s),
               *JOB, "--set", f"run.out_dir={out}", *args]  # fmt: skip
        self.logfile = open(self.log, "w")
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, text=True, env=env)
        self.stopped: list[int] = []
        self.outlived: list[int] = []  # stopped clients still running once the job ended

    def pid_of(self, rank: int, timeout_s: float = 120) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(rf"process ids by rank .*\b{rank}=(\d+)", self.log.read_text())
            if found:
                return int(found.group(1))
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no pid of rank {rank} within {timeout_s} s:\n{self.log.read_text()}")

    def wait_for_step(self, step: int, timeout_s: float = 120) -> bool:
        """Whether metrics.jsonl reached `step` rows (False: the job ended first)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.out / "metrics.jsonl"
            if rows.is_file() and len(rows.read_text().splitlines()) >= step:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached within {timeout_s} s:\n{self.log.read_text()}")

    def fault(self, rank: int, step: int, sig: int) -> float | None:
        """Send `sig` to `rank` once the job logged `step`; the time it was sent (None: too late)."""
        pid = self.pid_of(rank)
        if not self.wait_for_step(step):
            return None
        os.kill(pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.append(pid)
        return time.monotonic()

    def join(self, step: int, *sets: str) -> subprocess.Popen | None:
        """Once the job logged `step`: a client process joining it (`--join`, a singleton)."""
        if not self.wait_for_step(step):
            return None
        args = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "splitlora_mpi", "--join", *JOB, "--set", f"run.out_dir={self.out}", *args]
        log = open(self.out.parent / f"{self.out.name}.joiner.log", "w")
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def finish(self, timeout_s: float = 180) -> tuple[int | None, str]:
        """(exit code, None on a hang; the log). Frozen clients are killed afterwards."""
        try:
            code: int | None = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if self.proc.poll() is None:  # a hang: every rank goes, not only the launcher
                found = re.search(r"process ids by rank (.*?) \(", self.log.read_text())
                self.stopped += [int(p.split("=")[1]) for p in found.group(1).split()] if found else []
                self.proc.kill()
            else:  # (mpiexec waits for a stopped rank forever: the launcher ends it, its proxy kills it)
                self.outlived = still_running(self.stopped, within_s=10)
            for pid in self.stopped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.logfile.close()
        return code, self.log.read_text()


def process_runs(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (a killed child its new parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def still_running(pids: list[int], within_s: float) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := [p for p in pids if process_runs(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def outputs_complete(out: Path) -> bool:
    """The adapter loads with PEFT on its base; the newest checkpoint (if any) matches its manifest."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
    except (OSError, ValueError):
        return False
    from splitlora_mpi.config import load_config
    from splitlora_mpi.run import checkpoint

    if not (out / "checkpoints").exists():
        return True
    cfg = load_config(out / "config.yaml")
    world_size = json.loads((out / "summary.json").read_text())["world_size"]  # (a joiner after it: one more)
    found, _ = checkpoint.newest_complete(out, world_size, cfg.fingerprint(), resizable=True)
    return found is not None


def client_files(work: Path, clients: int, mode: str) -> list[str]:
    """Each client's own training and validation file (slices of the packaged sample): the sets
    (fedlora: one shared validation file, which its rank 0 evaluates the average on)."""
    from splitlora_mpi.data import packaged_data_paths

    train, val = (p.read_text().splitlines() for p in packaged_data_paths())
    data = work / "data"
    data.mkdir(exist_ok=True)
    for c in range(1, clients + 1):
        (data / f"train-{c}.txt").write_text("\n".join(train[(c - 1) * 200 : c * 200]) + "\n")
        (data / f"val-{c}.txt").write_text("\n".join(val[(c - 1) * 20 : c * 20]) + "\n")
    (data / "val.txt").write_text("\n".join(val[: clients * 20]) + "\n")
    val_path = f"{data}/val.txt" if mode == "fedlora" else f"{data}/val-{{client}}.txt"
    return [f"data.train_path={data}/train-{{client}}.txt", f"data.val_path={val_path}"]


def one_run(seed: int, work: Path, ranks: int = 5) -> dict:
    rng = random.Random(seed)
    mode = rng.choice(["splitlora", "fedlora", "sl"])
    victims = rng.sample(range(1, ranks), rng.randint(1, min(3, ranks - 2)))
    plan = sorted((rng.randint(3, 30), v, rng.choice(sorted(FAULTS))) for v in victims)
    if mode in ("splitlora", "fedlora") and rng.random() < 0.5:
        plan = sorted([*plan, (rng.randint(3, 30), ranks, "join")])
    out = work / f"run-{seed}"
    sets = [f"run.mode={mode}", "checkpoint.every=8", f"run.seed={seed}", "comm.timeout_s=60",
            *client_files(work, ranks, mode)]  # fmt: skip
    if any(kind == "join" for *_, kind in plan):  # (a joiner imports torch for ~7 s before it connects)
        sets.append("train.steps=100")
    start = time.monotonic()
    job = ElasticJob(out, ranks, *sets, grace_s=5)
    last, joiner = None, None
    try:
        for step, rank, kind in plan:
            if kind == "join":
                joiner = job.join(step, *sets) or joiner
                last = time.monotonic() if joiner else last
            else:
                last = job.fault(rank, step, FAULTS[kind]) or last
    except AssertionError as e:  # the job stalled before a planned fault: finish() tells a hang
        print(f"seed {seed}: {str(e).splitlines()[0]}", flush=True)
    code, log = job.finish(HANG_S)
    end = time.monotonic()
    joined = None
    if joiner is not None:
        try:
            joined = joiner.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            joiner.kill()
            joined = "hang"
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return {
        "seed": seed,
        "mode": mode,
        "faults": [{"step": s, "rank": r, "kind": k} for s, r, k in plan],
        "exit_code": code,
        "hang": code is None or joined == "hang",
        "finished": code == 0 and summary.get("status") == "complete",
        "clients_lost": summary.get("clients_lost"),
        "clients_joined": summary.get("clients_joined"),
        "joiner_exit_code": joined,
        "s_after_last_fault": round(end - last, 1) if last else None,
        "wall_s": round(end - start, 1),
        "outputs_complete": code == 0 and outputs_complete(out),
        "frozen_outlived_job": job.outlived,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chaos.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        for seed in range(args.seed, args.seed + args.runs):
            rows.append(one_run(seed, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    after = [r["s_after_last_fault"] for r in rows if r["s_after_last_fault"] is not None]
    result = {
        "machine": machine(),
        "client_timeout_s": TIMEOUT_S,
        "runs": rows,
        "finished": sum(r["finished"] for r in rows),
        "hangs": sum(r["hang"] for r in rows),
        "outputs_complete": sum(r["outputs_complete"] for r in rows),
        "frozen_outlived_job": sum(bool(r["frozen_outlived_job"]) for r in rows),
        "max_s_after_last_fault": max(after, default=None),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
