"""`python tests/canary_rank.py ARGS...`: the CLI, with every activation tensor a client sends at
step STEP filled with CANARY repeated (same shape and dtype): bytes a packet capture can look
for. No hook in the package: the transport's send is wrapped here."""

from __future__ import annotations

import sys

import torch

STEP = 1
CANARY = (0.125, -2.5, 0.75, 1.0625, -0.375, 3.0, -1.25, 0.5)


def canary_bytes(dtype: torch.dtype) -> bytes:
    """The pattern as it lies in a tensor of `dtype` (and so in the MPI buffer)."""
    return torch.tensor(CANARY, dtype=dtype).view(torch.uint8).numpy().tobytes()


def _filled(tensor: torch.Tensor) -> torch.Tensor:
    pattern = torch.tensor(CANARY, dtype=tensor.dtype, device=tensor.device)
    return pattern.repeat(tensor.numel() // len(CANARY) + 1)[: tensor.numel()].view(tensor.shape)


if __name__ == "__main__":
    from splitlora_mpi import cli
    from splitlora_mpi.wire import mpi

    send = mpi.MpiTransport.isend_tensors

    def isend_tensors(self, phase, step, messages, *args, **kwargs):
        if step == STEP:
            messages = {dest: [(_filled(t) if kind == "activations" else t, kind) for t, kind in tensors]
                        for dest, tensors in messages.items()}  # fmt: skip
        return send(self, phase, step, messages, *args, **kwargs)

    mpi.MpiTransport.isend_tensors = isend_tensors
    sys.exit(cli.main(sys.argv[1:]))
