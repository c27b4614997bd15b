"""The paper's table on a real pretrained LLM: SmolLM2-135M-Instruct fine-tuned on E2E NLG.

    python benchmarks/real_model.py [--clients 4] [--steps 100] [--out-dir benchmarks/results]
    python benchmarks/real_model.py --lrs 0.01 --seed 1 --modes central,splitlora --tag seed1   # run-to-run spread

CenLoRA, SplitLoRA, SL and FedLoRA at equal tokens, trained on ../shared/data/e2e/valid.txt,
plus the base model without fine-tuning. The learning rate is chosen once, by a short sweep of
`central` runs (lowest validation loss), and used for every scheme. Validation loss: one reference
of each of `--val-mrs` test MRs; scores: greedy decoding of the first `--eval-mrs` other test MRs
against all their references (python -m splitlora_mpi.evaluate's scorers). Splitlora / fedlora run
S steps of B rows per client, sl N*S steps of B rows (one client per step), central S steps of
N*B rows. Writes real_model[_TAG].{json,md,png} and keeps each run's config, metrics and summary
in real_model[_TAG]_runs/ (with --work DIR the whole runs, adapters included, stay in DIR).
A single learning rate in --lrs skips the sweep.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import equal_tokens, launch, machine, run_and_keep

from splitlora_mpi import decoding
from splitlora_mpi.data import load_tokenizer, read_examples
from splitlora_mpi.plot import paper_name, plot_runs, time_to_target
from splitlora_mpi.prepare_model import reference_model
from splitlora_mpi.scores import java_available, score_corpora

ROOT = Path(__file__).resolve().parents[1]
E2E = ROOT.parent / "shared" / "data" / "e2e"
MODES = ("central", "splitlora", "sl", "fedlora")
# scheme -> (run.mode, its settings, what the settings are); the official SplitLoRA code's schedule
# and the frozen base's precisions as options of splitlora (8-bit: the clients' embedding table too)
TABLE_8BIT = {"model.client_embedding_8bit": "true"}
SCHEMES = {m: (m, {}, "") for m in MODES} | {
    "splitlora-official": (
        "splitlora",
        {"split.server_update": "sequential", "train.fedavg_weights": "uniform"},
        "official schedule",
    ),
    "splitlora-bf16": ("splitlora", {"model.dtype": "bfloat16"}, "bf16 base"),
    "splitlora-int8": ("splitlora", {"model.quantize": "int8", **TABLE_8BIT}, "int8 base, 8-bit table"),
    "splitlora-nf4": ("splitlora", {"model.quantize": "nf4", **TABLE_8BIT}, "nf4 base, 8-bit table"),
}


def scheme_name(scheme: str) -> str:
    mode, _, what = SCHEMES[scheme]
    return paper_name(mode) + (f" ({what})" if what else "")


RUN_TIMEOUT_S = 3 * 3600
SCORES = {"bleu": "BLEU", "nist": "NIST", "meteor": "METEOR", "rouge_l": "ROUGE_L", "cider": "CIDEr"}


def held_out(work: Path, val_mrs: int, eval_mrs: int) -> tuple[Path, list[str], list[list[str]]]:
    """test.txt split by MR: the first `eval_mrs` MRs with all references for the scores, one
    reference of each of the next `val_mrs` MRs for the validation loss (disjoint MRs)."""
    mrs, refs = decoding.group_references(read_examples(E2E / "test.txt", "e2e"))
    val = work / "val.txt"
    pairs = zip(mrs[eval_mrs : eval_mrs + val_mrs], refs[eval_mrs : eval_mrs + val_mrs])
    val.write_text("".join(f"{mr}||{group[0]}\n" for mr, group in pairs))
    return val, mrs[:eval_mrs], refs[:eval_mrs]


def command(
    scheme: str, args: argparse.Namespace, model: Path, val: Path, out: Path, lr: float, steps: int
) -> list[str]:
    mode, settings, _ = SCHEMES[scheme]
    steps, batch, per_eval = equal_tokens(mode, args.clients, steps, args.batch_size, args.eval_every)
    sets = {
        "run.mode": mode, "run.out_dir": out, "run.seed": args.seed,
        "model.name_or_path": model, "model.tokenizer": model, "split.client_layers": args.cut,
        "lora.r": args.lora_r, "lora.alpha": args.lora_alpha,
        "data.train_path": E2E / "valid.txt", "data.val_path": val, "data.max_seq_len": args.seq_len,
        "train.steps": steps, "train.batch_size": batch, "train.lr": lr, "train.warmup_steps": max(1, steps // 10),
        "train.aggregate_every": args.aggregate_every, "train.eval_every": per_eval, "train.log_every": per_eval,
        **settings,
    }  # fmt: skip
    return launch(mode, args.clients, sets)


def decode(model_dir: Path, adapter: Path | None, mrs: list[str], args: argparse.Namespace) -> tuple[list[str], float]:
    tok = load_tokenizer(str(model_dir))
    model = decoding.load_model(str(model_dir), adapter)
    start = time.perf_counter()
    prompts = [decoding.prompt_ids(tok, mr, "e2e") for mr in mrs]
    settings = argparse.Namespace(batch_size=16, max_new_tokens=args.max_new_tokens, no_repeat_ngram_size=0)
    label = adapter.parent.name if adapter else "base"
    preds = decoding.decode(model, tok, prompts, args.seq_len, settings, 1, label=label)
    return preds, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="splitlora / fedlora / central steps (sl: clients x)")
    p.add_argument("--batch-size", type=int, default=2, help="rows per client per step")
    p.add_argument("--seq-len", type=int, default=96)
    p.add_argument("--cut", type=int, default=2, help="blocks on each client (split.client_layers)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--aggregate-every", type=int, default=1, help="FedAvg every step (splitlora, fedlora)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lrs", default="0.003,0.01,0.02", help="learning rates tried on central")
    p.add_argument("--sweep-steps", type=int, default=30)
    p.add_argument("--val-mrs", type=int, default=48, help="test MRs (one reference each) for the validation loss")
    p.add_argument("--eval-mrs", type=int, default=400, help="test MRs (all references) for the scores")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modes", default=",".join(MODES), help=f"schemes to train, in this order: {', '.join(SCHEMES)}")
    p.add_argument("--tag", default="", help="output names real_model_TAG.*")
    p.add_argument("--work", type=Path, help="keep the whole runs (adapters too) here; default: a temp dir")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.modes = args.modes.split(",")
    started = time.perf_counter()
    model_dir = reference_model()
    args.stem = "real_model" + (f"_{args.tag}" if args.tag else "")
    keep = args.out_dir / f"{args.stem}_runs"
    shutil.rmtree(keep, ignore_errors=True)
    summaries, commands, sweep = {}, {}, {}
    lrs = [float(x) for x in args.lrs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        val, mrs, refs = held_out(work, args.val_mrs, args.eval_mrs)
        for lr in lrs if len(lrs) > 1 else []:
            name = f"sweep-lr{lr:g}"
            cmd = command("central", args, model_dir, val, work / name, lr, args.sweep_steps)
            s = run_and_keep(cmd, work / name, keep / name, RUN_TIMEOUT_S)
            sweep[lr] = s["final_val_loss"]
        lr = min(sweep, key=sweep.get) if sweep else lrs[0]
        print(f"learning rate {lr:g} (sweep: {sweep})", flush=True)
        preds, seconds = {}, {}
        preds["base"], seconds["base"] = decode(model_dir, None, mrs, args)
        for mode in args.modes:
            cmd = command(mode, args, model_dir, val, work / mode, lr, args.steps)
            commands[mode] = " ".join(str(c) for c in cmd)
            summaries[mode] = run_and_keep(cmd, work / mode, keep / mode, RUN_TIMEOUT_S)
            preds[mode], seconds[mode] = decode(model_dir, work / mode / "adapter", mrs, args)
        print("scoring", flush=True)
        scores = score_corpora(preds, refs, java_available())
        base_val = base_val_loss(model_dir, val, args.seq_len)
    report(args, model_dir, keep, summaries, commands, sweep, lr, scores, preds, mrs, refs, seconds, base_val,
           time.perf_counter() - started)  # fmt: skip


def base_val_loss(model_dir: Path, val: Path, seq_len: int) -> float:
    """The validation loss of the model before fine-tuning, as training computes it."""
    from splitlora_mpi.data import encode_examples, make_batch
    from splitlora_mpi.training import lm_loss_sum

    model = decoding.load_model(str(model_dir), None)
    data = encode_examples(read_examples(val, "e2e"), load_tokenizer(str(model_dir)), seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 16):
            batch = make_batch(data, list(range(start, min(start + 16, len(data)))))
            loss_sum, n = lm_loss_sum(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                      batch.labels)  # fmt: skip
            total, count = total + float(loss_sum), count + n
    return total / count


def report(
    args: argparse.Namespace, model_dir: Path, keep: Path, summaries: dict, commands: dict, sweep: dict, lr: float,
    scores: dict, preds: dict, mrs: list[str], refs: list[list[str]], seconds: dict, base_val: float, total_s: float,
) -> None:  # fmt: skip
    """real_model[_TAG].{json,md,png} from what main measured."""
    target = math.ceil(max(s["final_val_loss"] for s in summaries.values()) * 1e4) / 1e4  # the worst: all reach it
    rows = [{"scheme": "base", **{k: scores["base"][m] for k, m in SCORES.items()}, "val_loss": base_val,
             "val_ppl": math.exp(base_val), "decode_s": round(seconds["base"], 1)}]  # fmt: skip
    for mode, s in summaries.items():
        hit = time_to_target(keep / mode, target)
        parts = s["model_parts"]
        client = parts.get("1", parts["0"])  # central: the one rank holds everything
        rows.append({
            "scheme": mode, "name": scheme_name(mode),
            **{k: scores[mode][m] for k, m in SCORES.items()},
            "val_loss": s["final_val_loss"], "val_ppl": math.exp(s["final_val_loss"]),
            "wall_s": s["wall_s"], "time_to_target_s": hit["wall_s"] if hit else None,
            "tokens": s["tokens"], "mb_sent": sum(s["bytes"].values()) / 1e6, "bytes": s["bytes"],
            "peak_rss_mb": s["peak_rss_mb"], "client_base_params": client["base_params"],
            "base_mb": {"client": client.get("base_bytes", 0) / 1e6, "server": parts["0"].get("base_bytes", 0) / 1e6},
            "client_blocks": client["blocks"], "decode_s": round(seconds[mode], 1),
        })  # fmt: skip
    png = args.out_dir / f"{args.stem}.png"
    title = f"SmolLM2-135M-Instruct + LoRA on E2E, {args.clients} clients, equal tokens"
    labels = [scheme_name(m) for m in args.modes]
    plot_runs([keep / m for m in args.modes], png, target_loss=target, title=title, labels=labels)
    samples = [{"mr": mrs[i], "reference": refs[i][0], **{k: preds[k][i] for k in preds}} for i in range(5)]
    result = {
        "benchmark": "real_model",
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "model": {"dir": str(model_dir), **json.loads((model_dir / "gguf_source.json").read_text())},
        "learning_rate": lr,
        "lr_sweep": {"steps": args.sweep_steps, "final_val_loss": {f"{k:g}": v for k, v in sweep.items()}},
        "decoding": f"greedy, at most {args.max_new_tokens} new tokens, prompt 'MR ||', one decoding for every row",
        "eval_set": f"the first {len(mrs)} unique MRs of e2e/test.txt, {sum(map(len, refs))} references",
        "target_val_loss": target,
        "commands": commands,
        "schemes": rows,
        "samples": samples,
        "total_s": round(total_s, 1),
        "figure": png.name,
    }
    (args.out_dir / f"{args.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out_dir / f"{args.stem}.md").write_text(markdown(rows, target, samples, args.modes))
    print(markdown(rows, target, samples, args.modes))


def markdown(rows: list[dict], target: float, samples: list[dict], modes: list[str]) -> str:
    head = ("| scheme | BLEU | NIST | METEOR | ROUGE-L | CIDEr | val loss (ppl) | wall s | to val "
            f"{target:.3f}: s | MB sent | peak RSS MB client / server | base MB client / server |")  # fmt: skip
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.get("name", "base model (no fine-tuning)")
        scores = " | ".join(f"{r[k]:.4f}" for k in SCORES)
        loss = f"{r['val_loss']:.4f} ({r['val_ppl']:.2f})"
        if r["scheme"] == "base":
            lines.append(f"| {name} | {scores} | {loss} | — | — | — | — | — |")
            continue
        tt = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "not reached"
        rss = r["peak_rss_mb"]
        lines.append(f"| {name} | {scores} | {loss} | {r['wall_s']:.0f} | {tt} | {r['mb_sent']:.1f} | "
                     f"{rss['client_max']:.0f} / {rss['server']:.0f} | "
                     f"{r['base_mb']['client']:.0f} / {r['base_mb']['server']:.0f} |")  # fmt: skip
    out = "\n".join(lines) + "\n\nSamples (greedy):\n\n"
    for s in samples:
        out += f"- MR: `{s['mr']}`\n  - reference: {s['reference']}\n"
        out += "".join(f"  - {scheme_name(k) if k != 'base' else 'base model'}: {s[k]}\n" for k in ("base", *modes))
    return out


if __name__ == "__main__":
    main()
