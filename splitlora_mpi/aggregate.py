"""FedAvg of client adapters: pure functions (tested without MPI) plus one glue call.

The clients sum `[w * flat_adapter, w]` with a single Allreduce of one float64 buffer, so
the weighted mean needs no second collective and is accumulated in float64 (deterministic).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

State = dict[str, torch.Tensor]


def flatten(state: State) -> np.ndarray:
    """All tensors of an adapter state, in sorted key order, as one float64 vector."""
    return np.concatenate([state[k].detach().cpu().double().reshape(-1).numpy() for k in sorted(state)])


def unflatten(flat: np.ndarray, like: State) -> State:
    """Inverse of `flatten`: shapes, dtypes and devices taken from `like`."""
    expected = sum(t.numel() for t in like.values())
    if flat.size != expected:
        raise ValueError(f"flat adapter has {flat.size} values, expected {expected}")
    out: State = {}
    offset = 0
    for key in sorted(like):
        ref = like[key]
        n = ref.numel()
        out[key] = torch.from_numpy(flat[offset : offset + n].copy()).reshape(ref.shape).to(ref.dtype).to(ref.device)
        offset += n
    return out


def weighted_contribution(state: State, weight: float) -> np.ndarray:
    """What one client adds to the Allreduce: its weighted adapter and its weight."""
    if weight <= 0:
        raise ValueError(f"FedAvg weight must be > 0, got {weight}")
    return np.append(flatten(state) * weight, weight)


def mean_from_sum(summed: np.ndarray, like: State) -> State:
    """The weighted mean, given the element-wise sum of all clients' contributions."""
    return unflatten(summed[:-1] / summed[-1], like)


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """Reference FedAvg over states held in one process (what the Allreduce path computes)."""
    summed = np.sum([weighted_contribution(s, w) for s, w in zip(states, weights)], axis=0)
    return mean_from_sum(summed, states[0])


def fedavg(state: State, weight: float, allreduce_sum: Callable[[np.ndarray], np.ndarray]) -> State:
    """Token-weighted average of this client's adapter with every other client's."""
    return mean_from_sum(allreduce_sum(weighted_contribution(state, weight)), state)


def fedavg_by_key(
    state: State,
    weights: dict[str, float],
    layout: dict[str, list[int]],
    allreduce_sum: Callable[[np.ndarray], np.ndarray],
) -> State:
    """FedAvg where ranks hold different subsets of the tensors in `layout` (per-client cut
    points): each tensor is the weighted mean over the ranks that hold it. One Allreduce of
    [w_k * tensor_k (zeros where not held) for every key k, w_k for every key]."""
    keys = sorted(layout)
    sizes = [int(np.prod(layout[k])) for k in keys]
    held = [k in state for k in keys]
    values = [state[k].detach().cpu().double().reshape(-1).numpy() * weights[k] if h else np.zeros(n)
              for k, n, h in zip(keys, sizes, held)]  # fmt: skip
    summed = allreduce_sum(np.concatenate([*values, [weights[k] if h else 0.0 for k, h in zip(keys, held)]]))
    out: State = {}
    offset = 0
    for i, (key, n) in enumerate(zip(keys, sizes)):
        if held[i]:
            ref = state[key]
            mean = summed[offset : offset + n] / summed[sum(sizes) + i]
            out[key] = torch.from_numpy(mean).reshape(ref.shape).to(ref.dtype).to(ref.device)
        offset += n
    return out
