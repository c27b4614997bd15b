"""Completions from a finished run: `python -m splitlora_mpi.generate RUN_DIR [--prompt TEXT ...]`.

Why: to read what the fine-tuned model writes, with nothing but the run directory; and a check
that the exported adapter is a standard one: the base (RUN_DIR/base, else the adapter's
`base_model_name_or_path`) is loaded with plain transformers and the adapter with
`PeftModel.from_pretrained`, not through this package's split model.

How: each prompt is formatted as training formatted the prompt part of a row (RUN_DIR/config.yaml
`data.format`) and completed one at a time, greedily unless --sample. Completions go to stdout as
they are made; notes (a prompt cut to fit the model) to stderr. Exit codes: 0 done; 2 bad input
(one `error:` line on stderr); 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import ROLES
from .cli import OneLineParser
from .decoding import load_model, prompt_ids
from .errors import ConfigError
from .evaluate import base_model_path, load_run_config

PROMPTS = """prompts: the --prompt values, then the lines of --file; with neither, the lines of stdin (end
with Ctrl-D). One prompt per line, blank lines skipped. Each is formatted like the prompts of
training (config.yaml data.format):
  e2e    a meaning representation, e.g. 'name : The Punter | food : Indian'; the model continues
         'MR ||' (anything from '||' on is dropped: lines of an E2E data file work as they are)
  jsonl  the prompt text as it is; a line starting with '{' is a JSON object with a string
         "prompt" (lines of a training file work; "completion" is ignored)
  chat   plain text is one user message; a line starting with '[' or '{' is JSON: a list of
         {"role": "system"|"user"|"assistant", "content": "..."} messages ending with a user
         message, or {"messages": [...]}; rendered with the tokenizer's chat template and its
         generation prompt
A prompt too long for the model's positions with the new tokens keeps its first tokens (a note
on stderr).

output: per prompt, '> ' and the prompt (each of its lines; e2e: the MR, jsonl: the prompt text,
chat: as given), then the completion (surrounding whitespace stripped, cut at the end-of-sequence
token), then a blank line. --json: one object per line, {"prompt": ..., "completion": ...} (chat
adds "messages").

example:
  python -m splitlora_mpi.generate runs/splitlora --prompt 'name : The Punter | food : Indian'
  python -m splitlora_mpi.generate runs/splitlora --json < mrs.txt"""


@dataclass(frozen=True)
class Prompt:
    text: str  # as given
    where: str  # for error messages: '--prompt 2', '--file FILE:3', 'stdin:1'
    content: str = ""  # e2e / jsonl: the prompt proper
    messages: tuple[dict[str, str], ...] = ()  # chat

    @property
    def shown(self) -> str:
        """What the output calls the prompt: the MR / prompt text that was completed, or the chat line."""
        return self.content or self.text


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m splitlora_mpi.generate",
        description=__doc__.split("\n\n")[0],
        epilog=PROMPTS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="output directory of a training run (config.yaml, adapter/, base/)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--file", type=Path, help="prompts, one per line (see below)")
    p.add_argument(
        "--max-new-tokens", type=int, default=64, metavar="N", help="longest completion in tokens (default 64)"
    )
    p.add_argument("--sample", action="store_true", help="sample instead of the greedy choice")
    p.add_argument("--temperature", type=float, metavar="T", help="with --sample: softmax temperature (default 1.0)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="with --sample: nucleus sampling, the smallest set of tokens of this probability mass "
                        "(default 1.0: all; no top-k cut)")  # fmt: skip
    p.add_argument(
        "--seed", type=int, metavar="S", help="with --sample: seed of the sampling, once for all prompts (default 0)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: expected an integer ≥ 1, got {args.max_new_tokens}")
    for name in ("temperature", "top_p", "seed"):
        if getattr(args, name) is not None and not args.sample:
            raise ConfigError(f"--{name.replace('_', '-')}: a sampling option; expected --sample with it")
    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError(f"--temperature: expected a number > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p: expected a number in (0, 1], got {args.top_p}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        generate_run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (Ctrl-C while typing prompts or waiting for a completion)
        return 130
    return 0


# ---------------------------------------------------------------- the run


def generate_run(args: argparse.Namespace) -> None:
    """Prompts checked first (no model is loaded for bad input), then one completion each, printed as made."""
    from .data import load_tokenizer

    cfg = load_run_config(args.run_dir)
    base = base_model_path(args.run_dir)
    fmt = cfg.data.format
    prompts = read_prompts(args, fmt)
    tok = load_tokenizer(cfg.model.tokenizer)
    ids = [encode(tok, p, fmt) for p in prompts]
    model = load_model(base, args.run_dir / "adapter")
    if args.sample:
        import torch

        torch.manual_seed(args.seed or 0)
    for prompt, row in zip(prompts, ids):
        text = complete(model, tok, row, args, prompt.where)
        if args.json:
            obj: dict[str, Any] = {"prompt": prompt.shown, "completion": text}
            if prompt.messages:
                obj["messages"] = list(prompt.messages)
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            quoted = "".join(f"> {line}\n" for line in prompt.shown.split("\n"))
            print(f"{quoted}{text}\n", flush=True)


def read_prompts(args: argparse.Namespace, fmt: str) -> list[Prompt]:
    """--prompt values, then --file lines; stdin lines when neither is given."""
    given: list[tuple[str, str]] = [(text, f"--prompt {i}") for i, text in enumerate(args.prompt, 1)]
    if args.file is not None:
        given += _lines(_read_file(args.file), f"--file {args.file}")
    elif not args.prompt:
        if sys.stdin.isatty():
            print("reading prompts from stdin, one per line; end with Ctrl-D", file=sys.stderr, flush=True)
        given += _lines(_text(sys.stdin.buffer.read(), "stdin"), "stdin")
    prompts = [parse_prompt(text, where, fmt) for text, where in given]
    if not prompts:
        source = f"--file {args.file}: no prompts (empty file)" if args.file is not None else "no prompts"
        raise ConfigError(f"{source}; expected --prompt TEXT, --file FILE or prompts on stdin, one per line")
    return prompts


def _read_file(path: Path) -> str:
    try:
        return _text(path.read_bytes(), f"--file {path}")
    except FileNotFoundError:
        raise ConfigError(f"--file {path}: not found; expected a text file with one prompt per line") from None
    except IsADirectoryError:
        raise ConfigError(f"--file {path}: is a directory; expected a text file with one prompt per line") from None


def _text(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: not UTF-8 text") from None


def _lines(text: str, name: str) -> Iterator[tuple[str, str]]:
    """Non-blank lines with their `name:line` (split on '\\n' only, as data.read_examples)."""
    return ((line.rstrip("\r"), f"{name}:{i}") for i, line in enumerate(text.split("\n"), 1) if line.strip())


def parse_prompt(text: str, where: str, fmt: str) -> Prompt:
    """One prompt as the user gave it, in the run's data format (see PROMPTS)."""
    if fmt == "chat":
        return Prompt(text, where, messages=_chat_messages(text, where))
    if fmt == "jsonl" and text.lstrip().startswith("{"):
        obj = _json(text, where, 'a JSON object with a string "prompt"', "'{'")
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ConfigError(f'{where}: expected a JSON object with a string "prompt", or plain text')
        content = obj["prompt"]
    elif fmt == "e2e":
        content = text.split("||", 1)[0].strip()  # (training strips the MR too)
    else:
        content = text
    if not content.strip():
        raise ConfigError(f"{where}: empty prompt; expected text")
    return Prompt(text, where, content=content)


def _chat_messages(text: str, where: str) -> tuple[dict[str, str], ...]:
    if not text.lstrip().startswith(("[", "{")):
        return ({"role": "user", "content": text},)
    expected = 'a JSON list of {"role": ..., "content": ...} messages, or {"messages": [...]}'
    obj = _json(text, where, expected, "'[' or '{'")
    turns = obj.get("messages") if isinstance(obj, dict) else obj
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: no messages; expected {expected}")
    for t in turns:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise ConfigError(f"{where}: a message without string 'content'; expected {expected}")
        if t.get("role") not in ROLES:
            raise ConfigError(f"{where}: unknown role {t.get('role')!r}; expected one of {', '.join(ROLES)}")
    if turns[-1]["role"] != "user":
        raise ConfigError(f"{where}: the last message is the {turns[-1]['role']}'s; expected a user message to answer")
    return tuple({"role": t["role"], "content": t["content"]} for t in turns)


def _json(text: str, where: str, expected: str, starts: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON ({e.msg}); expected {expected} (a prompt starting with {starts} "
                          "is JSON)") from None  # fmt: skip


# ---------------------------------------------------------------- formatting and decoding


def encode(tok: Any, prompt: Prompt, fmt: str) -> list[int]:
    """Token ids of the prompt part of a training row: e2e 'MR ||', jsonl the prompt, chat the
    messages through the chat template with its generation prompt (chat.encode_chat's head of an
    assistant turn)."""
    if fmt != "chat":
        return prompt_ids(tok, prompt.content, fmt)
    hf = getattr(tok, "hf", None)
    if not getattr(hf, "chat_template", None):
        raise ConfigError(f"{prompt.where}: a chat run's tokenizer needs a chat template; model.tokenizer has none")
    return tok.encode(hf.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True))


def complete(model: Any, tok: Any, ids: list[int], args: argparse.Namespace, where: str) -> str:
    """One completion. Prompt + completion stay within the model's positions: the completion gets
    up to max(positions // 2, positions - prompt) tokens and a longer prompt keeps its first tokens
    (as in decoding.generate, with the model's positions for data.max_seq_len)."""
    import torch

    limit = getattr(model.config, "max_position_embeddings", None) or sys.maxsize
    new = min(args.max_new_tokens, max(limit // 2, limit - len(ids)))
    if len(ids) + new > limit:
        print(f"note: {where}: {len(ids)} tokens; kept the first {limit - new} so that {new} new tokens fit the "
              f"model's {limit} positions", file=sys.stderr, flush=True)  # fmt: skip
        ids = ids[: limit - new]
    elif new < args.max_new_tokens:
        print(f"note: {where}: at most {new} new tokens after its {len(ids)} (the model has {limit} positions)",
              file=sys.stderr, flush=True)  # fmt: skip
    sampling = {"temperature": args.temperature or 1.0, "top_p": args.top_p or 1.0, "top_k": 0} if args.sample else {}
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            max_new_tokens=new,
            do_sample=args.sample,
            num_beams=1,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **sampling,
        )
    made = out[0, len(ids) :].tolist()
    if tok.eos_token_id in made:
        made = made[: made.index(tok.eos_token_id)]
    return tok.decode(made).strip()


if __name__ == "__main__":
    sys.exit(main())
