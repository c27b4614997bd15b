"""Checkpoints and resume: the files (unit), and real mpirun runs that are killed or stopped
by a signal and resumed to bit-identical losses and adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_cmd, splitlora
from safetensors.torch import load_file

from splitlora_mpi.errors import ConfigError
from splitlora_mpi.run import checkpoint

RANKS = 3
# small rows and batches: many fast steps, so a signal lands mid-run
STEPS = 70  # long enough that a signal at step 23 or 37 lands well before the end
FAST = ["--set", f"train.steps={STEPS}", "--set", "train.aggregate_every=5", "--set", "train.eval_every=0",
        "--set", "train.log_every=1", "--set", "data.max_seq_len=32", "--set", "train.batch_size=2"]  # fmt: skip


# ---------------------------------------------------------------- files


def _write(out: Path, step: int, world: int = 2, fp: dict | None = None) -> None:
    states = {r: checkpoint.to_bytes({"rank": r, "w": torch.full((3,), float(step))}) for r in range(world)}
    hashes = {r: checkpoint.save_rank(out, step, r, data) for r, data in states.items()}
    checkpoint.write_manifest(out, step, world, fp or {"lora.r": 4}, hashes)


def test_newest_complete_checkpoint_wins_and_broken_ones_are_skipped(tmp_path):
    for step in (5, 10, 15, 20):
        _write(tmp_path, step)
    (checkpoint.step_dir(tmp_path, 20) / checkpoint.MANIFEST).unlink()  # incomplete: no manifest
    checkpoint.rank_file(tmp_path, 15, 1).write_bytes(b"garbage")  # corrupt: hash mismatch
    found, warnings = checkpoint.newest_complete(tmp_path, 2, {"lora.r": 4})
    assert found is not None and found.step == 10
    assert len(warnings) == 2 and "step-00000020" in warnings[0] and "incomplete" in warnings[0]
    assert "step-00000015" in warnings[1] and "do not match" in warnings[1]
    assert checkpoint.from_bytes(found.files[1].read_bytes())["w"].tolist() == [10.0, 10.0, 10.0]


def test_another_world_size_or_config_is_refused(tmp_path):
    _write(tmp_path, 5)
    with pytest.raises(ConfigError, match="written by 2 ranks, this job has 3"):
        checkpoint.newest_complete(tmp_path, 3, {"lora.r": 4})
    with pytest.raises(ConfigError, match="config key 'lora.r'"):
        checkpoint.newest_complete(tmp_path, 2, {"lora.r": 8})


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step)
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(d.name for d in checkpoint.root(tmp_path).iterdir()) == ["step-00000003", "step-00000004"]
    assert not list(checkpoint.root(tmp_path).rglob(".*.tmp"))  # no temp files left behind


# ---------------------------------------------------------------- real runs


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path) -> None:
    assert _losses(a) == _losses(b) and len(_losses(a)) == STEPS
    wa, wb = (
        load_file(a / "adapter" / "adapter_model.safetensors"),
        load_file(b / "adapter" / "adapter_model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Callable[[str], Path]:
    """`key=value` (the run's mode or option) -> the uninterrupted run (run once, on first use)."""
    runs: dict[str, Path] = {}

    def get(setting: str) -> Path:
        if setting not in runs:
            tmp = tmp_path_factory.mktemp("straight")
            r = run_cmd(splitlora(*FAST, "--set", "run.out_dir=straight", "--set", setting, ranks=RANKS),
                        cwd=tmp, timeout=300)  # fmt: skip
            assert r.returncode == 0, r.stderr[-2000:]
            runs[setting] = tmp / "straight"
        return runs[setting]

    return get


def _start(tmp: Path, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(splitlora(*FAST, "--set", f"run.out_dir={out}", *extra, ranks=RANKS), cwd=tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= step):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize(
    "setting", ["run.mode=splitlora", "run.mode=sl", "run.mode=fedlora", "split.server_update=sequential"]
)
def test_sigterm_stops_with_a_checkpoint_and_the_resume_is_bit_exact(tmp_path, straight, setting):
    proc = _start(tmp_path, "run", "--set", setting)
    _wait_for_step(proc, tmp_path / "run" / "metrics.jsonl", 23)
    proc.send_signal(signal.SIGTERM)  # mpirun forwards it to every rank
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "run the same command again to resume" in stopped[0]
    step = int(stopped[0].split("after step ")[1].split(";")[0])
    assert 23 <= step < STEPS and checkpoint.step_dir(tmp_path / "run", step).is_dir()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["status"], s["steps"], s["clients_lost"]) == ("stopped", step, []), s
    r = run_cmd(splitlora(*FAST, "--set", "run.out_dir=run", "--set", setting, ranks=RANKS), cwd=tmp_path,
                timeout=300)  # fmt: skip
    assert r.returncode == 0 and f"resuming from run/checkpoints/step-{step:08d}" in r.stdout, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "complete"
    _assert_same_run(straight(setting), tmp_path / "run")


def test_a_killed_job_resumes_from_its_last_checkpoint_bit_exact(tmp_path, straight):
    proc = subprocess.Popen(splitlora(*FAST, "--set", "run.out_dir=run", "--set", "checkpoint.every=10", ranks=RANKS),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    _wait_for_step(proc, tmp_path / "run" / "metrics.jsonl", 37)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up
    proc.communicate(timeout=60)
    # the newest checkpoint may be half-written: corrupt it on purpose to check it is skipped
    newest = max(checkpoint.root(tmp_path / "run").glob("step-*"))
    (newest / "rank-2.pt").write_bytes(b"half-written")
    r = run_cmd(splitlora(*FAST, "--set", "run.out_dir=run", "--set", "checkpoint.every=10", ranks=RANKS),
                cwd=tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"warning: skipping checkpoint run/checkpoints/{newest.name}" in r.stderr
    assert "resuming from run/checkpoints/step-" in r.stdout
    _assert_same_run(straight("run.mode=splitlora"), tmp_path / "run")


def test_central_stops_on_sigterm_and_resumes_bit_exact(tmp_path):
    central = [*FAST, "--set", "run.mode=central", "--set", "checkpoint.every=50"]
    one_thread = {"OMP_NUM_THREADS": "1"}  # tiny matrices: 2 threads are several times slower on a busy machine
    r = run_cmd(splitlora(*central, "--set", "run.out_dir=straight"), cwd=tmp_path, timeout=300, env=one_thread)
    assert r.returncode == 0, r.stderr[-2000:]
    proc = subprocess.Popen(splitlora(*central, "--set", "run.out_dir=run"), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **one_thread})  # fmt: skip
    _wait_for_step(proc, tmp_path / "run" / "metrics.jsonl", 23)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "signal 15: stopping after this step" in err, err[-2000:]
    step = int(err.split("stopped by a signal after step ")[1].split(";")[0])
    assert f"checkpoint run/checkpoints/step-{step:08d}: 1 rank files" in out
    r = run_cmd(splitlora(*central, "--set", "run.out_dir=run"), cwd=tmp_path, timeout=300, env=one_thread)
    assert r.returncode == 0 and f"central: resuming from run/checkpoints/step-{step:08d}" in r.stdout, r.stderr
    _assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_resuming_sl_with_another_world_size_is_refused(tmp_path):
    """(sl's one travelling client model has no average to give a new client; splitlora and
    fedlora resume with another number of clients: tests/test_elastic.py)"""
    sl = ("--set", "run.mode=sl", "--set", "train.steps=10", "--set", "checkpoint.every=5")
    r = run_cmd(splitlora(*FAST, *sl, ranks=RANKS), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cmd(splitlora(*FAST, *sl, ranks=2), cwd=tmp_path, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "written by 3 ranks, this job has 2" in lines[0]
