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

import pytest
import torch
from chaos import JOB, TIMEOUT_S, ElasticJob, one_run, outputs_complete
from conftest import run_adapter, run_rows, run_summary

from splitlora_mpi import aggregate
from splitlora_mpi.config import load_config
from splitlora_mpi.errors import Stopped
from splitlora_mpi.roles.client import Client
from splitlora_mpi.roles.relay import RelayClient
from splitlora_mpi.run import checkpoint
from splitlora_mpi.run.runner import run_in_process
from splitlora_mpi.wire.local import Vanish


def fault_after(job: ElasticJob, rank: int, step: int, sig: int) -> tuple[int, float]:
    pid = job.pid_of(rank)
    at = job.fault(rank, step, sig)
    assert at is not None, job.log.read_text()
    return pid, at


@pytest.mark.parametrize("mode", ["splitlora", "fedlora", "sl"])
def test_a_killed_client_is_dropped_and_the_others_finish(tmp_path, mode):
    """sl: client 2 (turns 5-8, 21-24, 37-40 of 4 clients) is killed while waiting; it is found
    when its turn comes and the turn goes to client 3."""
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
    assert s["participants"][-1][1:] == [40, 1 if mode == "sl" else 3]  # the last steps over the 3 survivors
    assert ended_after < TIMEOUT_S + 30
    adapter = run_adapter(job.out)  # the exported adapter is complete and finite
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())


@pytest.mark.parametrize("seed", [4])  # kill, stop (frozen to the end) and join in one splitlora run
def test_chaos_runs_end_complete_without_hangs(tmp_path, seed):
    """The chaos benchmark's fixed-seed runs (benchmarks/chaos.py draws 20 of them). mpiexec
    waits for a stopped rank forever: the launcher kills it --grace s after the job ended (under
    load mpiexec sometimes dies of SIGPIPE first); either way the stopped client's hydra proxy,
    losing mpiexec, kills it — nothing of the job runs on."""
    row = one_run(seed, tmp_path)
    assert not row["hang"] and row["finished"] and row["outputs_complete"], row
    assert row["s_after_last_fault"] < TIMEOUT_S + 30, row
    assert any(x["reason"] == "stopped" for x in row["clients_lost"]), row
    assert not row["frozen_outlived_job"], row


@pytest.mark.parametrize("mode", ["splitlora", "fedlora"])
def test_a_client_joins_a_running_job(tmp_path, mode):
    """3 clients with their own files; a 4th process started mid-run with `--join` (a singleton,
    no mpirun) gets id 4, trains from the next round on its own file, and counts in FedAvg.
    splitlora also: a request before it whose process never connects (a joiner that died) —
    rank 0 leaves its Accept after elastic.client_timeout_s and goes on — and a job secret,
    which the joiner proves like the others."""
    from splitlora_mpi.data import packaged_data_paths

    train, val = (p.read_text().splitlines() for p in packaged_data_paths())
    data = tmp_path / "data"
    data.mkdir()
    for c in range(1, 5):
        (data / f"train-{c}.txt").write_text("\n".join(train[(c - 1) * 200 : c * 200]) + "\n")
        (data / f"val-{c}.txt").write_text("\n".join(val[(c - 1) * 20 : c * 20]) + "\n")
    job_secret = tmp_path / "job.secret"
    job_secret.write_text("a job secret of thirty-two bytes")
    job_secret.chmod(0o600)
    sets = [
        *([f"comm.secret_file={job_secret}"] if mode == "splitlora" else []),
        f"run.mode={mode}",
        "train.steps=200",
        f"data.train_path={data}/train-{{client}}.txt",
        f"data.val_path={data}/val-{{client}}.txt" if mode == "splitlora" else f"data.val_path={data}/val-1.txt",
    ]  # (fedlora: rank 0 evaluates the average on one shared file)
    job = ElasticJob(tmp_path / "joined", 4, *sets)
    job.wait_for_step(10)
    assert (job.out / "join" / "port").is_file()
    if mode == "splitlora":  # (the same desk in both modes)
        (job.out / "join" / "requests" / "ghost-1").write_text("")
    joiner = subprocess.run([sys.executable, "-m", "splitlora_mpi", "--join", *JOB, "--set", f"run.out_dir={job.out}",
                             *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})  # fmt: skip
    code, log = job.finish()
    assert joiner.returncode == 0, joiner.stderr[-3000:]
    assert code == 0, log
    assert "client 4: joined at step" in joiner.stdout
    if mode == "splitlora":
        assert "a client that asked to join (ghost-1) did not connect within elastic.client_timeout_s=3 s" in log
    s = run_summary(job.out)
    [joined] = s["clients_joined"]
    assert joined["rank"] == 4 and 10 <= joined["step"] < 200, s["clients_joined"]
    assert s["num_clients"] == 4 and list(s["tokens_by_client"]) == ["1", "2", "3", "4"]
    assert min(s["tokens_by_client"].values()) > 0
    first = -(-joined["step"] // 4) * 4 + 1  # the first step of the next round (aggregate_every 4)
    assert s["participants"][-1] == [first, 200, 4], s["participants"]
    assert not (job.out / "join" / "port").exists()  # (nobody can join a finished job)


def test_a_frozen_client_that_comes_back_reads_its_eviction_and_leaves_alone(tmp_path):
    """SIGSTOP, dropped, SIGCONT while the job runs on: the client finds rank 0's notice, says
    so in one line and exits 1 alone; the others finish (the round it missed is not touched)."""
    job = ElasticJob(tmp_path / "back", 4, "train.steps=150")
    pid, _ = fault_after(job, 3, 8, signal.SIGSTOP)
    deadline = time.monotonic() + 60
    while "client 3 lost" not in job.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(pid, signal.SIGCONT)
    code, log = job.finish()
    assert code == 0, log
    assert "client 3 lost" in log and "rank 3: evicted: rank 0 dropped this client at step" in log, log
    s = run_summary(job.out)
    assert [(x["rank"], x["reason"]) for x in s["clients_lost"]] == [(3, "stopped")]
    assert s["participants"][-1][1:] == [150, 2] and run_rows(job.out)[-1]["step"] == 150


@pytest.mark.parametrize("mode", ["splitlora", "fedlora", "sl"])
def test_below_min_clients_checkpoints_and_exits_1(tmp_path, mode):
    job = ElasticJob(tmp_path / "few", 4, "elastic.min_clients=3", f"run.mode={mode}")
    fault_after(job, 1, 6, signal.SIGKILL)
    code, log = job.finish()
    assert code == 1, log
    assert "fewer than elastic.min_clients=3" in log
    manifests = list((job.out / "checkpoints").glob("step-*/manifest.json"))
    assert len(manifests) == 1, log
    s = run_summary(job.out)  # what rank 0 knows of a run that ended early
    assert s["status"] == "failed" and s["steps"] == int(manifests[0].parent.name.split("-")[1]), s
    assert [x["rank"] for x in s["clients_lost"]] == [1] and not (job.out / "adapter").exists()


def test_a_plain_mpirun_says_it_is_not_elastic(tmp_path):
    from common import MPIRUN

    cmd = [MPIRUN, "-n", "2", sys.executable, "-m", "splitlora_mpi", "--set", f"run.out_dir={tmp_path}",
           "--set", "train.steps=1", "--set", "train.eval_every=0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "not elastic (a plain launch)" in done.stdout
    assert run_summary(tmp_path)["clients_lost"] == []


# ---------------------------------------------------------------- in-process: FedAvg after a loss

ELASTIC_SETS = ["train.steps=12", "train.aggregate_every=4", "train.eval_every=0", "train.warmup_steps=2",
                "elastic.client_timeout_s=1"]  # fmt: skip


@pytest.mark.parametrize("mode", ["splitlora", "sl"])
def test_no_fault_elastic_is_bit_identical_to_plain(tmp_path, mode):
    """sl elastic: the client model travels through rank 0 instead of client to client, same tensors."""
    for name, elastic in (("plain", False), ("elastic", True)):
        sets = [f"run.out_dir={tmp_path / name}", f"run.mode={mode}", *ELASTIC_SETS]
        run_in_process(load_config(None, sets), 3, elastic=elastic)
    plain, elastic_run = run_adapter(tmp_path / "plain"), run_adapter(tmp_path / "elastic")
    assert all(torch.equal(plain[k], elastic_run[k]) for k in plain)
    assert [r["train_loss"] for r in run_rows(tmp_path / "plain")] == [
        r["train_loss"] for r in run_rows(tmp_path / "elastic")
    ]


def test_after_a_loss_fedavg_is_the_token_weighted_mean_of_the_survivors(tmp_path, monkeypatch, capsys):
    """Client 2 vanishes in step 6; the averages of steps 8 and 12 must equal the weighted mean
    of the survivors' adapters and weights, computed here from what each survivor held. The
    elastic ending, too, ends with where the outputs are."""
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
    out_lines = capsys.readouterr().out.splitlines()
    assert out_lines[-2].startswith("finished 12 steps with 2 of 3 clients (lost: 2 at step 6"), out_lines[-2:]
    assert out_lines[-1].startswith(f"done: adapter {out}/adapter, summary {out}/summary.json; next: "), out_lines[-1]
    assert len(seen[1]) == len(seen[3]) == 3 and len(seen[2]) == 1  # rounds at steps 4, 8, 12
    for round_ in (1, 2):
        states = [seen[r][round_][1] for r in (1, 3)]
        weights = [seen[r][round_][2] for r in (1, 3)]
        expected = aggregate.weighted_mean(states, weights)
        for r in (1, 3):
            assert all(torch.equal(seen[r][round_][3][k], expected[k]) for k in expected)
        with_lost = aggregate.weighted_mean([*states, seen[2][0][3]], [*weights, weights[0]])
        assert not all(torch.equal(with_lost[k], expected[k]) for k in expected)  # (the check can fail)


def test_sl_after_a_loss_mid_turn_the_next_client_goes_on_from_rank_0s_copy(tmp_path, monkeypatch):
    """sl, 3 clients, turns of 4 steps; client 2 vanishes in step 6 (its turn: 5-8). Client 3 takes
    step 6 and the rest of the turn from rank 0's copy of step 4 (client 2's step 5 is lost with
    it), client 1 the next turn from client 3's handoff; the run is deterministic, the adapter loads."""
    train_step, take_over = RelayClient.train_step, RelayClient._take_over
    handoffs: list[tuple[int, int, int | None]] = []

    def vanishing_train_step(self, step, *args, **kwargs):
        if self.transport.rank == 2 and step == 6:
            raise Vanish()
        return train_step(self, step, *args, **kwargs)

    def recorded_take_over(self, word, first):
        handoffs.append((self.transport.rank, word["step"], word["carried"] and word["carried"]["step"]))
        take_over(self, word, first)

    monkeypatch.setattr(RelayClient, "train_step", vanishing_train_step)
    monkeypatch.setattr(RelayClient, "_take_over", recorded_take_over)
    for run in ("a", "b"):
        handoffs.clear()
        sets = [f"run.out_dir={tmp_path / run}", "run.mode=sl", "train.log_every=1", *ELASTIC_SETS]
        run_in_process(load_config(None, sets), 3, elastic=True)
        assert handoffs == [(1, 0, None), (2, 4, 4), (3, 5, 4), (1, 8, 8)]
    s, rows = run_summary(tmp_path / "a"), run_rows(tmp_path / "a")
    assert s["status"] == "complete" and [(x["rank"], x["step"]) for x in s["clients_lost"]] == [(2, 6)]
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(r["train_loss"] > 0 for r in rows)
    assert s["participants"] == [[1, 12, 1]]
    a, b = run_adapter(tmp_path / "a"), run_adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in run_rows(tmp_path / "b")]
    assert outputs_complete(tmp_path / "a")  # (PeftModel.from_pretrained loads it)


def test_sl_elastic_resume_is_bit_identical(tmp_path):
    """Stopped mid-turn (step 6 of turn 5-8): the checkpoint holds rank 0's copy of the client model
    (no client file); resumed, the run equals an uninterrupted one."""
    sets = ["run.mode=sl", "checkpoint.every=3", "train.log_every=1", *ELASTIC_SETS]
    run_in_process(load_config(None, [f"run.out_dir={tmp_path / 'straight'}", *sets]), 3, elastic=True)
    out = tmp_path / "resumed"
    cfg = load_config(None, [f"run.out_dir={out}", *sets])
    rows = out / "metrics.jsonl"
    with pytest.raises(Stopped):
        run_in_process(cfg, 3, lambda: rows.exists() and len(rows.read_text().splitlines()) >= 5, elastic=True)
    found, _ = checkpoint.newest_complete(out, 4, cfg.fingerprint())
    assert found is not None and found.step == 6 and sorted(found.files) == [0]
    run_in_process(cfg, 3, elastic=True)
    a, b = run_adapter(tmp_path / "straight"), run_adapter(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in run_rows(tmp_path / "straight")] == [r["train_loss"] for r in run_rows(out)]
    assert run_summary(out)["tokens_by_client"] == run_summary(tmp_path / "straight")["tokens_by_client"]


# ---------------------------------------------------------------- resume with another number of clients


@pytest.mark.parametrize(("before", "after"), [(4, 3), (3, 4)])
def test_resume_with_another_number_of_clients(tmp_path, monkeypatch, before, after):
    """Stopped after step 6 or 7 with `before` clients, resumed with `after`: the clients that had
    a file keep their state, a new one starts from the last average (step 6's) with a fresh
    optimizer and the schedule at the checkpoint's step, and the run completes."""
    out = tmp_path / "run"
    rows = out / "metrics.jsonl"
    cfg = load_config(None, [f"run.out_dir={out}", "train.steps=12", "train.aggregate_every=3", "train.eval_every=0",
                             "train.log_every=1", "checkpoint.every=3", "train.warmup_steps=2"])  # fmt: skip
    with pytest.raises(Stopped):
        run_in_process(cfg, before, stop_requested=lambda: rows.exists() and len(rows.read_text().splitlines()) >= 7)
    found, _ = checkpoint.newest_complete(out, after + 1, cfg.fingerprint(), resizable=True)
    assert found is not None and found.world_size == before + 1 and found.step >= 6
    averaged = checkpoint.from_bytes(found.files[1].read_bytes())["role"]["averaged"]
    adopted: dict[int, tuple[dict, float]] = {}
    adopt = Client.adopt

    def recorded_adopt(self, saved, step):
        adopt(self, saved, step)
        adopted[self.transport.rank] = ({k: v.clone() for k, v in self.part.adapter_state().items()}, self.trainer.lr)

    monkeypatch.setattr(Client, "adopt", recorded_adopt)
    run_in_process(cfg, after)
    assert sorted(adopted) == list(range(before + 1, after + 1))  # only the new rank adopts
    for state, lr in adopted.values():
        assert all(torch.equal(state[k], averaged[k].to(state[k].dtype)) for k in averaged)
        assert lr == pytest.approx(cfg.train.lr * (12 - found.step) / (12 - 2))  # the linear decay at that step
    s = run_summary(out)
    assert s["num_clients"] == after and [r["step"] for r in run_rows(out)][-1] == 12
    assert list(s["tokens_by_client"]) == [str(c) for c in range(1, after + 1)]


def test_what_counts_as_an_elastic_launch(tmp_path, monkeypatch):
    from splitlora_mpi.run.startup import ELASTIC_ENV, elastic_launch

    monkeypatch.delenv(ELASTIC_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.mpiexec.hydra.conf)
    conf = tmp_path / "hydra.conf"
    monkeypatch.setenv("HYDRA_CONFIG_FILE", str(conf))
    assert not elastic_launch()  # no such file
    conf.write_text("-verbose\n")
    assert not elastic_launch()
    conf.write_text("-disable-auto-cleanup\n")  # hydra's auto-cleanup off by its config file
    assert elastic_launch()
    conf.unlink()
    monkeypatch.setenv(ELASTIC_ENV, "1")  # python -m splitlora_mpi.elastic
    assert elastic_launch()


def test_the_one_host_launch_gives_each_rank_its_proxy_and_shared_memory_only(tmp_path, monkeypatch):
    """One proxy per rank (a killed rank takes its proxy's others down) and UCX over shared
    memory only: cross-memory attach from a killed peer and UCX's TCP send to one both fail."""
    from splitlora_mpi import elastic

    monkeypatch.delenv("UCX_TLS", raising=False)
    cmd = elastic.command(3, ["--set", "train.steps=2"], tmp_path / "status.json", None, tmp_path)
    assert cmd[cmd.index("-launcher") + 1] == "fork"
    assert (tmp_path / "hosts").read_text() == "n0:1\nn1:1\nn2:1\n"
    assert " ".join(cmd).count("-genv UCX_TLS posix,sysv,self") == 1
    several = elastic.command(3, [], tmp_path / "s", tmp_path / "hosts.txt", tmp_path)
    assert "UCX_TLS" not in several and "fork" not in several  # several hosts: MPICH's own choice
    monkeypatch.setenv("UCX_TLS", "tcp")  # the user's choice is kept
    assert "UCX_TLS" not in elastic.command(3, [], tmp_path / "s", None, tmp_path)
