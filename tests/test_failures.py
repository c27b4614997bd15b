"""Failure behaviour under a real mpirun: bad input is one line and exit 2 from rank 0 within
30 s, nothing already written is touched; a dead or silent rank ends the whole job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MPIRUN, run_cmd, splitlora

RANKS = 3
SENTINEL = '{"previous": "run"}\n'


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def bad_input_cases(tmp: Path) -> dict[str, list[str]]:
    """name -> extra arguments; the files they name are created in tmp (benchmarks/startup.py
    times the same cases)."""
    good = "name : A | food : B||A serves B .\n" * 4

    def data(name: str, content: str | bytes) -> str:
        return f"data.train_path={_write(tmp / name, content)}"

    blocker = _write(tmp / "a-file", "not a directory")
    _write(tmp / "b-2.txt", good + "just text here\n")  # client 2's file of "bad line in a client file"
    val_jsonl = _write(tmp / "v.jsonl", '{"prompt": "p", "completion": "c"}\n')
    return {
        "empty data file": ["--set", data("empty.txt", "")],
        "missing data file": ["--set", f"data.train_path={tmp / 'missing.txt'}"],
        "bad line in a client file": ["--set", data("b-1.txt", good).replace("b-1", "b-{client}"),
                                      "--set", f"data.val_path={tmp / 'v-ok.txt'}"],
        "missing client file": ["--set", data("c-1.txt", good).replace("c-1", "c-{client}"),
                                "--set", f"data.val_path={_write(tmp / 'v-ok.txt', good)}"],
        "no || separator": ["--set", data("nosep.txt", good + "just text here\n")],
        "binary garbage": ["--set", data("bin.txt", good.encode() + bytes(range(128, 256)))],
        "invalid jsonl": ["--set", "data.format=jsonl", "--set", f"data.val_path={val_jsonl}",
                          "--set", data("t.jsonl", '{"prompt": 1}\n')],
        "jsonl without val_path": ["--set", "data.format=jsonl", "--set", data("ok.jsonl", "{}")],
        "fewer examples than clients": ["--set", data("one.txt", "a||b\n")],
        "missing tokenizer dir": ["--set", f"model.tokenizer={tmp / 'no-tokenizer'}"],
        "missing model dir": ["--set", f"model.name_or_path={tmp / 'no-model'}"],
        "unwritable out_dir": ["--set", f"run.out_dir={blocker}/runs"],
        "client_layers not below blocks": ["--set", "split.client_layers=4"],
        "max_seq_len above positions": ["--set", "data.max_seq_len=512"],
        "batch size 0": ["--set", "train.batch_size=0"],
        "unknown key": ["--set", "train.learning_rate=0.1"],
        "wrong type": ["--set", "train.steps=many"],
        "bad YAML config": ["--config", str(_write(tmp / "bad.yaml", "train: [1, 2\n"))],
        "missing config file": ["--config", str(tmp / "nope.yaml")],
        "diverging loss (NaN)": ["--set", "train.lr=1e30", "--set", "train.warmup_steps=0", "--set", "train.steps=6"],
    }  # fmt: skip


EXPECTED = {
    "empty data file": "no examples",
    "missing data file": "not found",
    "missing client file": "client 2: config key 'data.train_path': ",
    "bad line in a client file": ("client 2: config key 'data.train_path': ", "b-2.txt:5: no '||' separator"),
    "no || separator": "nosep.txt:5: no '||' separator",
    "binary garbage": "bin.txt:5: not UTF-8",
    "invalid jsonl": "t.jsonl:1: expected an object with string fields",
    "jsonl without val_path": "config key 'data.val_path'",
    "fewer examples than clients": "1 examples for 2 clients",
    "missing tokenizer dir": "config key 'model.tokenizer'",
    "missing model dir": "config key 'model.name_or_path': cannot load",
    "unwritable out_dir": "config key 'run.out_dir': cannot write",
    "client_layers not below blocks": "config key 'split.client_layers': expected 1..3",
    "max_seq_len above positions": "config key 'data.max_seq_len': expected ≤ 128",
    "batch size 0": "config key 'train.batch_size': expected a value ≥ 1",
    "unknown key": "config key 'train.learning_rate': unknown key",
    "wrong type": "config key 'train.steps': expected an integer",
    "bad YAML config": "not valid YAML",
    "missing config file": "file not found",
    "diverging loss (NaN)": "training diverged: the loss is nan",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_is_one_line_exit_2_and_harmless(case, tmp_path):
    args = bad_input_cases(tmp_path)[case]
    previous = tmp_path / "runs" / "splitlora"
    previous.mkdir(parents=True)
    _write(previous / "summary.json", SENTINEL)
    start = time.monotonic()
    # (fewer ranks start faster on 2 cores; 2 clients where every client fails and rank 0 must say it once)
    ranks = RANKS if case in ("fewer examples than clients", "no || separator") or "client file" in case else 2
    r = run_cmd(splitlora(*args, ranks=ranks), cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    expected = EXPECTED[case]
    assert all(part in lines[0] for part in (expected if isinstance(expected, tuple) else (expected,))), lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert elapsed < 30, elapsed
    assert (previous / "summary.json").read_text() == SENTINEL  # an earlier run's outputs are untouched


def test_a_row_longer_than_max_seq_len_is_cut_and_counted(tmp_path):
    long = "name : A||" + "A serves B . " * 40 + "\n"
    data = _write(tmp_path / "long.txt", long + "name : C||C is here .\n" * 3)
    r = run_cmd(splitlora("--set", f"data.train_path={data}", "--set", "train.steps=2", "--set", "train.eval_every=0",
                          ranks=RANKS), cwd=tmp_path, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 training rows (1 truncated to 128 tokens)" in r.stdout


# ---------------------------------------------------------------- no hang


def _rank_pids(marker: str) -> dict[int, int]:
    """rank -> pid of the ranks whose command line carries `marker`, via the launcher's env."""
    out: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"splitlora_mpi" not in cmdline or marker.encode() not in b" ".join(cmdline):
                continue
            env = dict(
                item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
            )
        except OSError:
            continue
        if b"PMI_RANK" in env:
            out[int(env[b"PMI_RANK"])] = int(pid)
    return out


def _start_long_run(tmp: Path, marker: str, *extra: str) -> subprocess.Popen:
    cmd = splitlora("--set", f"run.name={marker}", "--set", "train.steps=100000", "--set", "train.eval_every=0",
                    "--set", "train.log_every=1", *extra, ranks=RANKS)  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    metrics = tmp / "runs" / marker / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    return proc


def _finish(proc: subprocess.Popen, limit_s: float) -> tuple[int, str, str, float]:
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job did not end within {limit_s} s")
    return proc.returncode, out, err, time.monotonic() - start


def test_a_killed_client_ends_the_job(tmp_path):
    proc = _start_long_run(tmp_path, "killed")
    victim = _rank_pids("killed")[2]
    os.kill(victim, signal.SIGKILL)
    code, out, err, elapsed = _finish(proc, limit_s=60)
    assert code != 0 and elapsed < 30, (code, elapsed)
    # mpirun reports the bad termination (naming the PID it saw first) and tears the job down
    assert "BAD TERMINATION" in out + err and "Killed (signal 9)" in out + err
    assert f" 2={victim} " in out  # rank 0's log maps process ids to ranks


@pytest.mark.parametrize("rank", [0, 2])
def test_a_raising_rank_aborts_every_rank(tmp_path, rank):
    script = Path(__file__).with_name("faulty_rank.py")
    cmd = [MPIRUN, "-n", str(RANKS), sys.executable, str(script), str(rank), "5", "--set", "train.steps=100000",
           "--set", "comm.timeout_s=600"]  # fmt: skip
    start = time.monotonic()
    r = run_cmd(cmd, cwd=tmp_path, timeout=120)
    elapsed = time.monotonic() - start
    assert r.returncode != 0 and elapsed < 90, (r.returncode, elapsed)  # the abort, not the 600 s timeout
    assert f"rank {rank}: error:" in r.stderr and "RuntimeError: injected failure at step 5" in r.stderr


def test_a_second_signal_exits_at_once(tmp_path):
    proc = _start_long_run(tmp_path, "twice", "--set", "comm.timeout_s=600")
    pids = _rank_pids("twice")
    os.kill(pids[2], signal.SIGSTOP)  # the server cannot finish its step now
    try:
        os.kill(pids[0], signal.SIGTERM)
        time.sleep(1)
        os.kill(pids[0], signal.SIGTERM)
        code, out, err, elapsed = _finish(proc, limit_s=60)
    finally:
        try:
            os.kill(pids[2], signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code != 0 and elapsed < 30, (code, elapsed)
    assert "signal 15: stopping after this step with a checkpoint" in err
    assert "second signal (15): exiting at once, without a checkpoint" in err
    assert not (tmp_path / "runs" / "twice" / "checkpoints").exists()


def test_a_silent_client_ends_the_job_within_the_timeout(tmp_path):
    proc = _start_long_run(tmp_path, "silent", "--set", "comm.timeout_s=8")
    stopped = _rank_pids("silent")[2]
    os.kill(stopped, signal.SIGSTOP)  # alive but not answering
    try:
        code, out, err, elapsed = _finish(proc, limit_s=60)
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert code != 0 and elapsed < 8 + 20, elapsed
    assert "rank 0: no answer from rank(s) [2] within 8 s (comm.timeout_s=8)" in err
