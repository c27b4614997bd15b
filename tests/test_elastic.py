"""Elastic runs: a client that dies, freezes or is dropped leaves the others training.

The mpirun tests launch the real job with `python -m splitlora_mpi.elastic` and fault a client
from outside (kill -9 / SIGSTOP of its process, found by the pid rank 0 prints); the logic of
FedAvg after a loss is pinned in-process, where a client can vanish at an exact step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_adapter, run_rows, run_summary

from splitlora_mpi import aggregate
from splitlora_mpi.config import load_config
from splitlora_mpi.roles.client import Client
from splitlora_mpi.run.runner import run_in_process
from splitlora_mpi.wire.local import Vanish

TIMEOUT_S = 3  # elastic.client_timeout_s of these runs
JOB = ["--set", "train.steps=40", "--set", "train.log_every=1", "--set", "train.aggregate_every=4",
       "--set", "train.eval_every=20", "--set", f"elastic.client_timeout_s={TIMEOUT_S}"]  # fmt: skip


class ElasticJob:
    """`python -m splitlora_mpi.elastic -n RANKS` in the background, watched through its outputs."""

    def __init__(self, out: Path, ranks: int, *sets: str, grace_s: float = 30):
        self.out = out
        self.log = out.parent / f"{out.name}.log"
        args = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "splitlora_mpi.elastic", "-n", str(ranks), "--grace", str(grace_s),
               *JOB, "--set", f"run.out_dir={out}", *args]  # fmt: skip
        self.logfile = open(self.log, "w")
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen(cmd, stdout=self.logfile, stderr=subprocess.STDOUT, text=True, env=env)

    def pid_of(self, rank: int, timeout_s: float = 120) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(rf"process ids by rank .*\b{rank}=(\d+)", self.log.read_text())
            if found:
                return int(found.group(1))
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no pid of rank {rank} within {timeout_s} s:\n{self.log.read_text()}")

    def wait_for_step(self, step: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.out / "metrics.jsonl"
            if rows.is_file() and len(rows.read_text().splitlines()) >= step:
                return
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"step {step} not reached within {timeout_s} s:\n{self.log.read_text()}")

    def finish(self, timeout_s: float = 180) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.logfile.close()
        return code, self.log.read_text()


def fault_after(job: ElasticJob, rank: int, step: int, sig: int) -> tuple[int, float]:
    pid = job.pid_of(rank)
    job.wait_for_step(step)
    os.kill(pid, sig)
    return pid, time.monotonic()


@pytest.mark.parametrize("mode", ["splitlora", "fedlora"])
def test_a_killed_client_is_dropped_and_the_others_finish(tmp_path, mode):
    job = ElasticJob(tmp_path / mode, 5, f"run.mode={mode}")
    _, killed_at = fault_after(job, 2, 10, signal.SIGKILL)
    code, log = job.finish()
    ended_after = time.monotonic() - killed_at
    assert code == 0, log
    s = run_summary(job.out)
    assert s["status"] == "complete" and s["num_clients"] == 4
    assert [(x["rank"], x["reason"]) for x in s["clients_lost"]] == [(2, "killed")], s["clients_lost"]
    assert s["clients_lost"][0]["step"] >= 10
    assert re.search(r"finished 40 steps with 3 of 4 clients \(lost: 2 at step \d+, killed\)", log), log
    assert run_rows(job.out)[-1]["step"] == 40
    assert s["participants"][-1][1:] == [40, 3]  # the last steps over the 3 survivors
    assert ended_after < TIMEOUT_S + 30
    adapter = run_adapter(job.out)  # the exported adapter is complete and finite
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


def test_a_frozen_client_is_dropped_and_the_launcher_ends_it(tmp_path):
    job = ElasticJob(tmp_path / "frozen", 4, grace_s=2)
    pid, _ = fault_after(job, 3, 8, signal.SIGSTOP)
    try:
        code, log = job.finish()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code == 0, log
    s = run_summary(job.out)
    assert [(x["rank"], x["reason"]) for x in s["clients_lost"]] == [(3, "stopped")], s["clients_lost"]
    assert "killing them" in log  # mpiexec waits for a stopped rank forever: the launcher ends it


def test_below_min_clients_checkpoints_and_exits_1(tmp_path):
    job = ElasticJob(tmp_path / "few", 4, "elastic.min_clients=3")
    fault_after(job, 1, 6, signal.SIGKILL)
    code, log = job.finish()
    assert code == 1, log
    assert "fewer than elastic.min_clients=3" in log
    manifests = list((job.out / "checkpoints").glob("step-*/manifest.json"))
    assert len(manifests) == 1, log
    assert not (job.out / "summary.json").exists()


def test_a_plain_mpirun_says_it_is_not_elastic(tmp_path):
    from common import MPIRUN

    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "splitlora_mpi", "--set", f"run.out_dir={tmp_path}",
           "--set", "train.steps=1", "--set", "train.eval_every=0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "not elastic (a plain launch)" in done.stderr
    assert run_summary(tmp_path)["clients_lost"] == []


# ---------------------------------------------------------------- in-process: FedAvg after a loss

ELASTIC_SETS = ["train.steps=12", "train.aggregate_every=4", "train.eval_every=0", "train.warmup_steps=2",
                "elastic.client_timeout_s=1"]  # fmt: skip


def test_no_fault_elastic_is_bit_identical_to_plain(tmp_path):
    for name, elastic in (("plain", False), ("elastic", True)):
        run_in_process(load_config(None, [f"run.out_dir={tmp_path / name}", *ELASTIC_SETS]), 3, elastic=elastic)
    plain, elastic_run = run_adapter(tmp_path / "plain"), run_adapter(tmp_path / "elastic")
    assert all(torch.equal(plain[k], elastic_run[k]) for k in plain)
    assert [r["train_loss"] for r in run_rows(tmp_path / "plain")] == [
        r["train_loss"] for r in run_rows(tmp_path / "elastic")
    ]


def test_after_a_loss_fedavg_is_the_token_weighted_mean_of_the_survivors(tmp_path, monkeypatch):
    """Client 2 vanishes in step 6; the averages of steps 8 and 12 must equal the weighted mean
    of the survivors' adapters and weights, computed here from what each survivor held."""
    seen: dict[int, list[tuple[int, dict, float, dict]]] = {}
    train_step, average = Client.train_step, Client.average

    def vanishing_train_step(self, step, *args, **kwargs):
        if self.transport.rank == 2 and step == 6:
            raise Vanish()
        return train_step(self, step, *args, **kwargs)

    def recorded_average(self):
        before = {k: v.detach().clone() for k, v in self.part.adapter_state().items()}
        weight = float(self.tokens_since_average)
        average(self)
        after = {k: v.detach().clone() for k, v in self.part.adapter_state().items()}
        seen.setdefault(self.transport.rank, []).append((len(seen.get(self.transport.rank, [])), before, weight, after))

    monkeypatch.setattr(Client, "train_step", vanishing_train_step)
    monkeypatch.setattr(Client, "average", recorded_average)
    out = tmp_path / "lost"
    run_in_process(load_config(None, [f"run.out_dir={out}", *ELASTIC_SETS]), 3, elastic=True)
    s = run_summary(out)
    assert [(x["rank"], x["step"]) for x in s["clients_lost"]] == [(2, 6)]
    assert len(seen[1]) == len(seen[3]) == 3 and len(seen[2]) == 1  # rounds at steps 4, 8, 12
    for round_ in (1, 2):
        states = [seen[r][round_][1] for r in (1, 3)]
        weights = [seen[r][round_][2] for r in (1, 3)]
        expected = aggregate.weighted_mean(states, weights)
        for r in (1, 3):
            assert all(torch.equal(seen[r][round_][3][k], expected[k]) for k in expected)
        with_lost = aggregate.weighted_mean([*states, seen[2][0][3]], [*weights, weights[0]])
        assert not all(torch.equal(with_lost[k], expected[k]) for k in expected)  # (the check can fail)
