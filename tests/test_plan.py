"""The planner (`python -m splitlora_mpi.plan`) against what the job really holds and sends:
parameter counts of the built sides, the bytes a real run counts per step, memory measured on
a real step, a Llama-3-8B-shaped config planned on the meta device, and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import run_local, run_rows, run_summary

from splitlora_mpi import plan
from splitlora_mpi.config import load_config
from splitlora_mpi.data import Batch
from splitlora_mpi.model import SplitPart, hf_config
from splitlora_mpi.quantize import footprint
from splitlora_mpi.roles.client import side_channel
from splitlora_mpi.training import PartTrainer, lm_loss_sum
from splitlora_mpi.wire import HEADER_BYTES
from splitlora_mpi.wire.messages import Channel, GradientReply, Upload

CPU = torch.device("cpu")
# tiny random families as in test_model.py (GPT-2: tied head, learned positions; Llama: untied, rotary)
FAMILIES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 2, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
}  # fmt: skip
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}  # fmt: skip


def _job(family: str, *sets: str):
    cfg = load_config(overrides=["data.max_seq_len=64", *sets])
    cfg.model.config = dict(FAMILIES[family])
    return cfg, hf_config(cfg, 258, 256, 257)


def _plan(capsys, *argv: str) -> dict:
    capsys.readouterr()  # (what ran before)
    assert plan.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("dtype", "quantize"), [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "nf4")]
)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_counts_equal_the_built_sides(tmp_path, capsys, family, dtype, quantize):
    table_8bit = quantize != "none"  # (with an 8-bit client embedding table)
    for k in (1, 2):
        sets = [f"split.client_layers={k}", f"model.dtype={dtype}", f"model.quantize={quantize}"]
        cfg, config = _job(family, *sets, f"model.client_embedding_8bit={table_8bit}")
        config.save_pretrained(tmp_path)
        argv = ["--model", str(tmp_path), "--client-layers", str(k), "--dtype", dtype, "--quantize", quantize]
        got = _plan(capsys, *argv, "--seq", "64", *(["--client-embedding-8bit"] if table_8bit else []))["cuts"]
        assert [row["client_layers"] for row in got] == [k]
        for role in ("client", "server"):
            part = SplitPart(cfg, config, role, CPU)
            planned = got[0][role]
            assert (planned["frozen_params"], planned["base_bytes"]) == footprint(part.lm), (role, k)
            assert planned["lora_params"] == part.trainable_numel() > 0, (role, k)
            assert planned["lora_state_bytes"] == 16 * part.trainable_numel()


def test_wire_bytes_equal_what_a_run_counts(tmp_path, capsys):
    """One client, float32 wire: step 2 alone (no FedAvg, no validation, the handshake was in
    step 1's row) moves exactly the planned up + down; gradients are the down payload each step."""
    out = run_local(tmp_path / "run", 1, "train.steps=3", "train.log_every=1", "train.eval_every=0",
                    "data.val_limit=8", "train.aggregate_every=10")  # fmt: skip
    cfg, rows, summary = load_config(out / "config.yaml"), run_rows(out), run_summary(out)
    hf_config(cfg, 258, 256, 257).save_pretrained(tmp_path / "model")
    b, t = cfg.train.batch_size, cfg.data.max_seq_len  # every row padded / truncated to t tokens
    got = _plan(capsys, "--model", str(tmp_path / "model"), "--client-layers", str(cfg.split.client_layers),
                "--batch", str(b), "--seq", str(t))["cuts"][0]  # fmt: skip
    assert rows[1]["tokens"] - rows[0]["tokens"] == b * t
    assert rows[1]["sent_bytes"] - rows[0]["sent_bytes"] == got["up_bytes"] + got["down_bytes"]
    assert summary["bytes"]["gradients"] == cfg.train.steps * (got["down_bytes"] - HEADER_BYTES)


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "float16", "int8"])
def test_wire_bytes_are_the_channels_framing(wire):
    """Every wire dtype: the planned bytes are what the Channel encodes an Upload and a
    GradientReply into (the real run above shows the transport counts exactly those)."""
    b, t, h = 3, 16, 32
    channel = Channel(None, wire, torch.float32, CPU)  # type: ignore[arg-type]  (encoding only)
    ids = torch.ones(b, t, dtype=torch.long)
    side = side_channel(Batch(ids, ids, ids))
    framed = [channel.encode(r) for r in (Upload(torch.randn(b, t, h), side), GradientReply(torch.randn(b, t, h)))]
    counted = [sum(x.numel() * x.element_size() + HEADER_BYTES for x, _ in tensors) for tensors in framed]
    assert list(plan.wire_bytes(plan.Workload(b, t, 1, wire), h)) == counted


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama3") / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    return path


def test_llama3_8b_plans_in_seconds_and_recommends_a_cut_that_fits(llama3, capsys):
    start = time.perf_counter()
    got = _plan(capsys, "--model", str(llama3), "--client-memory", "2GiB", "--dtype", "bfloat16",
                "--client-embedding-8bit", "--seq", "512", "--link", "20Mbit")  # fmt: skip
    assert time.perf_counter() - start < 10  # (imports done by earlier tests; ~1 s on 2 cores)
    assert got["model"]["params"] == 8_030_261_248 and got["model"]["blocks"] == 32
    cuts = {row["client_layers"]: row for row in got["cuts"]}
    assert sorted(cuts) == list(range(1, 32))
    k, memory = got["recommended"], 2 * 2**30
    assert k is not None and cuts[k]["client"]["total_bytes"] <= memory < cuts[k + 1]["client"]["total_bytes"]
    for row in cuts.values():  # the whole model on the two sides: untied, nothing counted twice
        assert row["client"]["frozen_params"] + row["server"]["frozen_params"] == 8_030_261_248
    up = 4 * 512 * 4096 * 4 + 2 * 4 * 512 * 4 + 2 * HEADER_BYTES
    assert cuts[k]["up_bytes"] == up and cuts[k]["link_s"] == pytest.approx((2 * up - 8 * 4 * 512) * 8 / 20e6)
    argv = ["--model", str(llama3), "--client-memory", "2GiB", "--dtype", "bfloat16", "--server-quantize", "nf4",
            "--client-quantize", "int8", "--client-embedding-8bit"]  # fmt: skip
    assert plan.main(argv) == 0
    table = capsys.readouterr().out
    assert "fits" in table.splitlines()[4] and "recommended: K=" in table
    sets = table.rsplit(": ", 1)[1].split()[1::2]  # the job's own keys: they load as they are
    cfg = load_config(overrides=sets)
    assert cfg.model.precision("client") == ("bfloat16", "int8")
    assert cfg.model.precision("server") == ("bfloat16", "nf4")
    assert cfg.model.client_embedding_8bit and cfg.split.client_layers >= k


def test_a_client_too_small_for_any_cut_is_told_so(llama3, capsys):
    assert plan.main(["--model", str(llama3), "--client-memory", "512MiB", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "no cut fits a client with 512MiB" in out and "recommended" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "{tmp}/nope"], "--model {tmp}/nope: not found; expected a model directory with config.json"),
        (["--client-memory", "2 lots"], "--client-memory '2 lots': expected a size such as 2GiB"),
        (["--client-layers", "32"], "--client-layers: expected 1..31 (the model has 32 blocks), got 32"),
        (["--client-layers", "2", "--client-memory", "2GiB"], "--client-memory: not allowed with argument"),
        (["--link", "fast"], "--link 'fast': expected a positive rate such as 20Mbit"),
        (["--batch", "0"], "--batch: expected a positive integer, got '0'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, llama3, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--model" not in argv:
        argv = ["--model", str(llama3), *argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(plan.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err


def _measured(part: SplitPart, run) -> tuple[int, int]:
    """(activation bytes autograd saved during `run`, bytes of the part's weights, LoRA grads and
    AdamW state after one optimizer step). Saved tensors: unique storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in part.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    trainer = PartTrainer(part, load_config().train)
    out.backward(torch.ones_like(out) if out.dim() else None)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in part.trainable_parameters())
    trainer.step()
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim()]  # (not the step counts)
    held = sum(p.numel() * p.element_size() for p in part.parameters()) + grads
    held += sum(t.numel() * t.element_size() for t in state)
    return sum(saved.values()) + (out.numel() * out.element_size() if out.dim() else 0), held


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_memory_within_15_percent_of_a_real_step(tmp_path, capsys, family, dtype):
    """A real client and server on batch x seq tokens: activations saved for backward (the
    client's cut output, held for the gradient, included), weights, LoRA grads, AdamW state."""
    b, t = 4, 64
    cfg, config = _job(family, f"model.dtype={dtype}")
    config.save_pretrained(tmp_path)
    got = _plan(capsys, "--model", str(tmp_path), "--client-layers", "1", "--dtype", dtype, "--batch", str(b),
                "--seq", str(t))["cuts"][0]  # fmt: skip
    client, server = SplitPart(cfg, config, "client", CPU), SplitPart(cfg, config, "server", CPU)
    ids = torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, t // 2 :] = 0  # padding, as the job pads rows to data.max_seq_len
    h = client(ids, mask).detach().requires_grad_()
    runs = {"client": lambda: client(ids, mask), "server": lambda: lm_loss_sum(server(h, mask), ids, 0.1)[0]}
    for role, part in (("client", client), ("server", server)):
        activations, held = _measured(part, runs[role])
        planned = got[role]
        assert planned["activation_bytes"] == pytest.approx(activations, rel=0.15), role
        assert planned["total_bytes"] == pytest.approx(activations + held, rel=0.15), role
