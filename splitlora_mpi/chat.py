"""Chat transcripts as training rows: `{"messages": [{"role": ..., "content": ...}, ...]}` lines
rendered with the tokenizer's own chat template; the loss is on the assistant turns only
(their text and end-of-turn tokens, not the role header the template writes before them)."""

from __future__ import annotations

import json
from typing import Any

from .errors import ConfigError

ROLES = ("system", "user", "assistant")
Messages = tuple[tuple[str, str], ...]  # (role, content) per turn


def parse_chat(line: str, where: str) -> Messages:
    """One jsonl line; raises ConfigError naming `where` (file:line)."""
    expected = 'expected {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}'
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(f"data file {where}: invalid JSON ({e.msg}), {expected}") from None
    turns = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"data file {where}: no 'messages' list, {expected}")
    out = []
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise ConfigError(f"data file {where}: a message without string 'content', {expected}")
        if t.get("role") not in ROLES:
            raise ConfigError(f"data file {where}: unknown role {t.get('role')!r}, expected one of {', '.join(ROLES)}")
        out.append((t["role"], t["content"]))
    if not any(role == "assistant" for role, _ in out):
        raise ConfigError(f"data file {where}: no assistant turn, expected at least one to train on")
    return tuple(out)


def encode_chat(messages: Messages, hf: Any, max_len: int, where: str) -> tuple[list[int], list[bool], bool]:
    """(token ids, which are targets, whether the row was cut) for one transcript. Targets: the
    tokens of each assistant turn (what the template adds after the generation prompt). A row
    longer than `max_len` keeps its first `max_len` tokens when they hold a target, else a
    window that starts half a row before the first assistant turn (at least one target stays)."""
    if not getattr(hf, "chat_template", None):
        raise ConfigError(
            f"data file {where}: data.format chat needs a tokenizer with a chat template; model.tokenizer has none"
        )
    turns = [{"role": r, "content": c} for r, c in messages]
    text = hf.apply_chat_template(turns, tokenize=False)
    spans = []
    for i, (role, _) in enumerate(messages):
        if role == "assistant":
            head = hf.apply_chat_template(turns[:i], tokenize=False, add_generation_prompt=True) if i else ""
            body = hf.apply_chat_template(turns[: i + 1], tokenize=False)
            if not (text.startswith(head) and text.startswith(body)):
                raise ConfigError(f"data file {where}: the chat template does not render turns as prefixes")
            spans.append((len(head), len(body)))
    enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    targets = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    if len(ids) <= max_len:
        return ids, targets, False
    first = targets.index(True)
    begin = 0 if first < max_len else first - max_len // 2
    return ids[begin : begin + max_len], targets[begin : begin + max_len], True
