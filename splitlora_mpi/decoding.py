"""Decoding with a fine-tuned run: the base model with the run's LoRA adapter merged, the
training prompt `MR ||`, greedy or beam search, prompts of similar length batched together."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .progress import Progress


def load_model(base: str, adapter: Path | None) -> Any:
    """Base + adapter, merged (plain forward passes: faster decoding), float32, eval mode;
    the base alone without an adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. a padding hint when a batch needs no mask, and load progress bars
    hf_logging.disable_progress_bar()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as e:  # a missing hub id, no network, no weights in the directory
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"base model {base}: cannot load ({reason}); expected a model directory or hub id") from None
    if adapter is not None:
        with warnings.catch_warnings():  # transformers' deprecation notices about peft's calls: not the user's to fix
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.to(device).eval()


# ---------------------------------------------------------------- data


def group_references(examples: list[Any]) -> tuple[list[str], list[list[str]]]:
    """Unique prompts in order of first appearance, each with all its references."""
    by_prompt: dict[str, list[str]] = {}
    for ex in examples:
        by_prompt.setdefault(ex.prompt, []).append(ex.completion)
    return list(by_prompt), list(by_prompt.values())


def references_text(refs: list[list[str]]) -> str:
    """The e2e-metrics multi-reference format."""
    return "\n".join("".join(r + "\n" for r in group) for group in refs)


def prompt_ids(tok: Any, prompt: str, fmt: str) -> list[int]:
    """The prompt part of a training row (data._encode_pair): generation continues where the completion starts."""
    return tok.encode(prompt + " ||") if fmt == "e2e" else tok.encode(prompt)


# ---------------------------------------------------------------- decoding


def decode(
    model: Any, tok: Any, prompts: list[list[int]], max_seq_len: int, args: Any, beams: int, label: str
) -> list[str]:
    """Predictions in prompt order; prompts of similar length batched together (less padding), at least
    ~10 batches so that progress lines (every ~10 s, beam search on a CPU can take minutes) and the
    estimate of the time left come often enough."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    size = max(1, min(args.batch_size, math.ceil(len(order) / 10)))
    out: list[str] = [""] * len(prompts)
    progress = Progress(label, len(order), "MRs")
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        texts = generate(model, tok, [prompts[i] for i in idx], max_seq_len, args.max_new_tokens, beams,
                         args.no_repeat_ngram_size if beams > 1 else 0)  # fmt: skip
        for i, text in zip(idx, texts):
            out[i] = text
        progress.add(len(idx))
    progress.finish(always=True)
    return out


def generate(
    model: Any, tok: Any, prompts: list[list[int]], max_seq_len: int, max_new: int, beams: int, no_repeat: int
) -> list[str]:
    """One left-padded batch. Prompt + new tokens stay within max_seq_len; a too long prompt keeps its
    first tokens and leaves the completion as much room as training did (max(T // 2, T - prompt))."""
    import torch

    longest = max(len(p) for p in prompts)
    new = min(max_new, max(max_seq_len // 2, max_seq_len - longest))
    prompts = [p[: max_seq_len - new] for p in prompts]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    with torch.no_grad():
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            num_beams=beams,
            do_sample=False,
            no_repeat_ngram_size=no_repeat,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    return [continuation_text(tok, row[width:].tolist()) for row in seqs]


def continuation_text(tok: Any, ids: list[int]) -> str:
    """Generated ids cut at the first eos, as one line of text (newlines would break the one-line-per-MR files)."""
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return " ".join(tok.decode(ids).split())
