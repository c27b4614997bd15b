"""The split options of issue 8 against the plain split, on real E2E data, in one run.

    python benchmarks/options.py [--clients 4] [--steps 30] [--out-dir benchmarks/results]

Every option is one `--set` away from the plain splitlora run (same data, seed, model and
tokens): wire formats, label privacy (U-shaped split), per-client cut points, activation
clipping + noise, micro-batches. Reported as ratios to the plain run measured in the same
invocation: wire bytes (activations + gradients + labels), final validation loss, and the
median step time from metrics.jsonl. Writes options.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import MPIRUN, machine
from paper_convergence import MODEL_NO_DROPOUT as MODEL
from paper_convergence import ROOT, SHARED, fast_bpe_tokenizer, test_subset

OPTIONS: dict[str, list[str]] = {
    "plain": [],
    "bfloat16 wire": ["comm.activation_dtype=bfloat16"],
    "int8 wire": ["comm.activation_dtype=int8"],
    "label private (U-shaped)": ["split.label_private=true"],
    "label private, 1 tail block": ["split.label_private=true", "split.tail_layers=1"],
    "cut points [1, 2, 1, 2]": ["split.client_layers=[1, 2, 1, 2]"],
    "DP clip 5, noise 0.1": ["privacy.clip=5", "privacy.noise_multiplier=0.1"],
    "2 micro-batches": ["comm.micro_batches=2"],
    "4 micro-batches": ["comm.micro_batches=4"],
}
WIRE = ("activations", "gradients", "labels")


def command(args: argparse.Namespace, tok: Path, val: Path, out: Path, option: list[str]) -> list[str]:
    sets = [
        f"run.out_dir={out}", f"model.config={MODEL}", f"model.tokenizer={tok}",
        f"data.train_path={SHARED / 'e2e' / 'valid.txt'}", f"data.val_path={val}", f"data.max_seq_len={args.seq_len}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.warmup_steps={args.steps // 10}",
        f"train.aggregate_every={args.aggregate_every}", "train.eval_every=0", "train.log_every=1", *option,
    ]  # fmt: skip
    return [MPIRUN, "-n", str(args.clients + 1), sys.executable, "-m", "splitlora_mpi",
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip


def measure(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_s = [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:]) if "val_loss" not in b]
    return {
        "wire_bytes": sum(s["bytes"][k] for k in WIRE),
        "bytes": s["bytes"],
        "final_val_loss": s["final_val_loss"],
        "median_step_s": statistics.median(step_s),
        "wall_s": s["wall_s"],
        "privacy": s["privacy"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--aggregate-every", type=int, default=10)
    p.add_argument("--test-every", type=int, default=20, help="evaluate on every k-th line of test.txt")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    results, commands = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok, val = fast_bpe_tokenizer(work), test_subset(work, args.test_every)
        for name, option in OPTIONS.items():
            out = work / f"run{len(results)}"
            cmd = command(args, tok, val, out, option)
            commands[name] = " ".join(str(c) for c in cmd)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if r.returncode:
                sys.exit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            results[name] = measure(out)
            print(f"{name}: {results[name]}", flush=True)
            shutil.rmtree(out)
    plain = results["plain"]
    for r in results.values():
        r["ratios"] = {
            "wire_bytes": r["wire_bytes"] / plain["wire_bytes"],
            "final_val_loss": r["final_val_loss"] / plain["final_val_loss"],
            "median_step_s": r["median_step_s"] / plain["median_step_s"],
        }
    args_out = {k: str(v) for k, v in vars(args).items()}
    out = {"benchmark": "options", "machine": machine(), "args": args_out, "model": MODEL, "options": results,
           "commands": commands}  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "options.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out_dir / "options.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict[str, dict]) -> str:
    lines = ["| option | wire bytes | final val loss | median step time | wire MB | val loss | step s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        q = r["ratios"]
        lines.append(
            f"| {name} | {q['wire_bytes']:.3f} | {q['final_val_loss']:.4f} | {q['median_step_s']:.2f} | "
            f"{r['wire_bytes'] / 1e6:.1f} | {r['final_val_loss']:.4f} | {r['median_step_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
