"""Plan a split before running it: `python -m splitlora_mpi.plan --model DIR_or_config.json`.

For every cut point K (`split.client_layers`) it prints what a client and the server hold and
what one training step sends, from the model's config.json alone: the model is built on the
meta device (no memory, no weights read), so an 8 B model plans on a laptop.

Per side: frozen base parameters (count, and bytes at the side's precision), LoRA parameters,
their training state (16 B each: float32 weights, grads and AdamW's two moments), and the
activations autograd saves for backward on `--batch x --seq` tokens. Per token and block:

    norms:      each norm's input (RMSNorm keeps a float32 copy) + its float32 statistics
    attention:  q, k, v (the outputs of the projections before the last; k and v repeated to
                every head, as with a padding mask) + the mask (seq values) + the attention
                output (the last projection's input) + one float32 log-sum-exp per head
                (eager attention: + the probabilities, heads x seq)
    MLP:        the outputs of the projections before the last; gated (their outputs are
                2 x the last's input): + the activation's output; GPT-2's tanh GELU: + 3 x
    LoRA:       r per adapted layer, and the adapted layers' inputs, in float32: on a float32
                side one per tensor read (q, k, v share theirs; the attention output is saved
                already); on a 16-bit side one copy per adapted layer (PEFT casts its input)

in the side's dtype unless said. The client's first block saves no input for its first norm
(nothing before it trains) and the client holds its cut output; the server adds the final
norm's input and the loss's float32 log-probabilities (rows x (seq-1) x vocab). Batches are
taken as padded (a batch without padding saves no mask and k, v unrepeated: less), dropout as
off; transient buffers of backward are not counted (measured checks: docs/planning.md).

Wire bytes per step and client, as the transport frames a step (no label privacy,
comm.micro_batches 1): up = activations (B x T x H in comm.activation_dtype; int8: + one
float32 scale per token) + mask and labels (2 x B x T int32) + one 64-byte header per tensor;
down = their gradient, framed the same way. Exit codes: 0 (also when no cut fits), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .cli import OneLineParser
from .config import JobConfig
from .errors import ConfigError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
WIRE_BYTES = {**DTYPE_BYTES, "int8": 1}
QUANTIZE = ("none", "int8", "nf4")
HEADER_BYTES = 64  # wire/__init__.py: one header per tensor message
NF4_BLOCK = 64  # values per float32 absmax (bitsandbytes' default, no double quantisation)
NF4_CODE_BYTES = 64  # each layer's 16-value NF4 code table, float32
LORA_STATE_BYTES = 16  # float32 weight + grad + AdamW's exp_avg and exp_avg_sq
# saved tensors of activations that are several ops in Python, beyond their input (per value)
ACTIVATION_EXTRA = {"NewGELUActivation": 3, "QuickGELUActivation": 1}
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
LINK_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}  # fmt: skip


def parse_size(text: str, what: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '3000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(f"{what} {text!r}: expected a size such as 2GiB, 512MiB, 1.5GB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def parse_link(text: str) -> float:
    """'20Mbit', '1Gbit', '100Mbit/s', '1Gbps' -> bits per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)(/s)?\s*", text)
    rate = float(m.group(1)) * LINK_UNITS[m.group(2).lower()] if m and m.group(2).lower() in LINK_UNITS else 0
    if rate <= 0:
        raise ConfigError(f"--link {text!r}: expected a positive rate such as 20Mbit, 100Mbit/s, 1Gbit")
    return rate


# ---------------------------------------------------------------- the model, as plain numbers


@dataclass(frozen=True)
class Weight:
    numel: int
    rows: int  # rows with their own scale when quantized: a block's linear weight or the embedding table
    kind: str = "other"  # "linear" (in a block: int8 / nf4), "table" (the input embedding: 8-bit on a client)


@dataclass(frozen=True)
class Saves:
    """Values per token a block saves for backward, by how they are stored."""

    dtype: int = 0  # in the side's dtype
    fp32: int = 0  # always float32 (norm statistics, log-sum-exp, LoRA's r-wide middles)
    norm_in: int = 0  # the norms' inputs (float32 for an RMSNorm, which upcasts; else the side's dtype)
    lora_shared: int = 0  # LoRA inputs, float32 side: layers reading one tensor share it
    lora_each: int = 0  # LoRA inputs, 16-bit side: each adapted layer keeps its own float32 copy
    eager_heads: int = 0  # eager attention: the probabilities, heads x seq
    repeat_kv: int = 0  # masked attention: k and v repeated from the kv heads to every head


@dataclass
class Piece:
    """One part of the model: its frozen tensors and LoRA values; for a block what it saves."""

    weights: list[Weight] = field(default_factory=list)
    lora: int = 0
    saves: Saves = Saves()


@dataclass
class Anatomy:
    model_type: str
    blocks: list[Piece]
    embedding: Piece
    client_extra: Piece  # learned positions, embedding-side norms
    final_norm: Piece
    head: Piece  # tied: only what is not the embedding table (a bias)
    tied: bool
    hidden: int
    vocab: int
    head_dim: int
    rotary: bool
    rms_norm: bool
    targets: str

    @property
    def total_params(self) -> int:
        pieces = [self.embedding, self.client_extra, self.final_norm, self.head, *self.blocks]
        return sum(w.numel for p in pieces for w in p.weights)


def anatomy(config: Any, lora_r: int, targets: list[str] | None) -> Anatomy:
    """The model's parts from its config on the meta device; LoRA by PEFT exactly as the job
    applies it (model.peft_lora_config)."""
    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from .model import peft_lora_config
    from .structure import is_norm, layout_of

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lm = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--model: cannot build a causal LM from its config: {e}") from None
    layout = layout_of(lm)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    modules = dict(lm.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    base = f"{lm.base_model_prefix}." if lm.base_model is not lm else ""
    n = int(config.num_hidden_layers)
    places = {f"{base}{layout.blocks}.{i}.": ("block", i) for i in range(n)}
    places[name_of[id(lm.get_input_embeddings())] + "."] = ("embedding", 0)
    places.update({f"{base}{c}.": ("client_extra", 0) for c in layout.client_only()})
    places[f"{base}{layout.final_norm}."] = ("final_norm", 0)
    places[name_of[id(lm.get_output_embeddings())] + "."] = ("head", 0)
    hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    repeat = 2 * (heads - int(getattr(config, "num_key_value_heads", None) or heads)) * head_dim
    eager = getattr(lm.config, "_attn_implementation", None) == "eager"
    blocks = getattr(lm.base_model, layout.blocks)
    groups = [_groups(blocks[i], f"{base}{layout.blocks}.{i}.") for i in range(n)]
    norms = [[m for m in blocks[i].modules() if is_norm(m)] for i in range(n)]
    cfg = JobConfig()
    cfg.lora.r, cfg.lora.target_modules = lora_r, targets
    lora_config = peft_lora_config(cfg, config.model_type)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(lm, lora_config)
    except ValueError as e:
        raise ConfigError(f"--target-modules: {e}") from None
    pieces: dict[tuple[str, int], Piece] = {("block", i): Piece() for i in range(n)}
    for name, p in lm.named_parameters():  # (a tied head's weight is listed once, as the embedding)
        prefix = next((pre for pre in places if name.startswith(pre)), None)
        if prefix is None:
            raise ConfigError(f"--model: cannot place parameter {name} in the split")
        piece = pieces.setdefault(places[prefix], Piece())
        if p.requires_grad:
            piece.lora += p.numel()
        else:
            piece.weights.append(_weight(name, p, places[prefix][0], modules))
    adapted = {name for name, m in lm.named_modules() if isinstance(m, LoraLayer)}
    for i in range(n):
        saves = _block_saves(groups[i], norms[i], hidden, heads, lora_r, adapted, eager)
        pieces[("block", i)].saves = replace(saves, repeat_kv=repeat)
    wanted = lora_config.target_modules
    return Anatomy(
        config.model_type, [pieces[("block", i)] for i in range(n)], pieces.get(("embedding", 0), Piece()),
        pieces.get(("client_extra", 0), Piece()), pieces.get(("final_norm", 0), Piece()),
        pieces.get(("head", 0), Piece()), tied, hidden, int(config.vocab_size), head_dim, layout.rotary is not None,
        any("RMS" in type(m).__name__ for m in norms[0]),
        wanted if isinstance(wanted, str) else ",".join(sorted(wanted)),
    )  # fmt: skip


def _linear(m: Any) -> bool:
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, (nn.Linear, Conv1D))


def _weight(name: str, p: Any, place: str, modules: dict[str, Any]) -> Weight:
    """A frozen tensor and how it may be stored: a block's nn.Linear / GPT-2 Conv1D weight
    (int8: a scale per output row), the input embedding table (8-bit: a scale per row)."""
    owner = modules.get(name.rsplit(".", 1)[0].removesuffix(".base_layer"))  # (PEFT wrapped it)
    if place == "block" and name.endswith(".weight") and _linear(owner):
        return Weight(p.numel(), _in_out(owner)[1], "linear")
    if place == "embedding" and name.endswith(".weight") and p.dim() == 2:
        return Weight(p.numel(), int(p.shape[0]), "table")
    return Weight(p.numel(), 0)


def _in_out(m: Any) -> tuple[int, int]:
    return (int(m.in_features), int(m.out_features)) if hasattr(m, "in_features") else (int(m.nx), int(m.nf))


@dataclass(frozen=True)
class Group:
    """The linear layers of one attention or MLP module, in order: the last one projects back."""

    attention: bool
    names: list[str]
    sizes: list[tuple[int, int]]  # (in, out) each
    act_extra: int


def _groups(block: Any, prefix: str) -> list[Group]:
    out = []
    for pname, parent in block.named_modules():
        children = list(parent.named_children())
        lins = [(f"{prefix}{pname}.{c}" if pname else f"{prefix}{c}", m) for c, m in children if _linear(m)]
        if lins:
            extra = max((ACTIVATION_EXTRA.get(type(m).__name__, 0) for _, m in children), default=0)
            out.append(Group("Attention" in type(parent).__name__, [n for n, _ in lins],
                             [_in_out(m) for _, m in lins], extra))  # fmt: skip
    return out


def _block_saves(
    groups: list[Group], norms: list[Any], hidden: int, heads: int, r: int, adapted: set[str], eager: bool
) -> Saves:
    dtype = fp32 = shared = each = 0
    for m in norms:
        fp32 += 1 if "RMS" in type(m).__name__ else 2  # rstd (and the mean of a LayerNorm)
    for g in groups:
        *first, (last_in, _) = g.sizes
        dtype += sum(o for _, o in first)
        if g.attention:
            dtype += last_in
            fp32 += heads
        elif sum(o for _, o in first) == 2 * last_in:  # gated: the activation's output times the up projection
            dtype += last_in
        dtype += g.act_extra * last_in
        inputs = [first[0][0]] * len(first) + [last_in]  # the first layers read one tensor, the last its own
        mine = [i for i, name in enumerate(g.names) if name in adapted]
        shared += inputs[0] if any(i < len(first) for i in mine) else 0
        shared += last_in if len(first) in mine and not g.attention else 0  # (attention: its saved output)
        each += sum(inputs[i] for i in mine)
        fp32 += r * len(mine)
    return Saves(dtype, fp32, hidden * len(norms), shared, each, heads if eager else 0)


# ---------------------------------------------------------------- sizing a side


@dataclass(frozen=True)
class Precision:
    dtype: str = "float32"
    quantize: str = "none"
    embedding_8bit: bool = False

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Workload:
    batch: int
    seq: int
    clients: int
    wire: str


def weight_bytes(w: Weight, prec: Precision, client: bool) -> int:
    """One frozen tensor at a side's precision."""
    if (w.kind == "linear" and prec.quantize == "int8") or (w.kind == "table" and client and prec.embedding_8bit):
        return w.numel + 4 * w.rows
    if w.kind == "linear" and prec.quantize == "nf4":
        return math.ceil(w.numel / 2) + 4 * math.ceil(w.numel / NF4_BLOCK) + NF4_CODE_BYTES
    return w.numel * prec.bytes


def side(a: Anatomy, role: str, k: int, prec: Precision, work: Workload) -> dict[str, int]:
    """What one side holds at cut K: counts and bytes."""
    rows = work.batch if role == "client" else work.batch * work.clients
    blocks = a.blocks[:k] if role == "client" else a.blocks[k:]
    pieces = blocks + ([a.client_extra] if role == "client" else [a.final_norm, a.head])
    if role == "client" or a.tied:  # a tied head is the embedding table: the server keeps it
        pieces.append(a.embedding)
    frozen = sum(w.numel for p in pieces for w in p.weights)
    base = sum(weight_bytes(w, prec, role == "client") for p in pieces for w in p.weights)
    lora = sum(p.lora for p in pieces)
    act = activation_bytes(a, role, blocks, rows, work.seq, prec)
    state = LORA_STATE_BYTES * lora
    return {"frozen_params": frozen, "base_bytes": base, "lora_params": lora, "lora_state_bytes": state,
            "activation_bytes": act, "total_bytes": base + state + act}  # fmt: skip


def activation_bytes(a: Anatomy, role: str, blocks: list[Piece], rows: int, seq: int, prec: Precision) -> int:
    """The formula in the module docstring, for one side's blocks on rows x seq tokens."""
    tokens, cb = rows * seq, prec.bytes
    norm_b = 4 if a.rms_norm else cb
    per_token = 0
    for p in blocks:
        x = p.saves
        lora = x.lora_shared if cb == 4 else x.lora_each
        per_token += (x.dtype + x.repeat_kv) * cb + (x.fp32 + lora) * 4 + x.norm_in * norm_b
    eager = sum(p.saves.eager_heads for p in blocks) * seq * (cb + (4 if cb < 4 else 0))
    total = tokens * (per_token + eager + len(blocks) * seq * cb)  # + each block's copy of the mask
    total += 2 * seq * a.head_dim * cb if a.rotary else 0  # cos and sin, once per side
    if role == "client":  # no input saved for the first norm; the cut output is held for backward
        total += tokens * (a.hidden * cb - a.hidden * norm_b - (1 if a.rms_norm else 2) * 4)
    else:
        total += tokens * (a.hidden * norm_b + (1 if a.rms_norm else 2) * 4)  # the final norm
        total += rows * (seq - 1) * (a.vocab * 4 + 8 + 1)  # log-probs, targets, ignore mask
    return total


def wire_bytes(work: Workload, hidden: int) -> tuple[int, int]:
    """(up, down) bytes of one training step of one client, headers included."""
    tokens = work.batch * work.seq
    tensor = tokens * hidden * WIRE_BYTES[work.wire] + HEADER_BYTES
    if work.wire == "int8":  # + a float32 scale per token, as its own tensor
        tensor += tokens * 4 + HEADER_BYTES
    return tensor + 2 * tokens * 4 + HEADER_BYTES, tensor


# ---------------------------------------------------------------- the plan


def load_model_config(spec: str) -> Any:
    """A model directory's config.json, or a config.json file; nothing else is read."""
    path = Path(spec).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"--model {spec}: not found; expected a model directory with config.json or a config.json file"
        )
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(str(file))
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--model {file}: not a usable Hugging Face config.json ({reason})") from None


def plan(a: Anatomy, cuts: list[int], client: Precision, server: Precision, work: Workload,
         link_bps: float, memory: int | None) -> dict[str, Any]:  # fmt: skip
    """Every cut's sides, wire bytes and link time; with `memory`, which fit and the deepest that does."""
    up, down = wire_bytes(work, a.hidden)
    rows = []
    for k in cuts:
        row = {"client_layers": k, "client": side(a, "client", k, client, work),
               "server": side(a, "server", k, server, work), "up_bytes": up, "down_bytes": down,
               "link_s": (up + down) * 8 / link_bps}  # fmt: skip
        if memory is not None:
            row["fits"] = row["client"]["total_bytes"] <= memory
        rows.append(row)
    fitting = [r["client_layers"] for r in rows if r.get("fits")]
    return {"cuts": rows, "client_memory_bytes": memory, "recommended": max(fitting) if fitting else None}


def _num(n: float) -> str:
    """A count in 3 significant digits: 743M, 8.03B, 53.2k."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            x = n / div
            return (f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}") + unit
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _prec(p: dict[str, Any]) -> str:
    quantize = f" {p['quantize']}" if p["quantize"] != "none" else ""
    return p["dtype"] + quantize + (", 8-bit embedding" if p["embedding_8bit"] else "")


def render(result: dict[str, Any]) -> str:
    """The plan as aligned columns for a terminal (MB / GB are 10^6 / 10^9 bytes)."""
    m, s = result["model"], result["settings"]
    lines = [
        f"{m['path']}: {m['model_type']}, {m['blocks']} blocks, hidden {m['hidden']}, vocab {m['vocab']}, "
        f"{'tied' if m['tied_head'] else 'untied'} head, {m['params']:,} parameters",
        f"LoRA r={s['lora.r']} on {s['lora.target_modules']}; {s['train.batch_size']} x {s['data.max_seq_len']} "
        f"tokens per client and step, {s['clients']} client(s); client {_prec(s['client'])}; "
        f"server {_prec(s['server'])}; wire {s['comm.activation_dtype']}; link {s['link_bps'] / 1e6:g} Mbit/s",
        "params: frozen base; LoRA: trainable; +opt: LoRA weights, grads and AdamW moments in float32 (16 B "
        "each); activ: saved for backward; up / down: bytes per step and client; link: seconds they take",
    ]
    fits = result["client_memory_bytes"] is not None
    side = ["params", "base", "LoRA", "+opt", "activ", "total"]
    table = [["K", *side, "|", *side, "|", "up", "down", "link s", *(["fits"] if fits else [])]]
    for r in result["cuts"]:
        cells = [str(r["client_layers"])]
        for role in ("client", "server"):
            x = r[role]
            cells += [_num(x["frozen_params"]), _bytes(x["base_bytes"]), _num(x["lora_params"])]
            cells += [_bytes(x[key]) for key in ("lora_state_bytes", "activation_bytes", "total_bytes")] + ["|"]
        cells += [_bytes(r["up_bytes"]), _bytes(r["down_bytes"]), f"{r['link_s']:.3f}"]
        table.append(cells + (["yes" if r["fits"] else "no"] if fits else []))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    rows = [" ".join(c.rjust(w) for c, w in zip(row, widths)) for row in table]
    bars = [i for i, ch in enumerate(rows[0]) if ch == "|"]
    over = " " * (widths[0] + 1) + "client".center(bars[0] - widths[0] - 1) + "|"
    over += "server".center(bars[1] - bars[0] - 1) + "|" + " per step and client"
    lines += [over, *rows, _verdict(result)]
    return "\n".join(line for line in lines if line)


def _verdict(result: dict[str, Any]) -> str:
    memory, k, s = result["client_memory_bytes"], result["recommended"], result["settings"]
    if memory is None:
        return ""
    given = f"{s['client_memory']} ({_bytes(memory)})"
    if k is None:
        need = min(r["client"]["total_bytes"] for r in result["cuts"])
        return f"no cut fits a client with {given}: the smallest client part needs {_bytes(need)}"
    row = next(r for r in result["cuts"] if r["client_layers"] == k)
    keys = {"split.client_layers": k, **{key: s[key] for key in ("train.batch_size", "data.max_seq_len", "lora.r",
                                                                  "comm.activation_dtype")}}  # fmt: skip
    for what, default in (("dtype", "float32"), ("quantize", "none")):  # the job's keys for the precisions
        client, server = s["client"][what], s["server"][what]
        if client == server != default:
            keys[f"model.{what}"] = client
        elif client != server:
            keys.update({f"model.client_{what}": client, f"model.server_{what}": server})
    if s["client"]["embedding_8bit"]:
        keys["model.client_embedding_8bit"] = "true"
    if s["targets_given"]:
        keys["lora.target_modules"] = f"[{s['lora.target_modules']}]"
    sets = " ".join(f"--set {key}={v}" for key, v in keys.items())
    return (f"recommended: K={k}, the deepest cut whose client fits {given}, needs "
            f"{_bytes(row['client']['total_bytes'])}: {sets}")  # fmt: skip


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    job = JobConfig()
    p = OneLineParser(prog="python -m splitlora_mpi.plan", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", required=True, help="model directory with config.json, or a config.json (no weights read)")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--client-layers", type=_positive, metavar="K", help="only this cut (split.client_layers)")
    cut.add_argument("--client-memory", metavar="SIZE", help="e.g. 2GiB: mark and recommend the deepest cut that fits")
    add("--link", default="1Gbit", help="a client's link to the server, e.g. 20Mbit, 100Mbit/s (default 1Gbit)")
    add("--batch", type=_positive, default=job.train.batch_size, help="rows per client per step (train.batch_size)")
    add("--seq", type=_positive, default=job.data.max_seq_len, help="tokens per row (data.max_seq_len)")
    add("--clients", type=_positive, default=1, help="clients: the server's batch is all of theirs (default 1)")
    add("--dtype", choices=list(DTYPE_BYTES), default=job.model.dtype, help="base weights, both sides (model.dtype)")
    add("--quantize", choices=QUANTIZE, default="none", help="blocks' linear weights, both sides (model.quantize)")
    for role in ("client", "server"):
        add(f"--{role}-dtype", choices=list(DTYPE_BYTES), help=f"--dtype for the {role} only")
        add(f"--{role}-quantize", choices=QUANTIZE, help=f"--quantize for the {role} only")
    add("--client-embedding-8bit", action="store_true", help="the client's token embedding table in 8 bits")
    add("--activation-dtype", choices=list(WIRE_BYTES), default=job.comm.activation_dtype,
        help="activations and gradients on the wire (comm.activation_dtype)")  # fmt: skip
    add("--lora-r", type=_positive, default=job.lora.r, help="LoRA rank (lora.r)")
    add("--target-modules", help="comma-separated (lora.target_modules); default: PEFT's for the family")
    add("--json", action="store_true", help="print the plan as JSON")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The plan of parsed arguments; ConfigError on bad input."""
    memory = parse_size(args.client_memory, "--client-memory") if args.client_memory else None
    link = parse_link(args.link)
    config = load_model_config(args.model)
    n = int(config.num_hidden_layers)
    if n < 2:
        raise ConfigError(f"--model {args.model}: {n} block(s); a split needs at least 2")
    if args.client_layers is not None and not 1 <= args.client_layers <= n - 1:
        raise ConfigError(f"--client-layers: expected 1..{n - 1} (the model has {n} blocks), got {args.client_layers}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and args.seq > positions:
        raise ConfigError(f"--seq: expected ≤ {positions} (the model's positions), got {args.seq}")
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    a = anatomy(config, args.lora_r, targets)
    client = Precision(
        args.client_dtype or args.dtype, args.client_quantize or args.quantize, args.client_embedding_8bit
    )
    server = Precision(args.server_dtype or args.dtype, args.server_quantize or args.quantize)
    work = Workload(args.batch, args.seq, args.clients, args.activation_dtype)
    cuts = [args.client_layers] if args.client_layers else list(range(1, n))
    result = plan(a, cuts, client, server, work, link, memory)
    model = {"path": args.model, "model_type": a.model_type, "blocks": n, "hidden": a.hidden, "vocab": a.vocab,
             "tied_head": a.tied, "params": a.total_params}  # fmt: skip
    settings = {"split.client_layers": args.client_layers, "train.batch_size": args.batch,
                "data.max_seq_len": args.seq, "lora.r": args.lora_r, "lora.target_modules": a.targets,
                "comm.activation_dtype": args.activation_dtype, "clients": args.clients, "link_bps": link,
                "client": asdict(client), "server": asdict(server), "client_memory": args.client_memory,
                "targets_given": targets is not None}  # fmt: skip
    return {"model": model, "settings": settings, **result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
