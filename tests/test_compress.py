"""Wire formats of activations and gradients: sizes and round-trip error."""

from __future__ import annotations

import pytest
import torch

from splitlora_mpi.compress import decode, encode, wire_parts


def _nbytes(parts: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


@pytest.mark.parametrize("wire, ratio", [("float32", 1), ("bfloat16", 0.5), ("float16", 0.5), ("int8", 0.25 + 1 / 64)])
def test_bytes_on_the_wire(wire, ratio):
    h = torch.randn(4, 32, 64)
    parts = encode(h, wire)
    assert len(parts) == wire_parts(wire)
    assert _nbytes(parts) == ratio * h.numel() * 4


def test_int8_error_is_within_half_a_step_of_each_tokens_scale():
    torch.manual_seed(0)
    h = torch.randn(3, 16, 64) * torch.logspace(-3, 3, 16).view(1, 16, 1)  # token scales over 6 decades
    back = decode(encode(h, "int8"), torch.float32)
    step = h.abs().amax(dim=-1, keepdim=True) / 127
    assert back.shape == h.shape and back.dtype == torch.float32
    assert bool(((back - h).abs() <= step / 2 + 1e-6 * step).all())
    assert torch.equal(decode(encode(torch.zeros(2, 3, 8), "int8"), torch.float32), torch.zeros(2, 3, 8))


def test_casts_round_trip_in_the_compute_dtype():
    h = torch.randn(2, 8, 16)
    assert torch.equal(decode(encode(h, "float32"), torch.float32), h)
    back = decode(encode(h, "bfloat16"), torch.float32)
    assert back.dtype == torch.float32 and torch.allclose(back, h, rtol=1e-2, atol=0)
