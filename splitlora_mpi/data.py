"""Data: tokenizers, the e2e, jsonl and chat formats, per-client partitions and samplers.

Rows are padded to `data.max_seq_len` so every batch has the same shape on the wire.
The loss is only on the text / completion tokens; truncation cuts the prompt first, so
every row keeps target tokens (a row without any would average a loss over zero tokens).
No MPI and no model code here. Reading, parsing and partitioning need no torch (a rank
checks its input before the heavy imports, run/preflight.py); torch is imported where
tensors are built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .chat import Messages, encode_chat, parse_chat
from .config import CLIENT, JobConfig
from .e2e import read_csv
from .errors import ConfigError
from .fsutil import local_or_hub

if TYPE_CHECKING:
    import torch

IGNORE = -100
FORMATS = ("e2e", "jsonl", "chat")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str:
        """What must be equal on every rank: vocabulary, special tokens, chat template."""
        ...


class ByteTokenizer:
    """Built in, no files: ids 0..255 are UTF-8 bytes, 256 = eos, 257 = pad."""

    vocab_size: int = 258
    eos_token_id: int = 256
    pad_token_id: int = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "byte"


class HFTokenizer:
    """Any Hugging Face tokenizer behind the same five members."""

    def __init__(self, tok) -> None:  # noqa: ANN001 - a transformers tokenizer
        if tok.eos_token_id is None:
            raise ValueError("it has no eos token")
        self.hf = tok
        self.vocab_size = len(tok)
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def fingerprint(self) -> str:
        """sha256 over the vocabulary (token -> id, added tokens included), the special tokens
        and the chat template: two ranks with equal fingerprints encode every text alike."""
        hf = self.hf
        facts = [sorted(hf.get_vocab().items()), hf.special_tokens_map, getattr(hf, "chat_template", None)]
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', a hub id or a local tokenizer directory; any failure is a config error."""
    if spec == "byte":
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(local_or_hub(spec)))
    except Exception as e:  # transformers / tokenizers raise many types; all mean "cannot load"
        raise _cannot_load_tokenizer(spec, e) from None


def check_tokenizer_path(spec: str) -> None:
    """model.tokenizer, when it is a path, must be a directory (a hub id is checked when loaded)."""
    if spec != "byte":
        try:
            local_or_hub(spec)
        except FileNotFoundError as e:
            raise _cannot_load_tokenizer(spec, e) from None


def _cannot_load_tokenizer(spec: str, e: Exception) -> ConfigError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(
        f"config key 'model.tokenizer': cannot load '{spec}': {reason}; "
        "expected 'byte', a hub id or a tokenizer directory"
    )


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    group: str  # the meaning representation (e2e), the prompt (jsonl) or the first user turn (chat)
    messages: Messages = ()  # chat: the transcript
    where: str = ""  # file:line


def packaged_data_paths() -> tuple[Path, Path]:
    """The E2E sample shipped in the package (see assets/e2e_sample/README.md)."""
    root = Path(str(resources.files("splitlora_mpi") / "assets" / "e2e_sample"))
    return root / "train.txt", root / "val.txt"


def read_examples(path: str | Path, fmt: str) -> list[Example]:
    """Parse a whole file up front, so bad data fails at start-up with file:line, not mid-run.
    e2e: 'MR||text' lines, or a .csv file with columns mr and ref (e2e.read_csv)."""
    if fmt not in FORMATS:
        raise ConfigError(f"config key 'data.format': expected one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"data file {path}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"data file {path}: is a directory, expected a file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"data file {path}:{line}: not UTF-8 text (binary data?)") from None
    if fmt == "e2e" and path.suffix.lower() == ".csv":  # the official E2E release
        examples = [Example(mr, ref, mr) for mr, ref in read_csv(text, path)]
        if not examples:
            raise ConfigError(f"data file {path}: no examples (only a header), expected rows with columns mr and ref")
        return examples
    parse = {"e2e": _parse_e2e, "jsonl": _parse_jsonl, "chat": _parse_chat}[fmt]
    # split on "\n" only: splitlines() also breaks on U+2028, form feeds, ... (wrong line numbers)
    examples = [parse(line, f"{path}:{i}") for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not examples:
        raise ConfigError(f"data file {path}: no examples (empty file), expected {fmt} lines")
    return examples


def _parse_e2e(line: str, where: str) -> Example:
    if "||" not in line:
        raise ConfigError(f"data file {where}: no '||' separator, expected 'meaning representation||text'")
    mr, text = (s.strip() for s in line.split("||", 1))
    if not mr or not text:
        raise ConfigError(
            f"data file {where}: empty {'meaning representation' if not mr else 'text'}, "
            "expected 'meaning representation||text'"
        )
    return Example(mr, text, mr)


def _parse_jsonl(line: str, where: str) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f'data file {where}: invalid JSON ({e.msg}), expected {{"prompt": ..., "completion": ...}}'
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "completion")):
        raise ConfigError(f"data file {where}: expected an object with string fields 'prompt' and 'completion'")
    if not obj["completion"].strip():
        raise ConfigError(f"data file {where}: empty 'completion'")
    return Example(obj["prompt"], obj["completion"], obj["prompt"])


def _parse_chat(line: str, where: str) -> Example:
    messages = parse_chat(line, where)
    first_user = next((c for r, c in messages if r == "user"), "")
    return Example("", "", first_user, messages, where)


# ---------------------------------------------------------------- encoding


@dataclass
class EncodedData:
    input_ids: torch.Tensor  # [N, T] int64, pad_token_id in padding
    attention_mask: torch.Tensor  # [N, T] int64
    labels: torch.Tensor  # [N, T] int64, token ids on completion tokens, -100 elsewhere (unshifted)
    groups: list[str]
    truncated: int  # rows cut to max_seq_len

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode_examples(examples: list[Example], tok: Tokenizer, max_seq_len: int, fmt: str = "e2e") -> EncodedData:
    """Pad / truncate every row to max_seq_len; labels (unshifted) only on the targets: the
    completion + eos (e2e, jsonl), the assistant turns (chat)."""
    import torch

    n, t = len(examples), max_seq_len
    ids = torch.full((n, t), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    labels = torch.full((n, t), IGNORE, dtype=torch.long)
    truncated = 0
    for i, ex in enumerate(examples):
        if fmt == "chat":
            row, targets, cut = encode_chat(ex.messages, getattr(tok, "hf", None), t, ex.where)
        else:
            row, targets, cut = _encode_pair(ex, tok, fmt, t)
        truncated += cut
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(targets), ids[i, : len(row)], IGNORE)
    return EncodedData(ids, mask, labels, [ex.group for ex in examples], truncated)


def _encode_pair(ex: Example, tok: Tokenizer, fmt: str, t: int) -> tuple[list[int], list[bool], bool]:
    """(ids, targets, cut) of a prompt / completion row: targets on the completion and eos.
    Too long: the completion keeps min(len, max(T // 2, T - len(prompt))) tokens and the
    prompt its first T - kept tokens, so every row keeps targets (DESIGN §8)."""
    if fmt == "e2e":
        prompt, completion = tok.encode(ex.prompt + " ||"), tok.encode(" " + ex.completion) + [tok.eos_token_id]
    else:
        prompt, completion = tok.encode(ex.prompt), tok.encode(ex.completion) + [tok.eos_token_id]
    cut = len(prompt) + len(completion) > t
    if cut:
        completion = completion[: min(len(completion), max(t // 2, t - len(prompt)))]
        prompt = prompt[: t - len(completion)]
    return prompt + completion, [False] * len(prompt) + [True] * len(completion), cut


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def tokens(self) -> int:
        """Non-padding input tokens."""
        return int(self.attention_mask.sum())

    @property
    def target_tokens(self) -> int:
        return target_count(self.labels)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    def split(self, parts: int) -> list[Batch]:
        """Micro-batches of consecutive rows (torch.chunk sizes: the server cuts its copy of the
        labels the same way)."""
        return [Batch(*t) for t in zip(*(x.chunk(parts) for x in (self.input_ids, self.attention_mask, self.labels)))]


def target_count(labels: torch.Tensor) -> int:
    """Positions >= 1 with a label: what the shifted loss averages over."""
    return int((labels[:, 1:] != IGNORE).sum())


def make_batch(data: EncodedData, indices: list[int]) -> Batch:
    import torch

    idx = torch.tensor(indices, dtype=torch.long)
    return Batch(data.input_ids[idx], data.attention_mask[idx], data.labels[idx])


# ---------------------------------------------------------------- who gets what


def partition(groups: list[str], num_clients: int, scheme: str, alpha: float, seed: int) -> list[list[int]]:
    """Split example indices among clients, deterministically from the seed.

    iid: a shuffled even split. dirichlet: each group's examples (an E2E meaning
    representation) split with proportions ~ Dir(alpha), the usual label-skew scheme.
    local: `groups` are one client's own file; every row is its.
    """
    n = len(groups)
    if scheme == "local":  # each client's own file: all of it is its data
        return [list(range(n)) for _ in range(num_clients)]
    if scheme not in ("iid", "dirichlet"):
        raise ConfigError(f"config key 'data.partition': expected 'iid' or 'dirichlet', got {scheme!r}")
    if n < num_clients:
        raise ConfigError(
            f"training data: {n} examples for {num_clients} clients; expected at least one example per client"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    else:
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        buckets: list[list[int]] = [[] for _ in range(num_clients)]
        for g in sorted(by_group):
            members = rng.permutation(by_group[g])
            # counts ~ Multinomial(n, p): flooring cumulative cut points would give the last client a remainder
            counts = rng.multinomial(len(members), rng.dirichlet(np.full(num_clients, alpha)))
            for c, share in enumerate(np.split(members, np.cumsum(counts)[:-1])):
                buckets[c].extend(int(i) for i in share)
        parts = [np.array(b, dtype=np.int64) for b in buckets]
    out = [sorted(int(i) for i in p) for p in parts]
    empty = [c for c, p in enumerate(out) if not p]
    if empty:
        raise ConfigError(
            f"config key 'data.dirichlet_alpha': the partition left client {empty[0] + 1} without data; "
            f"expected a larger alpha (got {alpha}) or fewer clients"
        )
    return out


class Sampler:
    """Endless, deterministic stream of batches of one client's rows: one reshuffle per epoch."""

    def __init__(self, indices: list[int], batch_size: int, seed: int, client: int):
        if not indices or batch_size < 1:
            raise ValueError(f"Sampler needs indices and batch_size >= 1, got {len(indices)} and {batch_size}")
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.client = client
        self.position = 0  # rows consumed so far (checkpoint state)
        self._cached: tuple[int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, self.client, epoch]).permutation(self.indices))
        return self._cached[1]

    def next_indices(self) -> list[int]:
        out: list[int] = []
        n = len(self.indices)
        while len(out) < self.batch_size:
            epoch, offset = divmod(self.position, n)
            take = min(self.batch_size - len(out), n - offset)
            out.extend(int(i) for i in self._epoch(epoch)[offset : offset + take])
            self.position += take
        return out


def shard(n: int, num_shards: int, shard_index: int) -> list[int]:
    """Validation rows of one client: every num_shards-th row."""
    return list(range(shard_index, n, num_shards))


def train_val_paths(cfg: JobConfig) -> tuple[str, str]:
    """The configured files (possibly with {client}), or the packaged E2E sample."""
    train, val = packaged_data_paths()
    if (cfg.data.train_path is None or cfg.data.val_path is None) and cfg.data.format != "e2e":
        raise ConfigError(
            "config key 'data.val_path': the packaged sample is e2e; set data.train_path and "
            f"data.val_path for data.format={cfg.data.format}"
        )
    return cfg.data.train_path or str(train), cfg.data.val_path or str(val)


def read_split(cfg: JobConfig, which: str, client: int | None) -> list[Example]:
    """The training (`which="train"`) or validation examples this rank reads: client `client`'s
    own file for a {client} path; with client None (central) the union of the files of clients
    1..data.clients, in client order. data.val_limit applies to each validation file."""
    path = train_val_paths(cfg)[0 if which == "train" else 1]
    fmt = cfg.data.format
    limit = cfg.data.val_limit if which == "val" else None
    if CLIENT not in path:
        return first_groups(read_examples(path, fmt), limit, fmt)
    examples = []
    for c in [client] if client is not None else range(1, cfg.data.clients + 1):
        own = path.replace(CLIENT, str(c))
        try:
            examples += first_groups(read_examples(own, fmt), limit, fmt)
        except ConfigError as e:
            reason = str(e).removeprefix(f"data file {own}").lstrip(":")
            raise ConfigError(f"client {c}: config key 'data.{which}_path': {own}:{reason}") from None
    return examples


def first_groups(examples: list[Example], limit: int | None, fmt: str) -> list[Example]:
    """data.val_limit: the rows of the first `limit` meaning representations (e2e: every reference
    of each, wherever in the file), or the first `limit` rows (other formats); None: all."""
    if limit is None:
        return examples
    if fmt != "e2e":
        return examples[:limit]
    keep = set(list(dict.fromkeys(ex.group for ex in examples))[:limit])
    return [ex for ex in examples if ex.group in keep]


def rows_of(cfg: JobConfig, groups: list[str], num_clients: int, rank: int) -> list[int]:
    """The training rows of rank `rank` (a client: its share of the partition; rank 0 alone: all)."""
    d = cfg.data
    return partition(groups, max(1, num_clients), d.scheme, d.dirichlet_alpha, cfg.run.seed)[max(0, rank - 1)]
