"""E2E NLG evaluation of a finished run: `python -m splitlora_mpi.evaluate RUN_DIR [--data FILE]`.

Why: training only reports a validation loss; the LoRA / SplitLoRA papers compare runs by the
E2E NLG Challenge scores of decoded text (BLEU, NIST, METEOR, ROUGE-L, CIDEr).

How: the base model (RUN_DIR/base, else the adapter's `base_model_name_or_path`) with the run's
LoRA adapter merged decodes every unique meaning representation (MR) of the data file (default:
the packaged held-out E2E sample) from the training prompt `MR ||`, greedily and/or with beam
search. The predictions are scored like the challenge's official e2e-metrics script, multi-reference
and at corpus level:

- BLEU: sacrebleu, mteval-v13a tokenization, lowercased, no smoothing: the numbers of mteval-v13a.pl.
  A fraction: 0.6879 is the "68.79" of papers.
- NIST: the mteval-v13a.pl formula, written here (nltk's corpus_nist scores against one best reference,
  not against the merged references as mteval does, and gives other numbers).
- METEOR, ROUGE_L, CIDEr: pycocoevalcap on Stanford-PTB-tokenized, lowercased text without punctuation,
  as the official script does. Its PTB tokenizer and METEOR 1.5 (exact, stem, WordNet synonym and
  paraphrase matching) are Java programs. Without `java` (or with --pure-python): nltk's Treebank
  tokenizer, and nltk's METEOR with exact + Porter-stem matching only (nltk cannot download WordNet
  here; the WordNet tables pycocoevalcap ships sit inside the Java METEOR jar), averaged over MRs.
  Its scale differs from METEOR 1.5 (e.g. 0.73 vs 0.41): scores.json says which one was used
  ("meteor_note").

Writes RUN_DIR/eval/predictions_<decoding>.txt (one line per MR, in MR order), references.txt (the
e2e-metrics multi-reference format: an MR's references on consecutive lines, a blank line between
MRs) and scores.json, each replaced atomically. Exit codes: 0 done; 2 bad input (one `error:` line
on stderr); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import string
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from .config import JobConfig, load_config
from .errors import ConfigError

DECODINGS = ("greedy", "beam")
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
NIST_ORDER = 5
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # mteval-v13a.pl's tr/[A-Z]/[a-z]/
SCALE = (
    "BLEU, METEOR, ROUGE_L: fractions in [0, 1] (BLEU 0.6879 = 68.79 in papers); "
    "NIST: mteval-v13a scale (0 up, about 8-9 for good E2E systems); CIDEr: pycocoevalcap CIDEr-D scale (0-10)"
)


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, like the training CLI
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m splitlora_mpi.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="output directory of a training run (config.yaml, adapter/, base/)")
    p.add_argument(
        "--data",
        type=Path,
        help="file to evaluate on, in the run's data format (E2E: 'MR||reference' lines, e.g. the challenge's "
        "test set converted to it); "
        "default: the packaged held-out sample (25 MRs of the E2E validation split)",
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
    from .data import load_tokenizer, packaged_data_paths, read_examples
    from .fsutil import write_atomic

    run: Path = args.run_dir
    cfg = load_run_config(run)
    base = base_model_path(run)
    if args.data is None and cfg.data.format != "e2e":
        raise ConfigError(f"--data: required for a run trained on {cfg.data.format} data (the default is E2E)")
    data = args.data if args.data is not None else packaged_data_paths()[1]
    mrs, refs = group_references(read_examples(data, cfg.data.format))
    mrs, refs = mrs[: args.limit], refs[: args.limit]
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
    print(line, flush=True)


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


def load_model(base: str, adapter: Path | None) -> Any:
    """Base + adapter, merged (plain forward passes: faster decoding), float32, eval mode;
    the base alone without an adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. a padding hint when a batch needs no mask, and load progress bars
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as e:  # a missing hub id, no network, no weights in the directory
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"base model {base}: cannot load ({reason}); expected a model directory or hub id") from None
    if adapter is not None:
        with warnings.catch_warnings():  # transformers' deprecation notices about peft's calls: not the user's to fix
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(device).eval()


# ---------------------------------------------------------------- data


def group_references(examples: list[Any]) -> tuple[list[str], list[list[str]]]:
    """Unique prompts in order of first appearance, each with all its references."""
    by_prompt: dict[str, list[str]] = {}
    for ex in examples:
        by_prompt.setdefault(ex.prompt, []).append(ex.completion)
    return list(by_prompt), list(by_prompt.values())


def references_text(refs: list[list[str]]) -> str:
    """The e2e-metrics multi-reference format."""
    return "\n".join("".join(r + "\n" for r in group) for group in refs)


def prompt_ids(tok: Any, prompt: str, fmt: str) -> list[int]:
    """The prompt part of a training row (data._encode_pair): generation continues where the completion starts."""
    return tok.encode(prompt + " ||") if fmt == "e2e" else tok.encode(prompt)


# ---------------------------------------------------------------- decoding


def decode(
    model: Any, tok: Any, prompts: list[list[int]], max_seq_len: int, args: Any, beams: int, label: str
) -> list[str]:
    """Predictions in prompt order; prompts of similar length batched together (less padding), at least
    ~10 batches so that a progress line comes every ~10% (beam search on a CPU can take minutes)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = max(1, min(args.batch_size, math.ceil(len(order) / 10)))
    out: list[str] = [""] * len(prompts)
    done, shown, t0 = 0, 0, time.perf_counter()
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        texts = generate(model, tok, [prompts[i] for i in idx], max_seq_len, args.max_new_tokens, beams,
                         args.no_repeat_ngram_size if beams > 1 else 0)  # fmt: skip
        for i, text in zip(idx, texts):
            out[i] = text
        done += len(idx)
        if done * 10 // len(order) > shown or done == len(order):  # a line every ~10%
            shown = done * 10 // len(order)
            say(f"{label}: {done}/{len(order)} MRs ({100 * done // len(order)}%), {time.perf_counter() - t0:.1f} s")
    return out


def generate(
    model: Any, tok: Any, prompts: list[list[int]], max_seq_len: int, max_new: int, beams: int, no_repeat: int
) -> list[str]:
    """One left-padded batch. Prompt + new tokens stay within max_seq_len; a too long prompt keeps its
    first tokens and leaves the completion as much room as training did (max(T // 2, T - prompt))."""
    import torch

    longest = max(len(p) for p in prompts)
    new = min(max_new, max(max_seq_len // 2, max_seq_len - longest))
    prompts = [p[: max_seq_len - new] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    with torch.no_grad():
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            num_beams=beams,
            do_sample=False,
            no_repeat_ngram_size=no_repeat,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return [continuation_text(tok, row[width:].tolist()) for row in seqs]


def continuation_text(tok: Any, ids: list[int]) -> str:
    """Generated ids cut at the first eos, as one line of text (newlines would break the one-line-per-MR files)."""
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return " ".join(tok.decode(ids).split())


# ---------------------------------------------------------------- scores


def score_corpora(predictions: dict[str, list[str]], refs: list[list[str]], java: bool) -> dict[str, dict[str, float]]:
    """{decoding: {metric: score}}; the Java METEOR (slow to start) is started once for all decodings."""
    refs_tok = tokenize_coco([r for group in refs for r in group], java)
    it = iter(refs_tok)
    refs_coco = [[next(it) for _ in group] for group in refs]
    meteor = _JavaMeteor() if java else None
    try:
        out = {}
        for decoding, preds in predictions.items():
            preds_coco = tokenize_coco(preds, java)
            out[decoding] = {
                "BLEU": bleu(preds, refs),
                "NIST": nist(preds, refs),
                "METEOR": meteor.score(preds_coco, refs_coco) if meteor else meteor_python(preds_coco, refs_coco),
                **coco_rouge_cider(preds_coco, refs_coco),
            }
        return out
    finally:
        if meteor:
            meteor.close()


def score_corpus(preds: list[str], refs: list[list[str]], java: bool) -> dict[str, float]:
    """All five scores of one system output (preds[i] is scored against refs[i])."""
    return score_corpora({"system": preds}, refs, java)["system"]


def bleu(preds: list[str], refs: list[list[str]]) -> float:
    """mteval-v13a BLEU (sacrebleu: 13a tokens, closest reference length, no smoothing), a fraction."""
    from sacrebleu.metrics import BLEU

    streams = [[group[k] if k < len(group) else None for group in refs] for k in range(max(map(len, refs)))]
    scorer = BLEU(tokenize="13a", smooth_method="none", force=True)
    lower = [[r.translate(_ASCII_LOWER) if r is not None else None for r in s] for s in streams]
    return scorer.corpus_score([p.translate(_ASCII_LOWER) for p in preds], lower).score / 100


def mteval_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.translate(_ASCII_LOWER)).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def nist(preds: list[str], refs: list[list[str]], n: int = NIST_ORDER) -> float:
    """mteval-v13a.pl NIST: n-gram information from all references of the corpus; matches clipped by
    the largest count in any reference of the segment; length penalty against the average reference length."""
    hyps = [mteval_tokens(p) for p in preds]
    refs_t = [[mteval_tokens(r) for r in group] for group in refs]
    counts: Counter = Counter()
    ref_words = 0
    for group in refs_t:
        for r in group:
            counts.update(_ngrams(r, n))
            ref_words += len(r)
    info = {g: math.log2((counts[g[:-1]] if len(g) > 1 else ref_words) / c) for g, c in counts.items()}
    gained, hyp_ngrams = [0.0] * n, [0] * n
    for hyp, group in zip(hyps, refs_t):
        best: Counter = Counter()
        for r in group:
            best |= _ngrams(r, n)
        for g, c in _ngrams(hyp, n).items():
            if g in best:
                gained[len(g) - 1] += info[g] * min(c, best[g])
        for k in range(n):
            hyp_ngrams[k] += max(len(hyp) - k, 0)
    n_refs = sum(1 for group in refs_t for r in group if r)
    if not n_refs or not ref_words:
        return 0.0
    avg_ref_len = ref_words / (n_refs / len(hyps))
    score = sum(gained[k] / max(hyp_ngrams[k], 1) for k in range(n))
    return score * _nist_length_penalty(hyp_ngrams[0] / avg_ref_len)


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2  # penalty 0.5 at 2/3 of the reference length
    return math.exp(-beta * math.log(ratio) ** 2)


def tokenize_coco(texts: list[str], java: bool) -> list[str]:
    """What pycocoevalcap's PTBTokenizer gives (lowercased PTB tokens, punctuation removed).
    Its own wrapper writes a temp file into site-packages and prints to stderr, hence this one."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    if java:
        jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        text = "\n".join(t.replace("\n", " ") for t in texts)
        done = subprocess.run([*cmd, "-encoding", "UTF-8"], input=text.encode(), capture_output=True, check=True)
        lines = done.stdout.decode("utf-8").split("\n")[: len(texts)]
        lines += [""] * (len(texts) - len(lines))
    else:
        lines = [" ".join(_treebank(t)) for t in texts]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS) for line in lines]


def _treebank(text: str) -> list[str]:
    """Pure-Python stand-in for the Stanford PTB tokenizer (it also writes £ as #)."""
    from nltk.tokenize import TreebankWordTokenizer

    words = TreebankWordTokenizer().tokenize(text.replace("\n", " "), convert_parentheses=True)
    return [w.replace("£", "#").lower() for w in words]


def coco_rouge_cider(preds: list[str], refs: list[list[str]]) -> dict[str, float]:
    """pycocoevalcap ROUGE-L (beta 1.2, best precision / recall over the references) and CIDEr-D (x10)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: group for i, group in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    return {"ROUGE_L": float(Rouge().compute_score(gts, res)[0]), "CIDEr": float(Cider().compute_score(gts, res)[0])}


class _JavaMeteor:
    """pycocoevalcap's METEOR 1.5 process (`-l en -norm`, as e2e-metrics): corpus-level score."""

    def __init__(self) -> None:
        from pycocoevalcap.meteor.meteor import Meteor

        self.meteor = Meteor()

    def score(self, preds: list[str], refs: list[list[str]]) -> float:
        gts = {i: group for i, group in enumerate(refs)}
        return float(self.meteor.compute_score(gts, {i: [p] for i, p in enumerate(preds)})[0])

    def close(self) -> None:
        del self.meteor  # its __del__ ends the Java process


class _NoSynonyms:
    """Stands in for nltk's WordNet reader (its data cannot be downloaded here): no synonym matches."""

    def synsets(self, word: str, pos: Any = None) -> list:
        return []


def meteor_python(preds: list[str], refs: list[list[str]]) -> float:
    """nltk METEOR (alpha 0.9, beta 3, gamma 0.5) with exact + Porter-stem matching, best reference per
    MR, averaged over MRs. Not METEOR 1.5: no synonyms, paraphrases or function-word weights."""
    from nltk.translate.meteor_score import meteor_score

    if not preds:
        return 0.0
    no_syn = _NoSynonyms()
    total = sum(meteor_score([r.split() for r in group], p.split(), wordnet=no_syn) for p, group in zip(preds, refs))
    return total / len(preds)


def java_available() -> bool:
    if shutil.which("java") is None:
        say("note: no java on PATH: METEOR and the tokenizer of METEOR/ROUGE_L/CIDEr are approximated (see --help)")
        return False
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        say("note: java does not run: METEOR and the tokenizer of METEOR/ROUGE_L/CIDEr are approximated")
        return False
    return True


def implementation(java: bool) -> dict[str, str]:
    from importlib.metadata import version

    coco_tok = "Stanford PTBTokenizer 3.4.1 (Java)" if java else "nltk TreebankWordTokenizer (no Java)"
    return {
        "BLEU": f"sacrebleu {version('sacrebleu')}: 13a tokens, lowercase, closest ref length, no smoothing",
        "NIST": "mteval-v13a.pl formula (splitlora_mpi.evaluate.nist), 13a tokens, lowercase",
        "METEOR": "pycocoevalcap METEOR 1.5 (Java) -l en -norm" if java else f"nltk {version('nltk')} exact+stem",
        "ROUGE_L": f"pycocoevalcap {version('pycocoevalcap')} Rouge",
        "CIDEr": f"pycocoevalcap {version('pycocoevalcap')} Cider (CIDEr-D)",
        "coco_tokenizer": coco_tok,
    }


def meteor_note(java: bool) -> str:
    if java:
        return "official METEOR 1.5 (exact, stem, WordNet synonyms, paraphrases), as e2e-metrics"
    return (
        "approximation without Java: nltk METEOR (alpha 0.9, beta 3, gamma 0.5) with exact + Porter-stem matching "
        "only (no WordNet synonyms, no paraphrases), mean of per-MR scores; not comparable to papers (a template "
        "system on the packaged sample: 0.727 here, 0.412 with the official METEOR 1.5)"
    )


if __name__ == "__main__":
    sys.exit(main())
