"""Cost of Prometheus metrics on the training step: the same job with metrics on and off.

    python benchmarks/metrics_overhead.py [--ranks 9] [--steps 60] [--repeats 2] [--out FILE]

Runs are interleaved (off, on, off, on, ...) so drifting machine load hits both alike.
Writes JSON with every run's training wall time and the on/off ratio of the mean step time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from common import machine


def free_base_port(n: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return min(s.getsockname()[1], 65535 - n)


def run(ranks: int, steps: int, metrics: bool, workdir: Path) -> dict:
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"
    out = workdir / f"run-{'on' if metrics else 'off'}"
    cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "splitlora_mpi", "--set", f"train.steps={steps}",
           "--set", "train.eval_every=0", "--set", f"run.out_dir={out}"]  # fmt: skip
    if metrics:
        cmd += ["--set", "metrics.enabled=true", "--set", f"metrics.port={free_base_port(ranks)}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    summary = json.loads((out / "summary.json").read_text())
    shutil.rmtree(out)
    return {"metrics": metrics, "wall_s": summary["wall_s"], "step_s": summary["wall_s"] / steps,
            "tokens_per_s": summary["tokens_per_s"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=9)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/metrics_overhead.json"))
    args = p.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for metrics in (False, True):
                runs.append(run(args.ranks, args.steps, metrics, Path(tmp)))
                print(f"repeat {i + 1}: metrics {'on ' if metrics else 'off'} {runs[-1]['step_s'] * 1e3:.1f} ms/step",
                      flush=True)  # fmt: skip
    on = mean(r["step_s"] for r in runs if r["metrics"])
    off = mean(r["step_s"] for r in runs if not r["metrics"])
    result = {
        "benchmark": "metrics_overhead",
        "ranks": args.ranks,
        "steps": args.steps,
        "repeats": args.repeats,
        "machine": machine(),
        "runs": runs,
        "step_s_off": off,
        "step_s_on": on,
        "ratio_on_off": on / off,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"step time with metrics / without: {on / off:.3f}  ({args.out})")


if __name__ == "__main__":
    main()
