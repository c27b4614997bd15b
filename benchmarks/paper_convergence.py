"""The paper's comparison on real E2E data: splitlora, sl, fedlora and central, same tokens.

    python benchmarks/paper_convergence.py [--clients 4] [--steps 150] [--out-dir benchmarks/results]

Trains on ../shared/data/e2e/valid.txt and evaluates on every 10th line of test.txt, with the
GPT-2 BPE tokenizer (../shared/data/gpt2-vocab) and a small random-init GPT-2. Equal tokens:
splitlora / fedlora run S steps of B rows per client, sl runs N*S steps of B rows (one client
per step), central S steps of N*B rows. Writes paper_convergence.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

from common import equal_tokens, launch, machine, run_and_keep

from splitlora_mpi.plot import paper_name, plot_runs, time_to_target

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODEL = "{model_type: gpt2, n_embd: 128, n_layer: 4, n_head: 4, n_positions: 128}"
# the same GPT-2 without dropout, for benchmarks whose runs must train identically (dropout
# masks are not reproducible between runs): options.py, multihost.py
MODEL_NO_DROPOUT = MODEL[:-1] + ", resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"
MODES = ("central", "splitlora", "sl", "fedlora")


def bpe_tokenizer(work: Path) -> Path:
    """GPT-2's vocab.json / merges.txt are shipped as encoder.json / vocab.bpe."""
    tok = work / "gpt2-bpe"
    tok.mkdir()
    shutil.copy(SHARED / "gpt2-vocab" / "encoder.json", tok / "vocab.json")
    shutil.copy(SHARED / "gpt2-vocab" / "vocab.bpe", tok / "merges.txt")
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "GPT2Tokenizer"}\n')
    return tok


def fast_bpe_tokenizer(work: Path) -> Path:
    """bpe_tokenizer plus its tokenizer.json: each rank loads it in ~1 s instead of ~8 s."""
    from transformers import AutoTokenizer

    tok = bpe_tokenizer(work)
    AutoTokenizer.from_pretrained(tok).save_pretrained(tok)
    return tok


def test_subset(work: Path, every: int) -> Path:
    lines = (SHARED / "e2e" / "test.txt").read_text().splitlines()
    out = work / "test-subset.txt"
    out.write_text("\n".join(lines[::every]) + "\n")
    return out


def command(mode: str, args: argparse.Namespace, tok: Path, val: Path, out: Path) -> list[str]:
    steps, batch, per_eval = equal_tokens(mode, args.clients, args.steps, args.batch_size, args.eval_every)
    warmup = steps // 15
    sets = {
        "run.mode": mode, "run.out_dir": out, "model.config": MODEL, "model.tokenizer": tok,
        "data.train_path": SHARED / "e2e" / "valid.txt", "data.val_path": val, "data.max_seq_len": args.seq_len,
        "train.steps": steps, "train.batch_size": batch, "train.warmup_steps": warmup,
        "train.aggregate_every": args.aggregate_every, "train.eval_every": per_eval, "train.log_every": per_eval,
    }  # fmt: skip
    return launch(mode, args.clients, sets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=150, help="splitlora / fedlora / central steps (sl: clients x)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per client per step")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--aggregate-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=30)
    p.add_argument("--test-every", type=int, default=10, help="evaluate on every k-th line of test.txt")
    p.add_argument("--target", type=float, default=None, help="target val loss (default: central's final x 1.005)")
    p.add_argument("--reuse", action="store_true", help="no training: re-analyse the kept runs (e.g. another --target)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    keep = args.out_dir / "paper_convergence_runs"
    if args.reuse:
        runs = {mode: keep / mode for mode in MODES}
        commands = json.loads((args.out_dir / "paper_convergence.json").read_text())["commands"]
    else:
        runs, commands = train_all(args, keep)
    report(args, runs, commands)


def train_all(args: argparse.Namespace, keep: Path) -> tuple[dict[str, Path], dict[str, str]]:
    shutil.rmtree(keep, ignore_errors=True)
    runs, commands = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok, val = bpe_tokenizer(work), test_subset(work, args.test_every)
        for mode in MODES:
            cmd = command(mode, args, tok, val, work / mode)
            commands[mode] = " ".join(str(c) for c in cmd)
            run_and_keep(cmd, work / mode, keep / mode, timeout_s=7200)
            runs[mode] = keep / mode
    return runs, commands


def report(args: argparse.Namespace, runs: dict[str, Path], commands: dict[str, str]) -> None:
    summaries = {m: json.loads((d / "summary.json").read_text()) for m, d in runs.items()}
    target = args.target or round(summaries["central"]["final_val_loss"] * 1.005, 4)
    rows = {}
    for mode, s in summaries.items():
        hit = time_to_target(runs[mode], target)
        rounds = max(1, s["steps"] // args.aggregate_every)
        rows[mode] = {
            "final_val_loss": s["final_val_loss"],
            "final_val_ppl": math.exp(s["final_val_loss"]),
            "wall_s": s["wall_s"],
            "tokens": s["tokens"],
            "total_bytes": sum(s["bytes"].values()),
            "bytes": s["bytes"],
            "bytes_per_client_per_round": sum(s["bytes"].values()) / args.clients / rounds if mode != "central" else 0,
            "time_to_target_s": hit["wall_s"] if hit else None,
            "bytes_to_target": hit["sent_bytes"] if hit else None,
            "peak_rss_mb": s["peak_rss_mb"],
        }
    png = args.out_dir / "paper_convergence.png"
    title = f"E2E valid -> test subset, GPT-2 128x4 random init, {args.clients} clients, equal tokens"
    plot_runs([runs[m] for m in MODES], png, target_loss=target, title=title)
    result = {
        "benchmark": "paper_convergence",
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": MODEL,
        "target_val_loss": target,
        "commands": commands,
        "modes": rows,
        "figure": png.name,
    }
    (args.out_dir / "paper_convergence.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / "paper_convergence.md").write_text(markdown(rows, target))
    print(markdown(rows, target))


def markdown(rows: dict[str, dict], target: float) -> str:
    lines = [f"| scheme | final val loss (ppl) | wall s | to val {target:.3f}: s | MB sent | MB to target | "
             "kB / client / round |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for mode, r in rows.items():
        tt = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "not reached"
        bt = f"{r['bytes_to_target'] / 1e6:.1f}" if r["bytes_to_target"] is not None else "—"
        loss = f"{r['final_val_loss']:.4f} ({r['final_val_ppl']:.1f})"
        mb, per_round = r["total_bytes"] / 1e6, r["bytes_per_client_per_round"] / 1e3
        lines.append(f"| {paper_name(mode)} | {loss} | {r['wall_s']:.1f} | {tt} | {mb:.1f} | {bt} | {per_round:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
