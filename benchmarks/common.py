"""What the benchmark scripts share: the mpirun beside this Python, and the facts of the machine
that every results JSON records (times are only comparable within one machine and run)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
# the frozen base's precisions the precision benchmarks compare: name -> the job's --set options
PRECISIONS = {
    "float32": [],
    "bfloat16": ["model.dtype=bfloat16"],
    "int8": ["model.quantize=int8"],
    "nf4": ["model.quantize=nf4"],
}


def machine() -> dict[str, object]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def equal_tokens(mode: str, clients: int, steps: int, batch: int, eval_every: int) -> tuple[int, int, int]:
    """(steps, rows per step, steps between evaluations) of `mode` for the tokens of `steps` steps
    of `batch` rows on each of `clients` clients: sl takes one client per step (N times the steps),
    central one batch of all clients' rows."""
    if mode == "sl":
        return clients * steps, batch, clients * eval_every
    if mode == "central":
        return steps, clients * batch, eval_every
    return steps, batch, eval_every


def launch(mode: str, clients: int, sets: dict[str, object]) -> list[str]:
    """The command of one run: `--set key=value` for each entry; under mpirun unless central."""
    cmd = [sys.executable, "-m", "splitlora_mpi"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd if mode == "central" else [MPIRUN, "-n", str(clients + 1), *cmd]


def run_and_keep(cmd: list[str], out: Path, keep: Path, timeout_s: float) -> dict:
    """Run one training job (exit on failure) and keep what figures and tables need (config,
    metrics, summary; not the models) in `keep`; returns its summary."""
    print(f"{keep.name}: running", flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if r.returncode:
        sys.exit(f"{keep.name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    keep.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(out / name, keep / name)
    s = json.loads((keep / "summary.json").read_text())
    print(f"{keep.name}: val {s['final_val_loss']:.4f} in {s['wall_s']:.1f} s, {s['tokens']} tokens", flush=True)
    return s
