"""Real multi-rank runs: `mpirun` launches the installed package, under a hard timeout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_adapter, run_cmd, run_rows, run_summary, splitlora
from peft import PeftModel
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


def _assert_same_training(a_dir: Path, b_dir: Path) -> None:
    a, b = run_rows(a_dir), run_rows(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["tokens"] == rb["tokens"]
        if "val_loss" in rb:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    assert a[-1]["train_loss"] != a[0]["train_loss"]
    wa, wb = run_adapter(a_dir), run_adapter(b_dir)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


def test_split_with_one_client_equals_central(equivalence_runs):
    _assert_same_training(*equivalence_runs)


@pytest.mark.parametrize("mode", ["sl", "fedlora"])
def test_baselines_with_one_client_equal_central(tmp_path, central_run, mode):
    """One client: sl has nobody to take turns with, fedlora's average is the client itself."""
    _assert_same_training(_run(tmp_path, mode, 2), central_run)


def test_sl_clients_take_turns(tmp_path):
    """2 clients, turns of 4 steps: each step's tokens are one client's batch, in turn order."""
    out = _run(tmp_path, "sl", 3)
    cfg, s, rows = load_config(out / "config.yaml"), run_summary(out), run_rows(out)
    per_step = [r["tokens"] - p["tokens"] for p, r in zip([{"tokens": 0}] + rows, rows)]
    assert s["tokens_by_client"] == [sum(per_step[0:4]), sum(per_step[4:8])]
    b, t, h = cfg.train.batch_size, cfg.data.max_seq_len, cfg.model.config["n_embd"]
    val_rows = len(read_examples(packaged_data_paths()[1], "e2e"))
    assert s["bytes"]["activations"] == (8 * b + 2 * val_rows) * t * h * 4  # one client per step, one evaluates
    assert s["bytes"]["gradients"] == 8 * b * t * h * 4
    assert s["bytes"]["adapters"] > 0  # the handoff after step 4 and the final adapter


def test_fedlora_clients_train_the_whole_model(tmp_path, central_run):
    out = _run(tmp_path, "fedlora", 3)
    s, whole = run_summary(out), run_summary(central_run)
    assert s["client_trainable_params"] == whole["client_trainable_params"] + whole["server_trainable_params"]
    assert s["server_trainable_params"] == 0
    assert run_adapter(out).keys() == run_adapter(central_run).keys()
    assert s["bytes"]["activations"] == s["bytes"]["gradients"] == s["bytes"]["labels"] == 0
    # 2 rounds x 3 ranks x one float64 buffer: [w * adapter, w, stop, (loss sum, targets, tokens) x 4 steps]
    assert s["bytes"]["adapters"] == 2 * 3 * (s["client_trainable_params"] + 2 + 3 * 4) * 8
    assert sum(s["tokens_by_client"]) == s["tokens"] == run_rows(out)[-1]["tokens"]


@pytest.fixture(scope="module")
def wire_runs(tmp_path_factory) -> dict[str, Path]:
    """The same 2-client run with each wire format of activations and gradients."""
    return {w: _run(tmp_path_factory.mktemp(w), "splitlora", 3, "--set", f"comm.activation_dtype={w}")
            for w in ("float32", "bfloat16", "int8")}  # fmt: skip


@pytest.mark.parametrize("wire, most", [("bfloat16", 0.51), ("int8", 0.27)])
def test_compressed_activations_cut_the_bytes_not_the_loss(wire_runs, wire, most):
    plain, small = run_summary(wire_runs["float32"]), run_summary(wire_runs[wire])
    for kind in ("activations", "gradients"):
        assert small["bytes"][kind] <= most * plain["bytes"][kind], kind
    assert small["bytes"]["labels"] == plain["bytes"]["labels"]
    assert small["final_val_loss"] == pytest.approx(plain["final_val_loss"], rel=0.02)
    assert small["final_val_loss"] != plain["final_val_loss"]  # the wire format did change what was computed


def test_private_activations_change_training_not_the_wire(tmp_path, wire_runs):
    """Clip + noise on the clients: the same bytes, another (noisier) model; the scale is reported."""
    out = _run(tmp_path, "splitlora", 3, "--set", "privacy.clip=0.5", "--set", "privacy.noise_multiplier=0.1")
    s, plain = run_summary(out), run_summary(wire_runs["float32"])
    assert s["privacy"] == {"clip": 0.5, "noise_std": pytest.approx(0.05)}
    assert s["bytes"]["activations"] == plain["bytes"]["activations"]
    assert s["final_val_loss"] != plain["final_val_loss"] and s["final_val_loss"] == pytest.approx(
        plain["final_val_loss"], rel=0.2
    )


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


def test_split_mode_on_one_rank_explains_how_to_launch(tmp_path):
    r = run_cmd(splitlora(), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "mpirun -n" in r.stderr and "Traceback" not in r.stderr


def test_bad_config_under_mpirun_is_one_line_from_rank_0(tmp_path):
    r = run_cmd(splitlora("--set", "lora.r=0", ranks=3), cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lora.r" in lines[0]


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


def test_bad_client_data_is_reported_once_by_rank_0(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("name : A||A .\nthis line has no separator\n")
    r = run_cmd(splitlora("--set", f"data.train_path={bad}", ranks=3), cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{bad}:2" in lines[0] and "'||'" in lines[0]
    assert not (tmp_path / "runs" / "splitlora" / "metrics.jsonl").exists()


def test_llama_family_split_run(tmp_path):
    r = run_cmd(
        splitlora(
            "--set", "model.config={model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 3, "
            "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128}",
            "--set", "split.client_layers=2", "--set", "train.steps=6", "--set", "train.eval_every=0",
            "--set", "train.aggregate_every=3", "--set", "train.log_every=1",
            ranks=3,
        ),
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "splitlora"
    adapter = run_adapter(out)
    assert any(k.startswith("base_model.model.model.layers.0.") for k in adapter)  # client layers
    assert any(k.startswith("base_model.model.model.layers.2.") for k in adapter)  # server layer
    assert run_summary(out)["num_clients"] == 2 and len(run_rows(out)) == 6


def test_pretrained_local_model_and_bpe_tokenizer(tmp_path):
    """The real-model path: a saved GPT-2 directory and the GPT-2 BPE tokenizer from files."""
    import shutil

    from transformers import AutoConfig

    vocab = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-vocab"
    model_dir = tmp_path / "tiny-gpt2"
    model_dir.mkdir()
    shutil.copy(vocab / "encoder.json", model_dir / "vocab.json")
    shutil.copy(vocab / "vocab.bpe", model_dir / "merges.txt")
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    r = run_cmd(
        splitlora(
            "--set", f"model.name_or_path={model_dir}", "--set", f"model.tokenizer={model_dir}",
            "--set", "train.steps=4", "--set", "train.eval_every=0", "--set", "train.aggregate_every=2",
            "--set", "data.max_seq_len=64",
            ranks=3,
        ),
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "splitlora"
    assert not (out / "base").exists()  # the user has the base model already
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        model_dir
    )
    assert run_summary(out)["final_val_loss"] > 0 and model is not None


def test_label_private_split_equals_the_plain_split(tmp_path, wire_runs):
    """U-shaped: the clients keep the LM head. Same training as the plain split (2 clients),
    no label bytes, and the only activations on the wire are hidden states (B x T x H each way):
    no logits, which would be vocabulary-sized."""
    out = _run(tmp_path, "splitlora", 3, "--set", "split.label_private=true")
    plain = wire_runs["float32"]
    _assert_same_training(out, plain)
    s, p = run_summary(out), run_summary(plain)
    assert s["bytes"]["labels"] == 0 and p["bytes"]["labels"] > 0
    assert s["bytes"]["activations"] == 2 * p["bytes"]["activations"]  # up to the server and back to the tail
    assert s["bytes"]["gradients"] == 2 * p["bytes"]["gradients"]


def test_label_private_tail_blocks_in_sl_mode(tmp_path):
    """With tail_layers=1 the last block also lives on the clients: client and server hold 2
    blocks each of the 4, and the exported adapter still covers all of them."""
    out = _run(tmp_path, "sl", 3, "--set", "split.label_private=true", "--set", "split.tail_layers=1")
    s = run_summary(out)
    assert s["client_trainable_params"] == s["server_trainable_params"] > 0
    assert s["bytes"]["labels"] == 0
    blocks = {k.split(".h.")[1].split(".")[0] for k in run_adapter(out)}
    assert blocks == {"0", "1", "2", "3"}
    assert run_rows(out)[-1]["val_loss"] < run_rows(out)[0]["train_loss"]


def test_clients_with_their_own_cut_points(tmp_path):
    """Cut points [1, 2]: client 2 runs block 1 itself, the server runs it for client 1. After
    each FedAvg every copy of a block is the same: block 0 on both clients, block 1 on client 2
    and the server (checked in the checkpoint of the last step)."""
    from splitlora_mpi.run import checkpoint

    out = _run(tmp_path, "splitlora", 3, "--set", "split.client_layers=[1, 2]", "--set", "checkpoint.every=8")
    s, rows = run_summary(out), run_rows(out)
    assert rows[-1]["val_loss"] < rows[0]["train_loss"]
    states = {r: checkpoint.from_bytes(checkpoint.rank_file(out, 8, r).read_bytes()) for r in (0, 1, 2)}
    server = states[0]["server"]["trainer"]["adapter"]
    near, far = (states[r]["client"]["trainer"]["adapter"] for r in (1, 2))
    assert {k.split(".h.")[1][0] for k in near} == {"0"} and {k.split(".h.")[1][0] for k in far} == {"0", "1"}
    assert {k.split(".h.")[1][0] for k in server} == {"1", "2", "3"}
    for k in near:
        assert torch.equal(near[k], far[k]), k
    shared = [k for k in far if k in server]
    assert shared and all(torch.equal(far[k], server[k]) for k in shared)
    assert s["client_trainable_params"] == sum(v.numel() for v in far.values())
    assert run_adapter(out).keys() == {*far, *server}


def test_micro_batches_pipeline_the_same_training(tmp_path, wire_runs):
    """comm.micro_batches=2: the same losses and adapters as whole batches, the same tensor
    bytes (the labels go first, the activations in two halves)."""
    out = _run(tmp_path, "splitlora", 3, "--set", "comm.micro_batches=2")
    plain = wire_runs["float32"]
    _assert_same_training(out, plain)
    s, p = run_summary(out), run_summary(plain)
    for kind in ("activations", "gradients", "labels"):
        assert s["bytes"][kind] == p["bytes"][kind], kind
    assert s["bytes"]["control"] > p["bytes"]["control"]  # one more header per micro-batch and direction
