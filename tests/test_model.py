"""The split is exact for every decoder family with the standard layout: each side holds only
its modules, with the whole model's weights, reads only its tensors from a saved model, and the
split gradients equal those of the unsplit model run by transformers' own forward (tiny random
configs of each family: sliding windows shorter than the rows, per-layer attention and rotary
types, logit soft-capping, NoPE layers, tied and untied heads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from splitlora_mpi.config import load_config
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.model import SplitPart, build_base, export_adapter, hf_config
from splitlora_mpi.structure import checked, unchecked

CPU = torch.device("cpu")
LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": 32,
    "n_layer": 3,
    "n_head": 2,
    "n_positions": 64,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
HEAD_DIM = {"head_dim": 8}
FAMILIES = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "qwen2": {**LLAMA, "model_type": "qwen2"},
    "qwen3": {**LLAMA, **HEAD_DIM, "model_type": "qwen3"},
    "mistral": {**LLAMA, "model_type": "mistral", "sliding_window": 4},
    "gemma2": {**LLAMA, **HEAD_DIM, "model_type": "gemma2", "sliding_window": 4, "final_logit_softcapping": 0.5},
    "gemma3_text": {**LLAMA, **HEAD_DIM, "model_type": "gemma3_text", "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phi3": {**LLAMA, "model_type": "phi3", "sliding_window": 4},
    "smollm3": {**LLAMA, "model_type": "smollm3", "no_rope_layers": [1, 0, 1]},
}  # fmt: skip


def _cfg(model_config: dict, *overrides: str):
    cfg = load_config(overrides=["split.client_layers=1", "data.max_seq_len=64", *overrides])
    cfg.model.config = dict(model_config)
    return cfg, hf_config(cfg, 258, 256, 257)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # right padding
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _randomise_lora_b(*parts: SplitPart) -> None:
    """LoRA B starts at zero; make it non-zero so gradients reach every adapter matrix."""
    g = torch.Generator().manual_seed(1)
    for part in parts:
        for name, p in part.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_split_gradients_equal_unsplit(family):
    cfg, config = _cfg(FAMILIES[family])
    client, server, full = (SplitPart(cfg, config, role, CPU) for role in ("client", "server", "full"))
    _randomise_lora_b(client, server)
    full.load_adapter_state({**client.adapter_state(), **server.adapter_state()})
    ids, mask, labels = _batch()

    h = client(ids, mask)
    h_cut = h.detach().requires_grad_()
    split_loss = _loss(server(h_cut, mask), labels)
    split_loss.backward()
    h.backward(h_cut.grad)
    # the whole model through Hugging Face's own forward
    full_loss = _loss(full.peft(input_ids=ids, attention_mask=mask).logits, labels)
    full_loss.backward()

    assert torch.allclose(split_loss, full_loss, rtol=1e-6, atol=0)
    split_grads = {n: p.grad for part in (client, server) for n, p in part.named_parameters() if p.requires_grad}
    full_grads = {n: p.grad for n, p in full.named_parameters() if p.requires_grad}
    assert split_grads.keys() == full_grads.keys() and len(split_grads) > 0
    for name, g in split_grads.items():
        assert g is not None and g.abs().sum() > 0, name
        assert torch.allclose(g, full_grads[name], rtol=1e-5, atol=1e-7), name


def _prefixes(family: str) -> tuple[str, str, str]:
    """(blocks, final norm, embeddings) key prefixes in the family's state dict."""
    base = {"gpt2": "transformer."}.get(family, "model.")
    blocks, norm, embed = {"gpt2": ("h", "ln_f", "wte")}.get(family, ("layers", "norm", "embed_tokens"))
    return base + blocks + ".", base + norm + ".", base + embed + "."


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_side_holds_only_its_modules_with_the_whole_models_weights(family):
    cfg, config = _cfg(FAMILIES[family])
    full = build_base(cfg, config, "full", CPU)[0].state_dict()
    client = build_base(cfg, config, "client", CPU)[0].state_dict()
    server = build_base(cfg, config, "server", CPU)[0].state_dict()
    blocks, norm, embed = _prefixes(family)
    assert {k.split(".")[2] for k in client if k.startswith(blocks)} == {"0"}
    assert {k.split(".")[2] for k in server if k.startswith(blocks)} == {"1", "2"}
    assert any(k.startswith(embed) for k in client) and any(k.startswith(norm) for k in server)
    assert not any(k.startswith(("lm_head", norm)) for k in client)
    assert any(k.startswith("lm_head") for k in server)
    for sd in (client, server):
        for k, v in sd.items():
            assert torch.equal(v, full[k]), k
    client_n = sum(v.numel() for v in client.values())
    assert client_n < sum(v.numel() for v in full.values())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pretrained_directory_is_read_tensor_by_tensor(tmp_path, family):
    """Each side reads exactly its own tensors from a saved model, whatever the seed says."""
    cfg, config = _cfg(FAMILIES[family], "run.seed=5")
    build_base(cfg, config, "full", CPU)[0].save_pretrained(tmp_path / "m")
    cfg2, _ = _cfg(FAMILIES[family], "run.seed=99")  # different seed: weights must come from the files
    cfg2.model.name_or_path = str(tmp_path / "m")
    config2 = hf_config(cfg2, 258, 256, 257)
    saved = build_base(cfg, config, "full", CPU)[0].state_dict()
    blocks, _, _ = _prefixes(family)
    for role, held in (("client", {"0"}), ("server", {"1", "2"})):
        read: list[str] = []
        for k, v in build_base(cfg2, config2, role, CPU, tensors_read=read)[0].state_dict().items():
            assert torch.equal(v, saved[k]), (role, k)
        assert {k.split(".")[2] for k in read if k.startswith(blocks)} == held, (role, read)
        assert {k for k in saved if k.startswith(blocks) and k.split(".")[2] in held} <= set(read)


def test_a_bfloat16_base_is_read_straight_into_bfloat16_and_lora_stays_float32(tmp_path):
    cfg, config = _cfg(LLAMA)
    build_base(cfg, config, "full", CPU)[0].save_pretrained(tmp_path / "m")
    saved = build_base(cfg, config, "full", CPU)[0].state_dict()
    cfg.model.name_or_path, cfg.model.dtype = str(tmp_path / "m"), "bfloat16"
    client = SplitPart(cfg, hf_config(cfg, 258, 256, 257), "client", CPU)
    base = {n: p for n, p in client.named_parameters() if not p.requires_grad}
    assert base and all(p.dtype == torch.bfloat16 for p in base.values())
    assert all(p.dtype == torch.float32 for p in client.trainable_parameters())
    for k, v in client.lm.state_dict().items():
        if "lora_" not in k and k.replace("base_layer.", "") in saved:
            assert torch.equal(v, saved[k.replace("base_layer.", "")].to(torch.bfloat16)), k
    ids, mask, _ = _batch()
    assert client(ids, mask).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        ({**LLAMA, "model_type": "bloom"}, "cannot split model_type 'bloom' .* need \\['alibi'"),
        ({**LLAMA, "model_type": "granite", "embedding_multiplier": 12.0}, "embedding_multiplier=12.0 outside"),
        ({**LLAMA, "model_type": "no-such-family"}, "no model type of transformers"),
        ({**LLAMA, "model_type": "nanochat"}, "does more around its blocks"),  # (a norm before them too)
    ],
)
def test_a_family_that_cannot_be_split_is_one_clear_line(model_config, message):
    with pytest.raises(ConfigError, match=message):
        cfg, config = _cfg(model_config)
        SplitPart(cfg, config, "client", CPU)


def test_families_tested_here_are_the_checked_ones_and_others_are_warned_about():
    assert set(FAMILIES) <= set(checked()["exact"])
    _, config = _cfg({**LLAMA, "model_type": "gptj"})
    assert "gptj' is split by its structure but was not compared" in unchecked(config)
    assert unchecked(_cfg(LLAMA)[1]) is None


def test_missing_pretrained_directory_is_a_config_error(tmp_path):
    cfg, _ = _cfg(GPT2)
    cfg.model.name_or_path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model.name_or_path"):
        hf_config(cfg, 258, 256, 257)


@pytest.mark.parametrize("k", [0, 3])
def test_cut_must_leave_blocks_on_both_sides(k):
    cfg, config = _cfg(GPT2)
    cfg.split.client_layers = k
    with pytest.raises(ConfigError, match="split.client_layers"):
        build_base(cfg, config, "client", CPU)


def test_exported_adapter_loads_with_peft_and_matches_the_split(tmp_path):
    cfg, config = _cfg(GPT2)
    client, server = SplitPart(cfg, config, "client", CPU), SplitPart(cfg, config, "server", CPU)
    _randomise_lora_b(client, server)
    build_base(cfg, config, "full", CPU)[0].save_pretrained(tmp_path / "base")
    export_adapter(
        tmp_path / "adapter", server, {**client.adapter_state(), **server.adapter_state()}, str(tmp_path / "base")
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids, mask, labels = _batch()
    with torch.no_grad():
        expected = _loss(server(client(ids, mask), mask), labels)
        got = _loss(model(input_ids=ids, attention_mask=mask).logits, labels)
    assert torch.allclose(expected, got, rtol=1e-5)


def test_rows_longer_than_the_models_positions_are_refused():
    cfg, config = _cfg(GPT2, "data.max_seq_len=128")
    with pytest.raises(ConfigError, match="data.max_seq_len"):
        build_base(cfg, config, "client", CPU)


def _from_full(full: SplitPart, *parts: SplitPart) -> None:
    """Give each part the full model's (randomised) adapter values for the blocks it holds."""
    _randomise_lora_b(full)
    state = full.adapter_state()
    for part in parts:
        part.load_adapter_state({k: state[k] for k in part.adapter_state()})


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
@pytest.mark.parametrize("tail", [0, 1])
def test_label_private_client_ends_with_the_head(family, tail):
    """U-shaped split: client front -> server -> client tail gives the whole model's logits;
    the server holds neither the embeddings nor the head."""
    cfg, config = _cfg(FAMILIES[family], "split.label_private=true", f"split.tail_layers={tail}")
    client, server, full = (SplitPart(cfg, config, role, CPU) for role in ("client", "server", "full"))
    _from_full(full, client, server)
    assert server.blocks_held() == list(range(1, 3 - tail)) and not server.has_head
    assert client.blocks_held() == [0] + list(range(3 - tail, 3)) and client.has_head
    assert not any(n.startswith(_prefixes(family)[2]) for n in server.lm.state_dict())
    ids, mask, _ = _batch()
    with torch.no_grad():
        split = client.tail(server(client(ids, mask), mask), mask)
        whole = full.peft(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(split, whole, rtol=1e-5, atol=1e-6)


def test_server_joins_clients_with_other_cut_points():
    """Cut points 1 and 2: the server runs block 1 for the first client's rows only, then
    blocks 2.. for both as one batch; each row's logits are the whole model's."""
    cfg, config = _cfg(GPT2, "split.client_layers=[1, 2]")
    near, far = SplitPart(cfg, config, "client", CPU, 0), SplitPart(cfg, config, "client", CPU, 1)
    server, full = SplitPart(cfg, config, "server", CPU), SplitPart(cfg, config, "full", CPU)
    _from_full(full, near, far, server)
    assert near.blocks_held() == [0] and far.blocks_held() == [0, 1] and server.blocks_held() == [1, 2]
    ids, mask, _ = _batch()
    with torch.no_grad():
        joined = server.forward_joined([(1, near(ids[:2], mask[:2]), mask[:2]), (2, far(ids[2:], mask[2:]), mask[2:])])
        whole = full.peft(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(joined, whole, rtol=1e-5, atol=1e-6)
