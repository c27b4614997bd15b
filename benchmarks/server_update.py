"""Time per step of the server schedules at 4 clients: joint (one server step on every
client's batch) vs sequential (one server step per client, each gradient sent at once) vs
sequential with the gradients held to the end of the round (what sending at once gains).

    python benchmarks/server_update.py [--clients 4] [--steps 30] [--repeats 2]

Same model, data and steps in all; alternating runs, best of `repeats` each. Writes
benchmarks/results/server_update.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MPIRUN, machine

ROOT = Path(__file__).resolve().parents[1]
WIDE = "{model_type: gpt2, n_embd: 256, n_layer: 4, n_head: 4, n_positions: 128}"
SCHEDULES = {
    "joint": [],
    "sequential": ["split.server_update=sequential"],
    "sequential, gradients held to the round's end": ["split.server_update=sequential"],
}


def held() -> None:
    """Worker: the CLI with the sequential server's replies sent only when it awaits them (after
    its last client), not as each client's gradient is ready."""
    from splitlora_mpi import cli
    from splitlora_mpi.roles.server import Server

    send = Server.reply

    def reply_later(self, step, grads, flag, wait=True):  # noqa: ANN001, ANN202 - Server.reply's signature
        return send(self, step, grads, flag) if wait else (lambda: send(self, step, grads, flag))

    Server.reply = reply_later
    sys.exit(cli.main(sys.argv[2:]))


def run(name: str, clients: int, steps: int, work: Path) -> float:
    out = work / f"run-{time.monotonic_ns()}"
    sets = [f"run.out_dir={out}", f"model.config={WIDE}", f"train.steps={steps}", "train.batch_size=8",
            "train.eval_every=0", f"train.log_every={steps}", *SCHEDULES[name]]  # fmt: skip
    entry = [__file__, "_held"] if name.endswith("end") else ["-m", "splitlora_mpi"]
    cmd = [MPIRUN, "-n", str(clients + 1), sys.executable, *entry, *(a for s in sets for a in ("--set", s))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        sys.exit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    wall = json.loads((out / "summary.json").read_text())["wall_s"]
    shutil.rmtree(out)
    return wall / steps


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_held":
        return held()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_update.json")
    args = p.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name in SCHEDULES:
                seconds[name].append(run(name, args.clients, args.steps, Path(tmp)))
                print(f"{name}: {seconds[name][-1]:.3f} s/step", flush=True)
    best = {name: min(v) for name, v in seconds.items()}
    result = {"benchmark": "server_update", "machine": machine(), "clients": args.clients, "steps": args.steps,
              "model": WIDE, "batch_size": 8, "seconds_per_step": seconds, "best_s_per_step": best,
              "ratio_to_joint": {name: s / best["joint"] for name, s in best.items()}}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, s in best.items():
        print(f"{name}: {s:.3f} s/step ({s / best['joint']:.2f} x joint)")


if __name__ == "__main__":
    main()
