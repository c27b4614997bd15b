"""Clipping and noise on the cut layer: the bound holds, the noise has the stated scale,
and off means untouched."""

from __future__ import annotations

import pytest
import torch

from splitlora_mpi.config import load_config
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.privacy import privatize


def test_off_is_the_identity():
    h = torch.randn(2, 4, 8)
    assert privatize(h, 0.0, 5.0) is h


def test_each_example_is_clipped_to_the_bound_and_small_ones_are_kept():
    h = torch.randn(6, 5, 8)
    h[0] *= 1e-3  # already inside the bound
    out = privatize(h, clip=1.0, noise_multiplier=0.0)
    norms = out.flatten(1).norm(dim=1)
    assert bool((norms <= 1.0 + 1e-6).all()) and torch.allclose(norms[1:], torch.ones(5))
    assert torch.allclose(out[0], h[0])
    assert torch.allclose(out[1] / out[1].norm(), h[1] / h[1].norm())  # direction kept


def test_noise_std_is_multiplier_times_clip():
    torch.manual_seed(0)
    h = torch.zeros(64, 32, 64)
    out = privatize(h, clip=0.5, noise_multiplier=2.0)
    assert out.std().item() == pytest.approx(1.0, rel=0.02) and abs(out.mean().item()) < 0.01


def test_gradients_flow_through_the_clipping():
    h = torch.randn(3, 4, requires_grad=True)
    privatize(h, clip=0.1, noise_multiplier=1.0).sum().backward()
    assert h.grad is not None and bool((h.grad.abs() > 0).any())


def test_privacy_needs_a_split_mode_and_a_clip():
    with pytest.raises(ConfigError, match="privacy.clip"):
        load_config(None, ["run.mode=fedlora", "privacy.clip=1.0"])
    with pytest.raises(ConfigError, match="privacy.noise_multiplier"):
        load_config(None, ["privacy.noise_multiplier=1.0"])
