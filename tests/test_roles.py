"""The roles of every mode and their options, as whole jobs on the in-process transport
(threads of this process; the same runner, handshake and outputs as under mpirun, no MPI).
What only MPI shows stays in test_mpi_runs.py, test_checkpoint.py and test_failures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_adapter, run_local, run_rows, run_summary
from peft import PeftModel
from test_model import FAMILIES
from transformers import AutoModelForCausalLM

from splitlora_mpi.config import load_config
from splitlora_mpi.data import packaged_data_paths, read_examples
from splitlora_mpi.run import checkpoint

STEPS = 8
EQUIV = [f"train.steps={STEPS}", "train.log_every=1", "train.aggregate_every=4", "train.eval_every=4",
         "train.warmup_steps=2"]  # fmt: skip
VAL_ROWS = len(read_examples(packaged_data_paths()[1], "e2e"))


def _run(tmp: Path, mode: str, clients: int, *sets: str) -> Path:
    return run_local(tmp / mode, clients, *EQUIV, f"run.mode={mode}", *sets)


def assert_same_training(a_dir: Path, b_dir: Path) -> None:
    """Equal step for step (losses rel 1e-5, tokens exactly) and in the exported adapter."""
    a, b = run_rows(a_dir), run_rows(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ra["tokens"] == rb["tokens"]
        if "val_loss" in rb:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    assert a[-1]["train_loss"] != a[0]["train_loss"]
    wa, wb = run_adapter(a_dir), run_adapter(b_dir)
    assert wa.keys() == wb.keys() and len(wa) == 4 * 2  # 4 blocks x c_attn x (A, B)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


def _val_losses(out: Path) -> list[float]:
    return [r["val_loss"] for r in run_rows(out) if "val_loss" in r]


@pytest.fixture(scope="module")
def central(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("central"), "central", 1)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The 2-client split every option is compared with."""
    return _run(tmp_path_factory.mktemp("plain"), "splitlora", 2)


@pytest.mark.parametrize("mode", ["splitlora", "sl", "fedlora"])
def test_one_client_equals_central(tmp_path, central, mode):
    assert_same_training(_run(tmp_path, mode, 1), central)


@pytest.mark.parametrize(
    "option", [["split.label_private=true"], ["comm.micro_batches=2"], ["split.server_update=sequential"]]
)
def test_options_with_one_client_equal_central(tmp_path, central, option):
    """Where the loss is computed, how a step is cut into micro-batches and whether the server
    steps per client change no number."""
    assert_same_training(_run(tmp_path, "splitlora", 1, *option), central)


def test_split_bytes_are_the_tensors_themselves(plain):
    """Per step and client: B x T x H x 4 activations up and gradients down (fp32), the mask
    and labels as int32; validation sends each client's share once per evaluation."""
    cfg, s = load_config(plain / "config.yaml"), run_summary(plain)
    b, t, h = cfg.train.batch_size, cfg.data.max_seq_len, cfg.model.config["n_embd"]
    rows = 2 * STEPS * b + 2 * VAL_ROWS  # 2 clients; evaluations at steps 4 and 8
    assert s["bytes"]["activations"] == rows * t * h * 4
    assert s["bytes"]["gradients"] == 2 * STEPS * b * t * h * 4
    assert s["bytes"]["labels"] == rows * 2 * t * 4
    adapter = s["client_trainable_params"]  # 2 FedAvg rounds: each client its adapter + weight in float64
    fedavg = 2 * 2 * (adapter + 1) * 8
    assert fedavg + adapter * 4 < s["bytes"]["adapters"] < fedavg + adapter * 4 + 4096  # + the pickled export


def test_sl_clients_take_turns(tmp_path):
    """2 clients, turns of 4 steps: each step's tokens are one client's batch, in turn order."""
    out = _run(tmp_path, "sl", 2)
    cfg, s, rows = load_config(out / "config.yaml"), run_summary(out), run_rows(out)
    per_step = [r["tokens"] - p["tokens"] for p, r in zip([{"tokens": 0}] + rows, rows)]
    assert s["tokens_by_client"] == {"1": sum(per_step[0:4]), "2": sum(per_step[4:8])}
    b, t, h = cfg.train.batch_size, cfg.data.max_seq_len, cfg.model.config["n_embd"]
    assert s["bytes"]["activations"] == (STEPS * b + 2 * VAL_ROWS) * t * h * 4  # one client per step, one evaluates
    assert s["bytes"]["gradients"] == STEPS * b * t * h * 4
    assert s["bytes"]["adapters"] > s["client_trainable_params"] * 4  # the handoff after step 4 and the export


def test_fedlora_clients_train_the_whole_model(tmp_path, central):
    out = _run(tmp_path, "fedlora", 2)
    s, whole = run_summary(out), run_summary(central)
    assert s["client_trainable_params"] == whole["client_trainable_params"] + whole["server_trainable_params"]
    assert s["server_trainable_params"] == 0
    assert run_adapter(out).keys() == run_adapter(central).keys()
    assert s["bytes"]["activations"] == s["bytes"]["gradients"] == s["bytes"]["labels"] == 0
    # 2 rounds x 3 ranks x one float64 buffer: [w * adapter, w, stop, (loss sum, targets, tokens) x 4 steps]
    assert s["bytes"]["adapters"] == 2 * 3 * (s["client_trainable_params"] + 2 + 3 * 4) * 8
    assert sum(s["tokens_by_client"].values()) == s["tokens"] == run_rows(out)[-1]["tokens"]


@pytest.mark.parametrize("wire, most", [("bfloat16", 0.51), ("int8", 0.27)])
def test_compressed_activations_cut_the_bytes_not_the_loss(tmp_path, plain, wire, most):
    small, full = run_summary(_run(tmp_path, "splitlora", 2, f"comm.activation_dtype={wire}")), run_summary(plain)
    for kind in ("activations", "gradients"):
        assert small["bytes"][kind] <= most * full["bytes"][kind], kind
    assert small["bytes"]["labels"] == full["bytes"]["labels"]
    assert small["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=0.02)
    assert small["final_val_loss"] != full["final_val_loss"]  # the wire format did change what was computed


def test_private_activations_change_training_not_the_wire(tmp_path, plain):
    """Clip + noise on the clients: the same bytes, another (noisier) model; the scale is reported."""
    out = _run(tmp_path, "splitlora", 2, "privacy.clip=0.5", "privacy.noise_multiplier=0.1")
    s, p = run_summary(out), run_summary(plain)
    assert s["privacy"] == {"clip": 0.5, "noise_std": pytest.approx(0.05)}
    assert s["bytes"]["activations"] == p["bytes"]["activations"]
    assert s["final_val_loss"] != p["final_val_loss"]
    assert s["final_val_loss"] == pytest.approx(p["final_val_loss"], rel=0.2)


def test_label_private_split_equals_the_plain_split(tmp_path, plain):
    """U-shaped: the clients keep the LM head. Same training as the plain split (2 clients),
    no label bytes, and the only activations on the wire are hidden states (B x T x H each way):
    no logits, which would be vocabulary-sized."""
    out = _run(tmp_path, "splitlora", 2, "split.label_private=true")
    assert_same_training(out, plain)
    s, p = run_summary(out), run_summary(plain)
    assert s["bytes"]["labels"] == 0 and p["bytes"]["labels"] > 0
    assert s["bytes"]["activations"] == 2 * p["bytes"]["activations"]  # up to the server and back to the tail
    assert s["bytes"]["gradients"] == 2 * p["bytes"]["gradients"]


def test_label_private_tail_blocks_in_sl_mode(tmp_path):
    """With tail_layers=1 the last block also lives on the clients: client and server hold 2
    blocks each of the 4, and the exported adapter still covers all of them."""
    out = _run(tmp_path, "sl", 2, "split.label_private=true", "split.tail_layers=1")
    s = run_summary(out)
    assert s["client_trainable_params"] == s["server_trainable_params"] > 0
    assert s["bytes"]["labels"] == 0
    assert {k.split(".h.")[1].split(".")[0] for k in run_adapter(out)} == {"0", "1", "2", "3"}
    vals = _val_losses(out)
    assert len(vals) == 2 and vals[-1] < vals[0]


def test_micro_batches_pipeline_the_same_training(tmp_path, plain):
    """comm.micro_batches=2: the same losses and adapters as whole batches, the same tensor
    bytes (the labels go first, the activations in two halves)."""
    out = _run(tmp_path, "splitlora", 2, "comm.micro_batches=2")
    assert_same_training(out, plain)
    s, p = run_summary(out), run_summary(plain)
    for kind in ("activations", "gradients", "labels"):
        assert s["bytes"][kind] == p["bytes"][kind], kind
    assert s["bytes"]["control"] > p["bytes"]["control"]  # one more header per micro-batch and direction


def test_clients_with_their_own_cut_points(tmp_path):
    """Cut points [1, 2]: client 2 runs block 1 itself, the server runs it for client 1. After
    each FedAvg every copy of a block is the same: block 0 on both clients, block 1 on client 2
    and the server (checked in the checkpoint of the last step)."""
    out = _run(tmp_path, "splitlora", 2, "split.client_layers=[1, 2]", f"checkpoint.every={STEPS}")
    vals = _val_losses(out)
    assert len(vals) == 2 and vals[-1] < vals[0]
    states = {r: checkpoint.from_bytes(checkpoint.rank_file(out, STEPS, r).read_bytes()) for r in (0, 1, 2)}
    server, near, far = (states[r]["role"]["trainer"]["adapter"] for r in (0, 1, 2))
    assert {k.split(".h.")[1][0] for k in near} == {"0"} and {k.split(".h.")[1][0] for k in far} == {"0", "1"}
    assert {k.split(".h.")[1][0] for k in server} == {"1", "2", "3"}
    for k in near:
        assert torch.equal(near[k], far[k]), k
    shared = [k for k in far if k in server]
    assert shared and all(torch.equal(far[k], server[k]) for k in shared)
    assert run_summary(out)["client_trainable_params"] == sum(v.numel() for v in far.values())
    assert run_adapter(out).keys() == {*far, *server}


@pytest.mark.parametrize(
    ("family", "dtype", "quantize"),
    [(f, "float32", "none") for f in sorted(set(FAMILIES) - {"gpt2"})]
    + [("gemma3_text", "bfloat16", "none"), ("llama", "float32", "int8"), ("gpt2", "bfloat16", "nf4")],
)  # gpt2 float32: the tests above
def test_one_client_equals_central_in_every_family(tmp_path, family, dtype, quantize):
    """A whole job on a tiny random model of each family: the split with one client trains
    exactly as central, step for step and in every adapter tensor (same threads, same batches);
    on a 16-bit and on an 8/4-bit frozen base too."""
    sets = [f"model.config={json.dumps(FAMILIES[family])}", "data.max_seq_len=64", "data.val_limit=8",
            "train.steps=4", "train.log_every=1", "train.aggregate_every=2", "train.eval_every=0",
            f"model.dtype={dtype}", f"model.quantize={quantize}"]  # fmt: skip
    split = run_local(tmp_path / "split", 1, *sets)
    central = run_local(tmp_path / "central", 1, *sets, "run.mode=central")
    rows, expected = run_rows(split), run_rows(central)
    assert [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows] == [
        (r["step"], r["train_loss"], r.get("val_loss")) for r in expected
    ]
    assert rows[-1]["train_loss"] != rows[0]["train_loss"]
    a, b = run_adapter(split), run_adapter(central)
    blocks = ".h." if family == "gpt2" else ".layers."
    assert a.keys() == b.keys() and any(f"{blocks}0." in k for k in a) and any(f"{blocks}2." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    out = _run(tmp_path, "splitlora", 2, f"model.name_or_path={model_dir}", f"model.tokenizer={model_dir}",
               "data.max_seq_len=64", "split.client_layers=1")  # fmt: skip
    assert not (out / "base").exists()  # the user has the base model already
    config_json = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    assert {n.split(".h.")[1][0] for n, _ in model.named_parameters() if "lora_A" in n} == {"0", "1"}


# ---------------------------------------------------------------- the end of a run


@pytest.mark.parametrize(("mode", "clients"), [("central", 1), ("splitlora", 2), ("sl", 2), ("fedlora", 2)])
def test_the_last_line_says_where_the_outputs_are_and_what_to_run_next(tmp_path, monkeypatch, capsys, mode, clients):
    """After everything is written; the out_dir as the user gave it (relative here)."""
    from splitlora_mpi.run.runner import run_in_process

    monkeypatch.chdir(tmp_path)
    sets = [f"run.out_dir=runs/{mode}", f"run.mode={mode}", "train.steps=2", "train.eval_every=0"]
    run_in_process(load_config(None, sets), clients)
    last = capsys.readouterr().out.splitlines()[-1]
    run = f"runs/{mode}"
    assert last == (
        f"done: adapter {run}/adapter, summary {run}/summary.json; next: python -m splitlora_mpi.evaluate {run} "
        f"or python -m splitlora_mpi.generate {run} --prompt 'name : The Punter | food : Indian | area : riverside'"
    )
    assert (tmp_path / run / "adapter" / "adapter_config.json").is_file()
    assert run_summary(tmp_path / run)["status"] == "complete"


@pytest.mark.parametrize(
    ("sets", "next_"),
    [
        (["data.format=chat", "run.name=talk"], "python -m splitlora_mpi.generate runs/talk --prompt 'Hello!'"),
        (
            ["data.format=jsonl", "run.out_dir=/tmp/my run"],
            "python -m splitlora_mpi.evaluate '/tmp/my run' "
            "--data v.jsonl or python -m splitlora_mpi.generate '/tmp/my run' --prompt TEXT",
        ),
        (
            ["data.format=jsonl", "data.train_path=t{client}.jsonl", "data.val_path=v{client}.jsonl"],
            "python -m splitlora_mpi.evaluate runs/splitlora --data FILE or python -m splitlora_mpi.generate "
            "runs/splitlora --prompt TEXT",
        ),
        (
            ["data.format=e2e", "data.train_path=t{client}.txt", "data.val_path=v{client}.txt"],
            "python -m splitlora_mpi.evaluate runs/splitlora --data FILE or python -m splitlora_mpi.generate "
            "runs/splitlora --prompt 'name : The Punter | food : Indian | area : riverside'",
        ),
        (
            ["data.format=e2e", "run.out_dir=out"],
            "python -m splitlora_mpi.evaluate out --data v.jsonl or "
            "python -m splitlora_mpi.generate out --prompt 'name : The Punter | food : Indian | area : riverside'",
        ),
    ],
)
def test_the_last_line_names_the_commands_of_the_data_format(sets, next_):
    """Chat runs cannot be scored; jsonl runs are evaluated on a file (their own validation file
    when there is one); paths are quoted for the shell."""
    from splitlora_mpi.run.outputs import done_line

    cfg = load_config(None, ["data.train_path=t.jsonl", "data.val_path=v.jsonl", *sets])
    assert done_line(cfg).split("; next: ")[1] == next_
