"""Activations and gradients on the wire (`comm.activation_dtype`): float32 as computed,
bfloat16 / float16 (half the bytes), or int8 with one absmax scale per token (a quarter of
the bytes plus 4 bytes per token). Pure tensor code: no MPI, no model."""

from __future__ import annotations

import torch


def wire_parts(wire_dtype: str) -> int:
    """How many tensors one encoded tensor travels as."""
    return 2 if wire_dtype == "int8" else 1


def encode(t: torch.Tensor, wire_dtype: str) -> list[torch.Tensor]:
    """[t in the wire dtype], or for int8 [values, per-token scales] (scales over the last dim)."""
    if wire_dtype != "int8":
        return [t.detach().to(getattr(torch, wire_dtype))]
    t = t.detach().float()
    scale = t.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
    q = torch.round(t / scale).clamp_(-127, 127).to(torch.int8)
    return [q, scale.squeeze(-1)]


def decode(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `encode`, in the compute dtype."""
    if len(parts) == 2:
        q, scale = parts
        return (q.float() * scale.unsqueeze(-1)).to(dtype)
    return parts[0].to(dtype)
