"""`python -m splitlora_mpi.evaluate`: the scores against the official E2E script, decoding, the CLI.

OFFICIAL holds what the E2E challenge's e2e-metrics script (measure_scores.py: mteval-v13a-sig.pl for
BLEU / NIST, the MS-COCO scripts with Java METEOR 1.5 for the rest) printed for the packaged validation
sample (25 MRs, 168 references) and three system outputs made here: `template` below, the first
reference of every MR, and empty lines.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitlora_mpi import decoding as dec
from splitlora_mpi import evaluate as ev
from splitlora_mpi import scores as sc
from splitlora_mpi.config import load_config
from splitlora_mpi.data import ByteTokenizer, packaged_data_paths, read_examples

OFFICIAL = {
    "template": {"BLEU": 0.5168, "NIST": 6.3488, "METEOR": 0.4116, "ROUGE_L": 0.6092, "CIDEr": 1.1057},
    "first_reference": {"BLEU": 1.0, "NIST": 10.9987, "METEOR": 1.0, "ROUGE_L": 1.0, "CIDEr": 2.6372},
    "empty": {"BLEU": 0.0, "NIST": 0.0, "METEOR": 0.0, "ROUGE_L": 0.0, "CIDEr": 0.0},
}
OFFICIAL_TOL = 6e-5  # the script prints 4 decimals


def template(mr: str) -> str:
    """A rule-based system output: every attribute of the MR in one fixed sentence pattern."""
    a = dict(part.split(" : ", 1) for part in mr.split(" | "))
    words = [a["name"], "is a", a.get("Type", "place")]
    if "food" in a:
        words += ["serving", a["food"], "food"]
    if "area" in a:
        words += ["in the", a["area"]]
    if "near" in a:
        words += ["near", a["near"]]
    words.append(".")
    if "price" in a:
        words += ["Its prices are", a["price"], "."]
    if "customer rating" in a:
        words += ["It has a", a["customer rating"], "customer rating ."]
    if "family friendly" in a:
        words += ["It is", "" if a["family friendly"] == "yes" else "not", "family-friendly ."]
    return " ".join(w for w in words if w)


@pytest.fixture(scope="module")
def sample() -> tuple[list[str], list[list[str]]]:
    mrs, refs = dec.group_references(read_examples(packaged_data_paths()[1], "e2e"))
    assert (len(mrs), sum(map(len, refs))) == (25, 168)
    return mrs, refs


def systems(mrs: list[str], refs: list[list[str]]) -> dict[str, list[str]]:
    return {
        "template": [template(m) for m in mrs],
        "first_reference": [r[0] for r in refs],
        "empty": [""] * len(mrs),
    }


def assert_scores(got: dict[str, float], want: dict[str, float], tol: float, skip: tuple[str, ...] = ()) -> None:
    assert set(got) == set(sc.METRICS)
    for metric in sc.METRICS:
        if metric not in skip:
            assert got[metric] == pytest.approx(want[metric], abs=tol), metric


# ---------------------------------------------------------------- scores


def test_scores_equal_the_official_e2e_script(sample):
    mrs, refs = sample
    scores = sc.score_corpora(systems(mrs, refs), refs, java=True)
    for system, want in OFFICIAL.items():
        assert_scores(scores[system], want, OFFICIAL_TOL)


def test_pure_python_scores(sample):
    """Without Java: BLEU / NIST are unchanged, the Treebank tokenizer gives the official ROUGE_L / CIDEr on
    this sample, and METEOR is nltk's exact + stem variant (another scale: 0.7266, not 0.4116)."""
    mrs, refs = sample
    scores = sc.score_corpora(systems(mrs, refs), refs, java=False)
    for system, want in OFFICIAL.items():
        assert_scores(scores[system], want, OFFICIAL_TOL, skip=("METEOR",))
    assert scores["template"]["METEOR"] == pytest.approx(0.7266, abs=1e-4)
    assert scores["first_reference"]["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert scores["empty"]["METEOR"] == 0.0


def test_nist_by_hand():
    """One MR, reference 'a b': info(a) = info(b) = log2(2/1) = 1, info('a b') = log2(1/1) = 0."""
    assert sc.nist(["a b"], [["a b"]]) == pytest.approx(1.0)  # (1 + 1) / 2 unigrams + 0 / 1 bigram
    beta = -math.log(0.5) / math.log(1.5) ** 2  # half the reference length: NIST's length penalty
    assert sc.nist(["a"], [["a b"]]) == pytest.approx(math.exp(-beta * math.log(0.5) ** 2))
    assert sc.nist(["A B"], [["a b"]]) == pytest.approx(1.0)  # lowercased, like mteval


def test_cider_and_rouge_by_hand():
    """Two MRs, one reference each. CIDEr-D: n-grams in both references weigh log(2/2) = 0, so MR 1
    scores 10 * (1 + 1 + 1 + 0) / 4 (no 4-grams) = 7.5 and MR 2 nothing: 3.75. ROUGE-L: (1 + 0) / 2."""
    scores = sc.score_corpus(["cafe bar pub", "zoo yard"], [["cafe bar pub"], ["cafe bar inn"]], java=False)
    assert scores["CIDEr"] == pytest.approx(3.75)
    assert scores["ROUGE_L"] == pytest.approx(0.5)


def test_references_file_format(sample):
    mrs, refs = sample
    text = dec.references_text(refs[:2])
    blocks = text.split("\n\n")
    assert [b.splitlines() for b in blocks] == refs[:2]
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_continuation_text_cuts_at_eos_and_keeps_one_line():
    tok = ByteTokenizer()
    ids = tok.encode(" The Punter\nis  cheap ") + [tok.eos_token_id] + tok.encode("junk") + [tok.pad_token_id]
    assert dec.continuation_text(tok, ids) == "The Punter is cheap"


# ---------------------------------------------------------------- decoding


def tiny_gpt2(n_positions: int = 128, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=n_positions, vocab_size=258,
                        eos_token_id=256, pad_token_id=257, bos_token_id=256)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # large weights: clear argmax margins, so batching noise cannot flip a token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    return model


def test_batched_left_padded_decoding_equals_one_by_one():
    model, tok = tiny_gpt2(), ByteTokenizer()
    prompts = [tok.encode(p + " ||") for p in ("name : Aromi", "name : The Cricketers | area : riverside", "x")]
    for beams in (1, 2):
        batched = dec.generate(model, tok, prompts, 128, 12, beams, 0)
        alone = [dec.generate(model, tok, [p], 128, 12, beams, 0)[0] for p in prompts]
        assert batched == alone
        assert any(batched)


def test_long_prompt_keeps_its_first_tokens_within_max_seq_len():
    """32 positions: a 40-token prompt would overflow the position table; it keeps 32 - 8 tokens."""
    model, tok = tiny_gpt2(n_positions=32), ByteTokenizer()
    prompt = list(range(65, 105))
    assert dec.generate(model, tok, [prompt], 32, 8, 2, 0) == dec.generate(model, tok, [prompt[:24]], 32, 8, 2, 0)


# ---------------------------------------------------------------- the command


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """What training leaves behind, made without mpirun: base/, adapter/, config.yaml."""
    from peft import LoraConfig, get_peft_model

    run = tmp_path / "run"
    model = tiny_gpt2()
    model.save_pretrained(run / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    peft_model.save_pretrained(run / "adapter")
    cfg = load_config(None, ["model.tokenizer=byte", "data.max_seq_len=128"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


def evaluate_cmd(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "splitlora_mpi.evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_command_writes_predictions_references_and_scores(run_dir, sample):
    mrs, refs = sample
    done = evaluate_cmd(str(run_dir), "--limit", "5", "--max-new-tokens", "8", "--beams", "2")
    assert done.returncode == 0, done.stderr
    assert "greedy: 5/5 MRs (100%)" in done.stdout and "beam: 5/5 MRs (100%)" in done.stdout
    out = run_dir / "eval"
    for decoding in ("greedy", "beam"):
        lines = (out / f"predictions_{decoding}.txt").read_text().split("\n")
        assert len(lines) == 6 and lines[-1] == ""  # 5 lines, newline-terminated
    assert (out / "references.txt").read_text() == dec.references_text(refs[:5])
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n_mrs"] == 5 and scores["n_references"] == sum(len(r) for r in refs[:5])
    assert scores["limit"] == 5 and Path(scores["data"]) == packaged_data_paths()[1].resolve()
    assert scores["overlap_with_train"] == 0 and "warning" not in done.stdout
    assert "meteor_note" in scores and "scale" in scores
    for decoding in ("greedy", "beam"):
        s = scores[decoding]
        assert set(s) == set(sc.METRICS)
        assert all(0.0 <= s[m] <= 1.0 for m in ("BLEU", "METEOR", "ROUGE_L")), s
        assert 0.0 <= s["CIDEr"] <= 10.0 and s["NIST"] >= 0.0, s
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temp files


def test_bad_run_dir_is_one_line_and_exit_2(tmp_path):
    done = evaluate_cmd(str(tmp_path / "nope"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: run directory")
    assert "nope" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_adapter", "no adapter/adapter_config.json"),
        ("missing_base", "does not exist"),
        ("missing_data", "not found"),
        ("limit_0", "--limit: expected an integer ≥ 1, got 0"),
        ("beams_0", "--beams: expected an integer ≥ 1, got 0"),
        ("client_val_path", "data.val_path /d/val-{client}.txt names each client's own file"),
        ("gone_val_path", "data.val_path /gone/val.txt is not a file here"),
        ("bad_csv", "data.csv:3: empty ref"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, case, expected):
    args = [str(run_dir)]
    if case == "client_val_path":
        _set_run_data(run_dir, "data.train_path=/d/train-{client}.txt", "data.val_path=/d/val-{client}.txt")
    elif case == "gone_val_path":
        _set_run_data(run_dir, "data.val_path=/gone/val.txt")
    elif case == "bad_csv":
        (run_dir / "data.csv").write_text('mr,ref\n"name[A], area[x]",A is in x.\nname[B], \n')
        args += ["--data", str(run_dir / "data.csv")]
    elif case == "no_adapter":
        (run_dir / "adapter" / "adapter_config.json").unlink()
    elif case == "missing_base":  # no base/, and the adapter names a base directory that is gone
        (run_dir / "base" / "config.json").unlink()
        conf = run_dir / "adapter" / "adapter_config.json"
        conf.write_text(json.dumps({**json.loads(conf.read_text()), "base_model_name_or_path": "/gone/base"}))
    elif case == "missing_data":
        args += ["--data", str(run_dir / "test.txt")]
    elif case == "limit_0":
        args += ["--limit", "0"]
    else:
        args += ["--beams", "0"]
    assert ev.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (run_dir / "eval").exists()


def _set_run_data(run: Path, *sets: str) -> None:
    cfg = load_config(None, ["model.tokenizer=byte", "data.max_seq_len=128", *sets])
    (run / "config.yaml").write_text(cfg.to_yaml())


def _evaluate(run: Path, capsys, *args: str) -> tuple[str, dict]:
    """A quick evaluation in this process: (its stdout, scores.json)."""
    fast = ["--decoding", "greedy", "--max-new-tokens", "4", "--pure-python"]
    assert ev.main([str(run), *fast, *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out, json.loads((run / "eval" / "scores.json").read_text())


def test_default_data_is_the_runs_validation_file_and_overlap_is_reported(run_dir, capsys):
    val, train = run_dir / "val.txt", run_dir / "train.txt"
    val.write_text("name : A||A .\nname : B||B .\nname : B||B too .\nname : C||C .\n")
    train.write_text("name : Z||Z .\nname : B||B again .\n")
    _set_run_data(run_dir, f"data.train_path={train}", f"data.val_path={val}")
    out, scores = _evaluate(run_dir, capsys)
    assert Path(scores["data"]) == val.resolve() and scores["n_mrs"] == 3 and scores["n_references"] == 4
    assert scores["overlap_with_train"] == 1
    warning = f"warning: 1 of 3 MRs in {val} are also in the training data ({run_dir}'s data.train_path {train})\n"
    assert warning in out, out
    out, scores = _evaluate(run_dir, capsys, "--data", str(train))  # scoring on the training file: all of it
    assert scores["overlap_with_train"] == 2 and f"warning: 2 of 2 MRs in {train}" in out


def test_the_packaged_held_out_sample_never_overlaps_but_a_csv_of_training_mrs_does(run_dir, capsys):
    """Default data (null = packaged): 0 of 25 MRs overlap. The official CSV notation of a packaged
    training MR (`familyFriendly[no]` for `family friendly : no`) is recognised as the same MR."""
    out, scores = _evaluate(run_dir, capsys)
    assert scores["n_mrs"] == 25 and scores["overlap_with_train"] == 0 and "warning" not in out
    csv_file = run_dir / "devset.csv"
    rows = [
        'mr,ref\n"name[Alimentum], area[city centre], familyFriendly[no]",',
        '"Alimentum, in the city centre, is not family-friendly."\n',
        '"name[Nowhere], area[riverside]",Nowhere is by the river.\n',
    ]
    csv_file.write_text("".join(rows))
    out, scores = _evaluate(run_dir, capsys, "--data", str(csv_file))
    assert scores["n_mrs"] == 2 and scores["overlap_with_train"] == 1
    assert f"warning: 1 of 2 MRs in {csv_file} are also in the training data ({run_dir}'s data.train_path null" in out


def test_unknown_option_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        ev.main(["run", "--decoding", "sampling"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --decoding")
