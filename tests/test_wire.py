"""The wire's contract on the in-process transport and on MPI (tests/mpi_wire_check.py under
mpirun; whole jobs hold both to the same byte counts): records round-trip through the codec,
bytes are counted by kind on both sides, a silent peer ends a wait at the deadline naming it,
and one failing rank wakes the rest."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from common import MPIRUN

from splitlora_mpi.errors import CommTimeout, JobFailed
from splitlora_mpi.metrics import Metrics
from splitlora_mpi.wire import HEADER_BYTES, STOP, TRAIN
from splitlora_mpi.wire.local import LocalWorld
from splitlora_mpi.wire.messages import Channel, PrivateUpload, Upload


def _pair(timeout_s: float = 5.0) -> tuple:
    world = LocalWorld(2)
    return world, *(world.transport(r, timeout_s, Metrics(r, "server" if r == 0 else "client")) for r in (0, 1))


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "int8"])
def test_a_record_round_trips_and_is_counted_alike_on_both_sides(wire):
    _, server, client = _pair()
    h = torch.randn(2, 5, 8)
    side = torch.randint(0, 9, (2, 2, 5), dtype=torch.int32)
    Channel(client, wire, torch.float32, torch.device("cpu")).send(TRAIN, 7, {0: Upload(h, side)}, STOP)
    got = Channel(server, wire, torch.float32, torch.device("cpu")).recv([1], TRAIN, Upload)[1]
    assert (got.step, got.flag) == (7, STOP) and torch.equal(got.body.side, side)
    assert torch.allclose(got.body.activations, h, atol={"float32": 0, "bfloat16": 0.05, "int8": 0.05}[wire])
    act = {"float32": h.numel() * 4, "bfloat16": h.numel() * 2, "int8": h.numel() + 2 * 5 * 4}[wire]
    tensors = 3 if wire == "int8" else 2
    expected = {"activations": act, "labels": side.numel() * 4, "control": tensors * HEADER_BYTES}
    assert {k: v for k, v in client.metrics.sent_by_kind().items() if v} == expected
    assert {k: v for k, v in server.metrics.received_by_kind().items() if v} == expected


def test_messages_from_one_source_keep_their_order():
    world = LocalWorld(3)
    server, c1, c2 = (world.transport(r, 5.0, Metrics(r)) for r in range(3))
    for step in (1, 2):
        c2.send_tensors(TRAIN, step, {0: [(torch.tensor([float(step)]), "control")]})
    c1.send_tensors(TRAIN, 1, {0: [(torch.tensor([10.0]), "control")]})
    first = server.recv_tensors([1, 2], TRAIN, ["control"])
    assert first[1][0].step == 1 and first[2][0].step == 1
    assert server.recv_tensors([2], TRAIN, ["control"])[2][0].step == 2


def test_a_silent_peer_ends_the_wait_at_the_deadline_naming_it():
    _, server, _ = _pair(timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(CommTimeout, match=r"rank 0: no answer from rank\(s\) \[1\] within 0.3 s"):
        server.recv_tensors([1], TRAIN, ["activations"])
    assert 0.3 <= time.monotonic() - start < 2


def test_allreduce_sums_over_the_clients_only():
    world = LocalWorld(3)
    out = {}

    def rank(t) -> None:
        t.open_clients_group()
        if t.rank:
            out[t.rank] = t.allreduce_sum(np.full(3, float(t.rank)))
        out[(t.rank, "world")] = t.allreduce_sum(np.ones(2), world=True)

    world.run(rank, 5.0, Metrics)
    assert np.array_equal(out[1], [3.0] * 3) and np.array_equal(out[2], out[1])
    assert all(np.array_equal(out[(r, "world")], [3.0, 3.0]) for r in range(3))


def test_one_failing_rank_stops_the_others_at_once_and_its_error_is_raised():
    world = LocalWorld(3)

    def rank(t) -> None:
        if t.rank == 2:
            raise ValueError("rank 2 broke")
        t.recv_tensors([2], TRAIN, ["activations"])  # would wait 60 s for rank 2

    start = time.monotonic()
    with pytest.raises(ValueError, match="rank 2 broke"):
        world.run(rank, 60.0, Metrics)
    assert time.monotonic() - start < 5


def test_private_upload_has_no_labels_on_the_wire():
    _, server, client = _pair()
    h, mask = torch.randn(1, 4, 8), torch.ones(1, 1, 4, dtype=torch.int32)
    Channel(client, "float32", torch.float32, torch.device("cpu")).send(
        TRAIN, 1, {0: PrivateUpload(h, mask, torch.tensor([3]))}
    )
    got = Channel(server, "float32", torch.float32, torch.device("cpu")).recv([1], TRAIN, PrivateUpload)[1].body
    assert int(got.targets) == 3 and torch.equal(got.mask, mask[0])
    assert client.metrics.sent_by_kind()["labels"] == 0


def test_waiting_ranks_raise_jobfailed_when_the_world_aborts():
    _, server, _ = _pair(timeout_s=60)
    server.world.abort("rank 1 failed: boom")
    with pytest.raises(JobFailed, match="boom"):
        server.recv_objects([1], TRAIN)


def test_the_mpi_transport_keeps_the_contract_over_real_mpi():
    """Every dtype and shape (0-dim, empty, not contiguous) arrives bit-exact with its step and
    flag; per-source order; a held tensor is never overwritten while pooled buffers serve the
    later messages without allocating; bytes are counted alike on both sides; the deadline
    names the silent ranks."""
    script = Path(__file__).with_name("mpi_wire_check.py")
    r = subprocess.run([MPIRUN, "-n", "3", sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    report, sent = (json.loads(line) for line in r.stdout.strip().splitlines()[:2])
    assert report["equal"] and report["step_flag"] == {"1": [11, 0], "2": [12, STOP]}
    assert report["steps"] == list(range(30)) and report["held_intact"]
    assert report["allocations_for_later_messages"] == 1
    assert report["received"] == {k: sent["sent"]["1"][k] + sent["sent"]["2"][k] for k in report["received"]}
    assert report["received"]["control"] == (2 * 7 + 30) * HEADER_BYTES + 2 * 8  # headers + two 0-dim float64
    assert "no answer from rank(s) [1, 2] within 0.5 s" in report["timeout"] and report["timeout_s"] < 3
