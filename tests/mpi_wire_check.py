"""`mpirun -n 3 python tests/mpi_wire_check.py`: the MPI transport's contract where only MPI
shows it. Rank 0 receives, ranks 1 and 2 send; rank 0 prints one JSON line of what it saw."""

from __future__ import annotations

import json
import time

import torch
from mpi4py import MPI

from splitlora_mpi.errors import CommTimeout
from splitlora_mpi.metrics import Metrics
from splitlora_mpi.wire import EVAL, STOP, TRAIN
from splitlora_mpi.wire.mpi import MpiTransport


def tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 16, 8, generator=g),
        torch.randn(3, 5, generator=g).to(torch.bfloat16),
        torch.randint(-100, 100, (7,), dtype=torch.int8, generator=g),
        torch.randint(0, 1 << 40, (2, 3), dtype=torch.int64, generator=g),
        torch.tensor(3.5, dtype=torch.float64),  # 0-dim
        torch.empty(0, 4),
        torch.randn(6, 4, generator=g).t(),  # not contiguous
    ]


KINDS = ["activations", "activations", "labels", "labels", "control", "control", "gradients"]
STEPS = 30
t = MpiTransport(timeout_s=10.0, metrics=Metrics(MPI.COMM_WORLD.Get_rank()))
if t.rank == 0:
    report: dict = {}
    # arrival order: rank 2 sends first; rank 1 after its go
    got = t.recv_tensors([2], TRAIN, KINDS)
    t.send_object(1, EVAL, "go")
    got |= t.recv_tensors([1], TRAIN, KINDS)
    report["equal"] = all(
        m.tensor.dtype == x.dtype and torch.equal(m.tensor, x) for r in (1, 2) for m, x in zip(got[r], tensors(r))
    )
    report["step_flag"] = {r: [got[r][0].step, got[r][0].flag] for r in (1, 2)}
    # per-source FIFO and pooled buffers: rank 1 sent STEPS messages without waiting for us;
    # the first is held, the others are dropped as soon as they are read
    held = t.recv_tensors([1], TRAIN, ["activations"])[1][0]
    first = held.tensor.clone()
    steps = [held.step]
    before = t.pool.allocations
    for _ in range(STEPS - 1):
        steps.append(t.recv_tensors([1], TRAIN, ["activations"])[1][0].step)
    report["steps"] = steps
    report["held_intact"] = torch.equal(held.tensor, first)
    report["allocations_for_later_messages"] = t.pool.allocations - before
    report["received"] = t.metrics.received_by_kind()
    # a silent rank: 2 sends nothing more
    t.timeout_s = 0.5
    start = time.monotonic()
    try:
        t.recv_tensors([1, 2], EVAL + 50, ["activations"])
    except CommTimeout as e:
        report["timeout"] = str(e)
    report["timeout_s"] = time.monotonic() - start
    print(json.dumps(report), flush=True)
    t.timeout_s = 10.0
    sent = t.recv_objects([1, 2], EVAL)
    print(json.dumps({"sent": {r: sent[r] for r in (1, 2)}}), flush=True)
else:
    if t.rank == 1:
        t.recv_objects([0], EVAL)
    t.send_tensors(TRAIN, 10 + t.rank, {0: list(zip(tensors(t.rank), KINDS))}, flag=STOP if t.rank == 2 else 0)
    if t.rank == 1:
        waits = [t.isend_tensors(TRAIN, s, {0: [(torch.full((64, 64), float(s)), "activations")]})
                 for s in range(STEPS)]  # fmt: skip
        for wait in waits:
            wait()
    t.send_object(0, EVAL, t.metrics.sent_by_kind())
