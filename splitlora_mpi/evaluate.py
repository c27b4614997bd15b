"""E2E NLG evaluation of a finished run: `python -m splitlora_mpi.evaluate RUN_DIR [--data FILE]`.

Why: training only reports a validation loss; the LoRA / SplitLoRA papers compare runs by the
E2E NLG Challenge scores of decoded text (BLEU, NIST, METEOR, ROUGE-L, CIDEr).

How: the base model (RUN_DIR/base, else the adapter's `base_model_name_or_path`) with the run's
LoRA adapter merged decodes every unique meaning representation (MR) of the data file (default:
the run's data.val_path, null there: the packaged held-out E2E sample; never the training file
by accident: MRs also in the run's training data are counted and reported) from the training
prompt `MR ||`, greedily and/or with beam search (decoding.py). The predictions are scored like
the challenge's official e2e-metrics script, multi-reference and at corpus level (scores.py).
Writes RUN_DIR/eval/predictions_<decoding>.txt (one line per MR, in MR order), references.txt (the
e2e-metrics multi-reference format: an MR's references on consecutive lines, a blank line between
MRs) and scores.json, each replaced atomically. Exit codes: 0 done; 2 bad input (one `error:` line
on stderr); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .cli import OneLineParser
from .config import CLIENT, JobConfig, load_config
from .decoding import decode, group_references, load_model, prompt_ids, references_text
from .e2e import mr_key
from .errors import ConfigError
from .scores import METRICS, SCALE, implementation, java_available, meteor_note, score_corpora

DECODINGS = ("greedy", "beam")


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m splitlora_mpi.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="output directory of a training run (config.yaml, adapter/, base/)")
    p.add_argument(
        "--data",
        type=Path,
        help="file to evaluate on, in the run's data format (E2E: 'MR||reference' lines or the challenge's CSV "
        "with columns mr,ref, e.g. testset_w_refs.csv); default: the run's data.val_path (null there: the "
        "packaged held-out sample, 25 MRs of the E2E validation split)",
    )
    p.add_argument("--limit", type=int, help="evaluate only the first N unique MRs")
    p.add_argument("--decoding", nargs="+", choices=DECODINGS, default=list(DECODINGS), help="decodings to run")
    p.add_argument("--beams", type=int, default=4, help="beam size of the beam decoding (default 4)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="beam decoding: ban repeated n-grams (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest prediction in tokens (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="MRs decoded together (default 16)")
    p.add_argument(
        "--pure-python", action="store_true", help="no Java: nltk tokenizer, nltk METEOR (exact+stem; not as in papers)"
    )
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("limit", "beams", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer ≥ 1, got {value}")
    if args.no_repeat_ngram_size < 0:
        raise ConfigError(f"--no-repeat-ngram-size: expected an integer ≥ 0, got {args.no_repeat_ngram_size}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        _require_packages()
        evaluate_run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _require_packages() -> None:
    """Fail before loading a model when the eval extras are missing."""
    import importlib.util

    missing = [m for m in ("sacrebleu", "nltk", "pycocoevalcap") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"missing packages {', '.join(missing)}; expected the eval extras: pip install 'splitlora_mpi[eval]'"
        )


# ---------------------------------------------------------------- the run


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    """Decode, score, write RUN_DIR/eval/; returns what scores.json holds."""
    from .data import load_tokenizer, read_examples
    from .fsutil import write_atomic

    run: Path = args.run_dir
    cfg = load_run_config(run)
    base = base_model_path(run)
    if cfg.data.format == "chat":
        raise ConfigError("run.data.format chat: the E2E scores need prompt / completion data (e2e or jsonl)")
    data = args.data if args.data is not None else run_val_path(run, cfg)
    mrs, refs = group_references(read_examples(data, cfg.data.format))
    mrs, refs = mrs[: args.limit], refs[: args.limit]
    overlap = overlap_with_train(run, cfg, mrs)
    if overlap:
        say(f"warning: {overlap} of {len(mrs)} MRs in {data} are also in the training data ({run}'s "
            f"data.train_path {cfg.data.train_path or 'null: the packaged training sample'})")  # fmt: skip
    java = not args.pure_python and java_available()
    tok = load_tokenizer(cfg.model.tokenizer)
    model = load_model(base, run / "adapter")
    say(f"evaluating {run} on {len(mrs)} MRs ({sum(map(len, refs))} references) of {data}")

    prompts = [prompt_ids(tok, mr, cfg.data.format) for mr in mrs]
    predictions: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for decoding in args.decoding:
        t0 = time.perf_counter()
        beams = 1 if decoding == "greedy" else args.beams
        predictions[decoding] = decode(model, tok, prompts, cfg.data.max_seq_len, args, beams, label=decoding)
        seconds[decoding] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    say("scoring" + (" (Java METEOR 1.5 first loads its paraphrase table: about 10 s)" if java else ""))
    scores = score_corpora(predictions, refs, java)
    seconds["scoring"] = round(time.perf_counter() - t0, 2)

    out = run / "eval"
    for decoding, preds in predictions.items():
        write_atomic(out / f"predictions_{decoding}.txt", "".join(p + "\n" for p in preds))
    write_atomic(out / "references.txt", references_text(refs))
    result = {
        **scores,
        "n_mrs": len(mrs),
        "n_references": sum(len(r) for r in refs),
        "data": str(Path(data).resolve()),
        "limit": args.limit,
        "overlap_with_train": overlap,
        "decoding": {
            "max_new_tokens": args.max_new_tokens,
            "greedy": {"num_beams": 1},
            "beam": {"num_beams": args.beams, "no_repeat_ngram_size": args.no_repeat_ngram_size},
        },
        "scale": SCALE,
        "implementation": implementation(java),
        "meteor_note": meteor_note(java),
        "seconds": seconds,
    }
    write_atomic(out / "scores.json", (json.dumps(result, indent=2) + "\n"))
    for decoding in predictions:
        say(f"{decoding}: " + "  ".join(f"{m} {scores[decoding][m]:.4f}" for m in METRICS))
    say(f"wrote {out}/")
    return result


def say(line: str) -> None:
    """Progress on stdout (decoding and scoring print theirs there too)."""
    print(line, flush=True)


def run_val_path(run: Path, cfg: JobConfig) -> Path:
    """The run's own validation file (data.val_path; null: the packaged held-out sample), which
    training kept apart from its training file."""
    from .data import train_val_paths

    if cfg.data.val_path is None and cfg.data.format != "e2e":
        raise ConfigError(f"--data: required for a run trained on {cfg.data.format} data (the default is E2E)")
    path = train_val_paths(cfg)[1]
    if CLIENT in path:
        raise ConfigError(f"--data: required: {run}'s data.val_path {path} names each client's own file")
    if not Path(path).is_file():
        raise ConfigError(f"--data: required: {run}'s data.val_path {path} is not a file here (paths in its "
                          "config.yaml are relative to where training ran)")  # fmt: skip
    return Path(path)


def overlap_with_train(run: Path, cfg: JobConfig, mrs: list[str]) -> int | None:
    """How many of `mrs` (meaning representations, or prompts) the run trained on; None when its
    training files cannot be read here (a warning says why)."""
    from .data import read_examples, train_val_paths

    path = train_val_paths(cfg)[0]
    files = [path] if CLIENT not in path else [path.replace(CLIENT, c) for c in client_ranks(run, cfg)]
    try:
        if not files:
            raise ConfigError(f"no client files known for data.train_path {path} (no {run}/summary.json)")
        trained = [ex.prompt for f in files for ex in read_examples(f, cfg.data.format)]
    except ConfigError as e:
        say(f"warning: cannot check the MRs against the training data: {e}")
        return None
    key = mr_key if cfg.data.format == "e2e" else str  # (e2e: either notation, see e2e.mr_key)
    seen = {key(mr) for mr in trained}
    return sum(key(mr) in seen for mr in mrs)


def client_ranks(run: Path, cfg: JobConfig) -> list[str]:
    """The clients whose own training files ({client} paths) the run read: its summary's, else 1..data.clients."""
    try:
        ranks = [r for r in json.loads((run / "summary.json").read_text())["examples_by_client"] if r != "0"]
    except (OSError, ValueError, KeyError, TypeError):
        ranks = []
    return ranks or [str(c) for c in range(1, cfg.data.clients + 1)]  # (central: rank 0 read data.clients files)


def load_run_config(run: Path) -> JobConfig:
    if not run.is_dir():
        what = "not a directory" if run.exists() else "not found"
        raise ConfigError(f"run directory {run}: {what}; expected the output directory of a training run")
    for need in ("config.yaml", "adapter/adapter_config.json"):
        if not (run / need).is_file():
            raise ConfigError(f"run directory {run}: no {need}; expected a finished training run")
    return load_config(run / "config.yaml")


def base_model_path(run: Path) -> str:
    """run/base when training saved it (built from a config), else the adapter's base path or hub id."""
    if (run / "base" / "config.json").is_file():
        return str(run / "base")
    where = run / "adapter" / "adapter_config.json"
    try:
        base = json.loads(where.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: unreadable ({e}); expected a PEFT adapter config") from None
    if not base:
        raise ConfigError(f"run directory {run}: no base/ and {where} names no base_model_name_or_path")
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
        raise ConfigError(f"run directory {run}: no base/, and the adapter's base model {base} does not exist")
    return base


if __name__ == "__main__":
    sys.exit(main())
