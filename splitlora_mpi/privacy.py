"""Differential privacy on the cut layer (`privacy.clip`, `privacy.noise_multiplier`): each
example's activations are scaled to an L2 norm of at most `clip`, then Gaussian noise of
std `noise_multiplier * clip` is added to every coordinate, before anything leaves the
client (training and validation uploads alike). This is the Gaussian mechanism on one
example's activations per release; the accounting over steps is left to the user.
Gradients flow through the clipping (it is part of the client's function), not the noise."""

from __future__ import annotations

import torch


def privatize(h: torch.Tensor, clip: float, noise_multiplier: float) -> torch.Tensor:
    """`h` [batch, ...] clipped per example and noised; `h` itself when clip is 0 (off).
    The noise draws from torch's global RNG, which checkpoints save and restore."""
    if clip <= 0:
        return h
    norms = h.flatten(1).norm(dim=1).clamp_min(1e-12)
    clipped = h * (clip / norms).clamp(max=1.0).view(-1, *[1] * (h.dim() - 1))
    if noise_multiplier <= 0:
        return clipped
    return clipped + torch.randn_like(clipped) * (noise_multiplier * clip)
