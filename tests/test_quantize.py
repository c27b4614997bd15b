"""A side's frozen base in fewer bits (bitsandbytes): the blocks' linear layers in int8 / nf4, a
client's embedding table in 8 bits, per-side precision; LoRA stays float32 and the exported
adapter is a plain PEFT adapter for the float base. (One client == central on a quantized base:
test_roles.py; planned bytes == held bytes: test_plan.py.)"""

from __future__ import annotations

import sys

import bitsandbytes
import pytest
import torch
from peft import PeftModel
from test_model import CPU, GPT2, LLAMA, _batch, _cfg, _loss, _randomise_lora_b
from torch import nn
from transformers.pytorch_utils import Conv1D

from splitlora_mpi.errors import ConfigError
from splitlora_mpi.model import SplitPart, build_base, export_adapter
from splitlora_mpi.quantize import footprint

# relative error of a quantized side's output against the float side (same weights, same input)
TOLERANCE = {"int8": 0.02, "nf4": 0.15}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("model_config", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_a_quantized_side_is_the_float_side_in_fewer_bits(model_config, quantize):
    cfg, config = _cfg(model_config)
    qcfg, _ = _cfg(model_config, f"model.quantize={quantize}")
    float_client, client = SplitPart(cfg, config, "client", CPU), SplitPart(qcfg, config, "client", CPU)
    bnb = (bitsandbytes.nn.Linear8bitLt, bitsandbytes.nn.Linear4bit)
    linears = [m for m in client.lm.modules() if type(m) in bnb]  # (not PEFT's wrappers)
    plain = [n for n, m in float_client.lm.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and "lora_" not in n]
    assert len(linears) == len(plain) > 0  # every linear layer of its one block, GPT-2's Conv1D included
    assert all(p.dtype == torch.float32 for p in client.trainable_parameters())
    held = footprint(client.lm)
    ids, mask, _ = _batch()
    assert _rel(client(ids, mask), float_client(ids, mask)) < TOLERANCE[quantize]
    values, nbytes = footprint(client.lm)
    assert (values, nbytes) == held  # (LLM.int8 moves its scales at the first forward: still counted)
    float_values, float_bytes = footprint(float_client.lm)
    assert values == float_values and nbytes < float_bytes


def test_gradients_flow_through_a_4bit_side_after_a_validation_pass():
    """bitsandbytes repacks 4-bit weights for inference in eval() mode on AVX512-BF16 CPUs, after
    which no gradient reaches the input: validation runs in train mode without gradients."""
    cfg, config = _cfg(LLAMA, "model.quantize=nf4", "model.dtype=bfloat16")
    server = SplitPart(cfg, config, "server", CPU)
    _randomise_lora_b(server)
    ids, mask, labels = _batch()
    h = torch.randn(*ids.shape, 32, dtype=torch.bfloat16)

    def input_grad() -> torch.Tensor:
        x = h.clone().requires_grad_()
        _loss(server(x, mask).float(), labels).backward()
        return x.grad

    before = input_grad()
    with torch.no_grad():
        server(h, mask)  # (what a validation pass does)
    assert before.abs().sum() > 0 and torch.equal(input_grad(), before)


def test_an_8bit_embedding_table_on_a_client():
    cfg, config = _cfg(LLAMA)
    qcfg, _ = _cfg(LLAMA, "model.client_embedding_8bit=true")
    float_client, client = SplitPart(cfg, config, "client", CPU), SplitPart(qcfg, config, "client", CPU)
    table = client.lm.get_input_embeddings()
    assert type(table) is bitsandbytes.nn.Embedding8bit and table.weight.dtype == torch.int8
    ids, mask, _ = _batch()
    assert _rel(client(ids, mask), float_client(ids, mask)) < 0.02
    assert client.adapter_state().keys() == float_client.adapter_state().keys()  # (the table has no state dict)
    table_bytes = 258 * 32
    assert footprint(float_client.lm)[1] - footprint(client.lm)[1] == 4 * table_bytes - (table_bytes + 4 * 258)


def test_precision_is_per_side():
    """A 4-bit bf16 server beside float32 clients with an 8-bit table (e.g. a GPU server, CPU clients)."""
    cfg, config = _cfg(LLAMA, "model.server_quantize=nf4", "model.server_dtype=bfloat16",
                       "model.client_embedding_8bit=true")  # fmt: skip
    assert cfg.model.precision("client") == ("float32", "none")
    assert cfg.model.precision("server") == ("bfloat16", "nf4")
    assert cfg.model.precision("full") == ("float32", "none")
    client, server = SplitPart(cfg, config, "client", CPU), SplitPart(cfg, config, "server", CPU)
    assert (
        any(type(m) is bitsandbytes.nn.Linear4bit for m in server.lm.modules())
        and server.lm.lm_head.weight.dtype == torch.bfloat16
    )
    assert not any(isinstance(m, (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)) for m in client.modules())
    assert type(client.lm.get_input_embeddings()) is bitsandbytes.nn.Embedding8bit


def test_an_adapter_trained_on_a_quantized_base_loads_onto_the_float_base(tmp_path):
    cfg, config = _cfg(LLAMA, "model.quantize=int8", "model.client_embedding_8bit=true")
    client, server = SplitPart(cfg, config, "client", CPU), SplitPart(cfg, config, "server", CPU)
    _randomise_lora_b(client, server)
    state = {**client.adapter_state(), **server.adapter_state()}
    float_cfg, _ = _cfg(LLAMA)
    build_base(float_cfg, config, "full", CPU)[0].save_pretrained(tmp_path / "base")
    export_adapter(tmp_path / "adapter", server, state, str(tmp_path / "base"))
    model = PeftModel.from_pretrained(
        build_base(float_cfg, config, "full", CPU)[0], str(tmp_path / "adapter"), is_trainable=False
    )
    ids, mask, _ = _batch()
    quantized = server(client(ids, mask), mask)
    assert _rel(model(input_ids=ids, attention_mask=mask).logits, quantized) < TOLERANCE["int8"]


def test_a_tied_head_on_a_client_is_not_its_8bit_table():
    cfg, config = _cfg(GPT2, "split.label_private=true", "model.client_embedding_8bit=true")
    with pytest.raises(ConfigError, match="model.client_embedding_8bit': this client's LM head is its embedding"):
        SplitPart(cfg, config, "client", CPU)


def test_without_bitsandbytes_one_line_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # (import fails)
    cfg, config = _cfg(LLAMA, "model.quantize=int8")
    with pytest.raises(
        ConfigError, match=r"'model.quantize': needs bitsandbytes \(pip install 'splitlora_mpi\[quant\]'\)"
    ):
        SplitPart(cfg, config, "client", CPU)
