"""The E2E NLG Challenge scores of decoded text, like the challenge's official e2e-metrics
script: multi-reference, at corpus level (BLEU, NIST, METEOR, ROUGE-L, CIDEr).

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
"""

from __future__ import annotations

import math
import shutil
import string
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
NIST_ORDER = 5
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # mteval-v13a.pl's tr/[A-Z]/[a-z]/
SCALE = (
    "BLEU, METEOR, ROUGE_L: fractions in [0, 1] (BLEU 0.6879 = 68.79 in papers); "
    "NIST: mteval-v13a scale (0 up, about 8-9 for good E2E systems); CIDEr: pycocoevalcap CIDEr-D scale (0-10)"
)


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
        print(
            "note: no java on PATH: METEOR and the tokenizer of METEOR/ROUGE_L/CIDEr are approximated (see --help)",
            flush=True,
        )
        return False
    try:
        subprocess.run(["java", "-version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        print("note: java does not run: METEOR and the tokenizer of METEOR/ROUGE_L/CIDEr are approximated", flush=True)
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
