"""`python -m splitlora_mpi.generate`: a finished run's completions equal what plain transformers + PEFT
give for the prompt as training formats it (e2e here, chat on a hand-made run); prompts from --prompt,
--file and stdin; sampling; bad input as one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_local
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from splitlora_mpi import generate as gen
from splitlora_mpi.chat import encode_chat
from splitlora_mpi.config import load_config
from splitlora_mpi.data import HFTokenizer

MRS = ["name : The Punter | food : Indian | area : riverside", "name : Aromi | Type : coffee shop"]
LONG = "name : The Wrestlers | " + " | ".join(f"near : Café {i}" for i in range(9))  # > 104 bytes
NEW = 24  # --max-new-tokens of the tests
EOS, PAD = 256, 257  # the byte tokenizer's, written out: the reference below does not use the package
GPT2_VOCAB = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-vocab"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def generate_cmd(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """One thread, as the reference in this process (_one_thread): the same float sums, the same argmax."""
    cmd = [sys.executable, "-m", "splitlora_mpi.generate", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The tiny default run trained in-process for 20 steps. A random init wider than GPT-2's 0.02
    gives clear argmax margins, and 20 steps an adapter that visibly changes the completions."""
    out = tmp_path_factory.mktemp("generate") / "run"
    return run_local(out, 2, "train.steps=20", "train.eval_every=0", "model.config.initializer_range=0.3")


@pytest.fixture(scope="module")
def models(run) -> dict[str, torch.nn.Module]:
    """The reference: run/base with run/adapter merged by PEFT, and the base alone."""
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "adapter")
    return {"merged": merged.merge_and_unload().eval(), "base": AutoModelForCausalLM.from_pretrained(run / "base")}


def reference(model: torch.nn.Module, ids: list[int], eos: int, pad: int, **sampling) -> list[int]:
    """transformers' generate, the new tokens up to the first eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW, do_sample=bool(sampling), eos_token_id=eos, pad_token_id=pad,
                             **sampling)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    return new[: new.index(eos)] if eos in new else new


def e2e_reference(model: torch.nn.Module, mr: str, keep: int | None = None, **sampling) -> str:
    """Training's e2e prompt `MR ||` as UTF-8 bytes (the byte tokenizer), its first `keep` tokens."""
    new = reference(model, list(f"{mr} ||".encode())[:keep], EOS, PAD, **sampling)
    return bytes(i for i in new if i < 256).decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------- e2e: the tiny default run


def test_greedy_completions_equal_transformers_with_the_peft_adapter(run, models):
    done = generate_cmd(str(run), *(a for mr in [*MRS, LONG] for a in ("--prompt", mr)), "--max-new-tokens", str(NEW))
    assert done.returncode == 0, done.stderr
    want = [e2e_reference(models["merged"], mr) for mr in MRS] + [e2e_reference(models["merged"], LONG, 128 - NEW)]
    assert done.stdout == "".join(f"> {mr}\n{text}\n\n" for mr, text in zip([*MRS, LONG], want))
    assert all(w.strip() for w in want)  # (the comparison is of text, not of empty lines)
    assert want[:2] != [e2e_reference(models["base"], mr) for mr in MRS]  # the adapter is applied
    n = len(f"{LONG} ||".encode())
    assert done.stderr == f"note: --prompt 3: {n} tokens; kept the first {128 - NEW} so that {NEW} new tokens fit " \
                          "the model's 128 positions\n"  # fmt: skip


def test_stdin_lines_and_json_output(run, models):
    """An E2E data file's line gives its MR; blank lines are skipped."""
    done = generate_cmd(
        str(run), "--json", "--max-new-tokens", str(NEW), stdin=f"{MRS[0]}||A reference.\n\n \n{MRS[1]}\n"
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == MRS
    assert [r["completion"] for r in rows] == [e2e_reference(models["merged"], mr) for mr in MRS]


def test_sampling_from_a_file_is_seeded_once(run, models, tmp_path):
    """--seed seeds torch once, then the prompts are sampled in order: the reference does the same."""
    prompts = tmp_path / "mrs.txt"
    prompts.write_text("".join(mr + "\n" for mr in MRS))
    done = generate_cmd(str(run), "--file", str(prompts), "--json", "--max-new-tokens", str(NEW),
                        "--sample", "--temperature", "0.7", "--top-p", "0.9", "--seed", "3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    torch.manual_seed(3)
    want = [e2e_reference(models["merged"], mr, temperature=0.7, top_p=0.9, top_k=0) for mr in MRS]
    assert [json.loads(line)["completion"] for line in done.stdout.splitlines()] == want
    assert want != [e2e_reference(models["merged"], mr) for mr in MRS]  # (not the greedy choice)


# ---------------------------------------------------------------- chat: a hand-made run


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """What a chat run leaves: a tiny GPT-2 (BPE vocabulary) in base/, a LoRA adapter with random A and B
    in adapter/, config.yaml with data.format chat and a tokenizer directory with a chat template."""
    run = tmp_path_factory.mktemp("chat") / "run"
    tok_dir = run.parent / "tokenizer"
    tok_dir.mkdir()
    (tok_dir / "vocab.json").write_bytes((GPT2_VOCAB / "encoder.json").read_bytes())
    (tok_dir / "merges.txt").write_bytes((GPT2_VOCAB / "vocab.bpe").read_bytes())
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257,
                                  initializer_range=0.5, eos_token_id=50256)  # fmt: skip
    config.save_pretrained(tok_dir)  # (says which tokenizer class reads vocab.json + merges.txt)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tok_dir)
    assert (len(tok), tok.eos_token_id) == (50257, 50256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(run / "base")
    lora = LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run / "adapter")
    sets = ["data.format=chat", "data.train_path=t.jsonl", "data.val_path=v.jsonl", f"model.tokenizer={tok_dir}"]
    (run / "config.yaml").write_text(load_config(None, sets).to_yaml())
    return run


def test_chat_prompts_go_through_the_chat_template(chat_run):
    system = '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}'
    done = generate_cmd(str(chat_run), "--prompt", "Where is the river?", "--prompt", system, "--json",
                        "--max-new-tokens", str(NEW))  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    conversations = [[{"role": "user", "content": "Where is the river?"}], json.loads(system)["messages"]]
    assert [r["messages"] for r in rows] == conversations
    tok = AutoTokenizer.from_pretrained(chat_run.parent / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_run / "base"), chat_run / "adapter")
    want = []
    for messages in conversations:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|assistant|>\n")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want.append(tok.decode(reference(model.eval(), ids, tok.eos_token_id, tok.eos_token_id)).strip())
    assert [r["completion"] for r in rows] == want and all(want)


def test_a_chat_prompt_is_the_training_row_up_to_the_answer(chat_run):
    """The ids of a conversation equal those of a training row before its first target (chat.encode_chat)."""
    tok = HFTokenizer(AutoTokenizer.from_pretrained(chat_run.parent / "tokenizer"))
    asked = (("system", "Be brief."), ("user", "Where is the river?"))
    row, targets, _ = encode_chat((*asked, ("assistant", "North.")), tok.hf, 128, "x")
    prompt = gen.parse_prompt(json.dumps([{"role": r, "content": c} for r, c in asked]), "x", "chat")
    assert gen.encode(tok, prompt, "chat") == row[: targets.index(True)]


# ---------------------------------------------------------------- prompts as the formats read them


@pytest.mark.parametrize(
    ("fmt", "text", "content"),
    [
        ("e2e", "name : Aromi ||", "name : Aromi"),
        ("e2e", " name : Aromi||Aromi is a pub.", "name : Aromi"),
        ("jsonl", "Q: two plus two?", "Q: two plus two?"),
        ("jsonl", '{"prompt": "Q: two plus two?\\nA:", "completion": " 4"}', "Q: two plus two?\nA:"),
    ],
)
def test_prompt_lines_of_each_format(fmt, text, content):
    assert gen.parse_prompt(text, "x", fmt).content == content


# ---------------------------------------------------------------- bad input


def test_no_prompts_on_stdin_is_one_line_and_exit_2(run):
    done = generate_cmd(str(run), stdin="\n  \n")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: no prompts; expected --prompt TEXT, --file FILE or prompts on stdin, one per line\n"


@pytest.mark.parametrize(
    ("case", "args", "expected"),
    [
        ("no_adapter", [], "no adapter/adapter_config.json; expected a finished training run"),
        ("missing_file", ["--file", "{tmp}/nope.txt"], "--file {tmp}/nope.txt: not found"),
        ("empty_file", ["--file", "{tmp}/empty.txt"], "--file {tmp}/empty.txt: no prompts (empty file)"),
        ("empty_prompt", ["--prompt", " || a text"], "--prompt 1: empty prompt"),
        ("max_new_0", ["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: expected an integer ≥ 1, got 0"),
        ("no_sample", ["--prompt", "x", "--temperature", "0.5"], "--temperature: a sampling option; expected --sample"),
        ("top_p", ["--prompt", "x", "--sample", "--top-p", "1.5"], "--top-p: expected a number in (0, 1], got 1.5"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, monkeypatch, case, args, expected):
    """Checked before any model is loaded (load_model would fail the test)."""
    monkeypatch.setattr(gen, "load_model", lambda *a: pytest.fail("a model was loaded"))
    run_dir = run
    if case == "no_adapter":
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text((run / "config.yaml").read_text())
    (tmp_path / "empty.txt").write_text("\n\n")
    assert gen.main([str(run_dir), *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected.format(tmp=tmp_path) in err, err


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('[{"role": "user", "content": "hi"', "--file {f}:2: invalid JSON (Expecting ',' delimiter); expected"),
        ('{"messages": []}', "--file {f}:2: no messages"),
        ('[{"role": "bot", "content": "hi"}]', "--file {f}:2: unknown role 'bot'"),
        (
            '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]',
            "--file {f}:2: the last message is the assistant's; expected a user message to answer",
        ),  # fmt: skip
    ],
)
def test_bad_chat_lines_name_file_and_line(chat_run, tmp_path, capsys, monkeypatch, line, expected):
    monkeypatch.setattr(gen, "load_model", lambda *a: pytest.fail("a model was loaded"))
    prompts = tmp_path / "chat.txt"
    prompts.write_text(f"Hello\n{line}\n")
    assert gen.main([str(chat_run), "--file", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {expected.format(f=prompts)}"), err


def test_a_chat_run_without_a_chat_template_is_refused(run, capsys, monkeypatch):
    """The tiny run's byte tokenizer has no template: as if it had trained on chat data."""
    cfg = SimpleNamespace(data=SimpleNamespace(format="chat"), model=SimpleNamespace(tokenizer="byte"))
    monkeypatch.setattr(gen, "load_run_config", lambda run_dir: cfg)
    monkeypatch.setattr(gen, "load_model", lambda *a: pytest.fail("a model was loaded"))
    assert gen.main([str(run), "--prompt", "Hello"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --prompt 1: a chat run's tokenizer needs a chat template; model.tokenizer has none\n"
