"""A side's frozen base in fewer bits, by bitsandbytes: the blocks' linear layers in LLM.int8
or NF4 (what QLoRA users know), the client's embedding table in 8 bits.

Each module is quantized as soon as its weights are filled (model.py builds one block at a
time), so a float copy of the whole base never exists. The LoRA adapters PEFT puts around
these modules stay float32. No MPI here.
"""

from __future__ import annotations

import ctypes
import logging
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError

QUANTIZED = ("int8", "nf4")
INT8_CHUNK_ROWS = 4096


def bitsandbytes(key: str) -> Any:
    """The bitsandbytes module, or one line saying how to get it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(f"config key '{key}': needs bitsandbytes (pip install 'splitlora_mpi[quant]')") from None
    return bnb


def quantize_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace every nn.Linear (and GPT-2 Conv1D) under `module` by its int8 / nf4 twin, in place."""
    bnb = bitsandbytes("model.quantize")
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, Conv1D)):
                continue
            weight = child.weight.data.t() if isinstance(child, Conv1D) else child.weight.data  # (out, in)
            out_features, in_features = weight.shape
            has_bias = child.bias is not None
            with torch.device("meta"):
                if kind == "int8":
                    q = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(
                        in_features, out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4"
                    )
            if kind == "int8":
                q.weight = _int8_rows(bnb, weight)
            else:
                q.weight = bnb.nn.Params4bit(
                    weight.contiguous(), requires_grad=False, quant_type="nf4", compress_statistics=False
                )
            if has_bias:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q.to(device))  # (nf4: bitsandbytes quantizes on this move)


def embedding_8bit(table: nn.Embedding, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The token embedding table at one byte per value plus a float32 scale per row; it looks up
    vectors in `dtype`."""
    bnb = bitsandbytes("model.client_embedding_8bit")
    with torch.device("meta"):
        q = bnb.nn.Embedding8bit(table.num_embeddings, table.embedding_dim, dtype=dtype)
    q.weight = _int8_rows(bnb, table.weight.data)
    q.padding_idx = table.padding_idx
    q._save_to_state_dict = partial(_table_state, q)  # (bitsandbytes' raises; PEFT reads state dicts)
    return q.to(device)


def _int8_rows(bnb: Any, weight: torch.Tensor) -> nn.Parameter:
    """LLM.int8's rows (int8, one float32 scale per row), quantized a few rows at a time: the
    float16 copy bitsandbytes quantizes from is one chunk, not the whole matrix."""
    rows, scales = [], []
    for chunk in weight.split(INT8_CHUNK_ROWS):
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(chunk.to(torch.float16))
        rows.append(cb)
        scales.append(scb)
    cb = torch.cat(rows)
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=torch.cat(scales))


def _table_state(table: nn.Module, destination: dict, prefix: str, keep_vars: bool) -> None:
    """An 8-bit table's state: its int8 rows and their float32 scales."""
    nn.Embedding._save_to_state_dict(table, destination, prefix, keep_vars)
    destination[prefix + "weight_scale"] = table.weight.SCB if keep_vars else table.weight.SCB.detach()


def footprint(*models: nn.Module) -> tuple[int, int]:
    """(values, bytes) of the frozen base tensors of `models`, each name counted once (a whole
    model held as two parts has one tied table): logical values (a 4-bit matrix counts
    out x in) and the bytes really held, quantization statistics included."""
    frozen: dict[str, tuple[nn.Parameter, Any]] = {}
    for model in models:
        seen: set[int] = set()  # (a tied head's weight is the table's)
        for owner_name, owner in model.named_modules():
            for name, p in owner.named_parameters(prefix=owner_name, recurse=False):
                if "lora_" not in name and id(p) not in seen:
                    seen.add(id(p))
                    frozen.setdefault(name, (p, owner))
    values = nbytes = 0
    for p, owner in frozen.values():
        state = getattr(p, "quant_state", None)
        values += state.shape.numel() if state is not None else p.numel()
        scales = getattr(p, "SCB", None)
        if scales is None and p.dtype == torch.int8:  # (LLM.int8 moves them to its module at the first forward)
            scales = getattr(getattr(owner, "state", None), "SCB", None)
        extras = [p, scales] + ([state.absmax, state.code] if state is not None else [])
        nbytes += sum(t.numel() * t.element_size() for t in extras if t is not None)
    return values, nbytes


def release_freed_memory() -> None:
    """Give the memory of freed tensors back to the OS (glibc keeps freed heap pages: a side
    that quantizes block by block would otherwise keep the RSS of its float weights)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
