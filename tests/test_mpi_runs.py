"""Real multi-rank runs: `mpirun` launches the installed package, under a hard timeout. Only
what MPI shows: one client of each mode equals central over the real wire, exact byte
counts, the export, the README's 9-rank default, launch errors and the handshake. The roles'
options run in-process (test_roles.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import MPIRUN, run_cmd, run_rows, run_summary, splitlora
from peft import PeftModel
from test_roles import assert_same_training
from transformers import AutoModelForCausalLM

from splitlora_mpi.config import load_config
from splitlora_mpi.data import encode_examples, load_tokenizer, make_batch, packaged_data_paths, read_examples
from splitlora_mpi.training import lm_loss_sum

EQUIV = ["--set", "train.steps=8", "--set", "train.log_every=1", "--set", "train.aggregate_every=4",
         "--set", "train.eval_every=4", "--set", "train.warmup_steps=2"]  # fmt: skip


def _run(tmp: Path, mode: str, ranks: int | None, *extra: str) -> Path:
    r = run_cmd(splitlora(*EQUIV, "--set", f"run.mode={mode}", "--set", f"run.out_dir={mode}", *extra, ranks=ranks),
                cwd=tmp, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / mode


@pytest.fixture(scope="module")
def central_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("central"), "central", None)


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, central_run) -> tuple[Path, Path]:
    """The same config twice: 1 server + 1 client over MPI, and the central baseline."""
    return _run(tmp_path_factory.mktemp("equiv"), "splitlora", 2), central_run


def test_split_with_one_client_equals_central(equivalence_runs):
    assert_same_training(*equivalence_runs)


@pytest.mark.parametrize("mode", ["sl", "fedlora"])
def test_baselines_with_one_client_equal_central(tmp_path, central_run, mode):
    """One client: sl has nobody to take turns with, fedlora's average is the client itself."""
    assert_same_training(_run(tmp_path, mode, 2), central_run)


def test_outputs_and_summary_keys(equivalence_runs):
    split, _ = equivalence_runs
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "base/config.json",
        "base/model.safetensors",
    ):
        assert (split / name).is_file(), name
    s = run_summary(split)
    assert s["mode"] == "splitlora" and s["world_size"] == 2 and s["num_clients"] == 1 and s["steps"] == 8
    assert set(s["bytes"]) == {"activations", "gradients", "labels", "adapters", "control"}
    assert s["tokens"] == run_rows(split)[-1]["tokens"] and s["tokens_per_s"] > 0
    assert s["client_trainable_params"] > 0 and s["server_trainable_params"] > 0
    assert s["peak_rss_mb"]["server"] > 0 and s["peak_rss_mb"]["client_max"] > 0
    phases = {"launch", "preflight", "import", "build", "handshake", "total"}
    assert set(s["startup_s"]) == {"0", "1"} and all(set(v) == phases for v in s["startup_s"].values())
    assert all(v["import"] > 0 and v["total"] == pytest.approx(sum(v.values()) - v["total"], abs=0.01)
               for v in s["startup_s"].values())  # fmt: skip
    assert load_config(split / "config.yaml").train.steps == 8


def test_activation_bytes_are_the_tensors_themselves(equivalence_runs):
    """Bytes on the wire per step = B x T x H x 4 each way (fp32), nothing more."""
    split, _ = equivalence_runs
    cfg = load_config(split / "config.yaml")
    s = run_summary(split)
    b, t, h = cfg.train.batch_size, cfg.data.max_seq_len, cfg.model.config["n_embd"]
    val_rows = len(read_examples(packaged_data_paths()[1], "e2e"))
    evals = 2  # steps 4 and 8
    up = (cfg.train.steps * b + evals * val_rows) * t * h * 4
    assert s["bytes"]["activations"] == up
    assert s["bytes"]["gradients"] == cfg.train.steps * b * t * h * 4
    assert s["bytes"]["labels"] == (cfg.train.steps * b + evals * val_rows) * 2 * t * 4


def test_exported_adapter_reproduces_final_val_loss(equivalence_runs):
    split, _ = equivalence_runs
    cfg = load_config(split / "config.yaml")
    base = AutoModelForCausalLM.from_pretrained(split / "base")
    model = PeftModel.from_pretrained(base, split / "adapter").eval()
    tok = load_tokenizer(cfg.model.tokenizer)
    val = encode_examples(read_examples(packaged_data_paths()[1], "e2e"), tok, cfg.data.max_seq_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), 16):
            batch = make_batch(val, list(range(start, min(start + 16, len(val)))))
            loss_sum, n = lm_loss_sum(
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels
            )
            total, count = total + float(loss_sum), count + n
    assert total / count == pytest.approx(run_summary(split)["final_val_loss"], rel=1e-5)


def test_default_nine_rank_run_learns(tmp_path):
    """The bare command of the README (1 server + 8 clients), shortened to 40 steps."""
    r = run_cmd(
        splitlora("--set", "train.steps=40", "--set", "train.eval_every=20", ranks=9), cwd=tmp_path, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "splitlora"
    rows = run_rows(out)
    s = run_summary(out)
    assert s["num_clients"] == 8 and s["world_size"] == 9
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
    vals = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert "step    40/40" in r.stdout
    # another mode after it writes a directory of its own: both runs stay intact
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    r = run_cmd(splitlora("--set", "run.mode=central", "--set", "train.steps=5"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert run_summary(tmp_path / "runs" / "central")["mode"] == "central"
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before


def test_split_mode_on_one_rank_explains_how_to_launch(tmp_path):
    r = run_cmd(splitlora(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "mpirun -n" in r.stderr and "Traceback" not in r.stderr


def test_handshake_refuses_a_client_with_another_config(tmp_path):
    import sys

    from conftest import MPIRUN

    cmd = [
        MPIRUN,
        "-n",
        "2",
        sys.executable,
        "-m",
        "splitlora_mpi",
        ":",
        "-n",
        "1",
        sys.executable,
        "-m",
        "splitlora_mpi",
        "--set",
        "lora.r=8",
    ]
    r = run_cmd(cmd, cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lora.r" in lines[0] and "rank 2" in lines[0]
    assert not (tmp_path / "runs" / "splitlora" / "summary.json").exists()


def _word_tokenizer(out: Path, chat_template: str | None = None) -> None:
    """A small word-level tokenizer over the packaged sample's words, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ex in read_examples(packaged_data_paths()[0], "e2e") for w in
                    f"{ex.prompt} || {ex.completion}".split()})  # fmt: skip
    vocab = {w: i for i, w in enumerate(["[UNK]", "<eos>", *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="[UNK]")
    tok.chat_template = chat_template
    tok.save_pretrained(out)


def test_handshake_refuses_a_client_with_another_tokenizer(tmp_path):
    """The same config and tokenizer path on every rank, but rank 2's files differ only in the
    chat template (as on a node provisioned apart): refused by name before step 1, exit 2."""
    import sys

    from conftest import MPIRUN

    for host, template in (("a", None), ("b", "{% for m in messages %}{{ m.content }}{% endfor %}")):
        _word_tokenizer(tmp_path / host / "tok", template)
    args = [
        sys.executable,
        "-m",
        "splitlora_mpi",
        "--set",
        "model.tokenizer=./tok",
        "--set",
        f"run.out_dir={tmp_path}/run",
    ]
    cmd = [MPIRUN, "-n", "2", "-wdir", str(tmp_path / "a"), *args, ":", "-n", "1", "-wdir", str(tmp_path / "b"), *args]
    r = run_cmd(cmd, cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "rank 2's tokenizer differs from the server's" in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_per_client_facts_are_keyed_by_rank_whatever_order_the_clients_finish_in(tmp_path):
    """sl, 2 clients in turns of 4 steps (each step's tokens are its turn's client's), and the
    clients' end-of-run statistics held back to reach rank 0 in reverse rank order."""
    late = str(Path(__file__).with_name("reverse_finish.py"))
    r = run_cmd([MPIRUN, "-n", "3", sys.executable, late, *EQUIV, "--set", "run.mode=sl", "--set", "run.out_dir=sl",
                 "--set", "model.config.n_positions=512", "--set", "data.max_seq_len=512"],  # rows untruncated
                cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    s, rows = run_summary(tmp_path / "sl"), run_rows(tmp_path / "sl")
    per_step = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + rows, rows)]
    assert sum(per_step[0:4]) != sum(per_step[4:8])  # (the check below can tell the clients apart)
    assert s["tokens_by_client"] == {"1": sum(per_step[0:4]), "2": sum(per_step[4:8])}
    for fact in ("tokens_by_client", "peak_rss_mb_by_client", "examples_by_client"):
        assert list(s[fact]) == ["1", "2"], (fact, s[fact])
    for fact in ("startup_s", "model_parts"):
        assert list(s[fact]) == ["0", "1", "2"], (fact, s[fact])
