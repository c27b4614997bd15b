"""The checks a rank runs before its heavy imports (run/preflight.py): what each rank reads and
checks, and that a bad input stops every rank with exit 2 and one line while no rank ever
imports torch, transformers or peft."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import MPIRUN, run_cmd, splitlora

from splitlora_mpi.config import load_config
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.modes import mode_of
from splitlora_mpi.run.preflight import check, check_previous_run

GOOD = "name : A | food : B||A serves B .\n"
HEAVY = {"torch", "transformers", "peft"}


def _cfg(tmp: Path, *sets: str):
    return load_config(None, [f"run.out_dir={tmp / 'out'}", *sets])


def _client_files(tmp: Path, rows: dict[int, int]) -> list[str]:
    for c, n in rows.items():
        (tmp / f"t-{c}.txt").write_text(GOOD * n)
        (tmp / f"v-{c}.txt").write_text(GOOD)
    return [f"data.train_path={tmp}/t-{{client}}.txt", f"data.val_path={tmp}/v-{{client}}.txt"]


def test_each_client_checks_only_its_own_file_and_the_server_none(tmp_path):
    cfg = _cfg(tmp_path, *_client_files(tmp_path, {1: 3}))  # client 2's files are missing
    splitlora = mode_of("splitlora")
    server, one, two = (check(cfg, splitlora, rank, 3) for rank in (0, 1, 2))
    assert server.error is None and server.examples == {}
    assert one.error is None and [len(one.examples[w]) for w in ("train", "val")] == [3, 1]
    assert two.error == f"client 2: config key 'data.train_path': {tmp_path}/t-2.txt: not found"


def test_rank_0_reads_what_its_role_reads(tmp_path):
    files = _client_files(tmp_path, {1: 3, 2: 2})
    central = check(_cfg(tmp_path, *files, "run.mode=central", "data.clients=2"), mode_of("central"), 0, 1)
    assert central.error is None and len(central.examples["train"]) == 5
    shared = [f"data.train_path={tmp_path}/t-1.txt", f"data.val_path={tmp_path}/v-1.txt", "run.mode=fedlora"]
    fedlora = check(_cfg(tmp_path, *shared), mode_of("fedlora"), 0, 3)
    assert fedlora.error is None and set(fedlora.examples) == {"val"}


def test_too_few_examples_for_the_clients(tmp_path):
    (tmp_path / "two.txt").write_text(GOOD * 2)
    cfg = _cfg(tmp_path, f"data.train_path={tmp_path}/two.txt")
    assert check(cfg, mode_of("splitlora"), 1, 3).error is None
    error = check(cfg, mode_of("splitlora"), 1, 4).error
    assert error == "training data: 2 examples for 3 clients; expected at least one example per client"


def test_the_split_is_checked_against_the_size_the_config_states(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_positions": 64}')
    cases = {
        ("split.client_layers=4",): "config key 'split.client_layers': expected 1..3 (the model has 4 blocks), got 4",
        ("data.max_seq_len=512",): "config key 'data.max_seq_len': expected ≤ 128 (the model's positions), got 512",
        (f"model.name_or_path={model}", "split.client_layers=2"): "config key 'split.client_layers': expected 1..1",
        (f"model.name_or_path={model}",): "config key 'data.max_seq_len': expected ≤ 64",
        (f"model.name_or_path={tmp_path}/none",): f"config key 'model.name_or_path': cannot load '{tmp_path}/none'",
        (f"model.tokenizer={tmp_path}/none",): f"config key 'model.tokenizer': cannot load '{tmp_path}/none'",
    }
    for sets, expected in cases.items():
        for rank in (0, 1):
            error = check(_cfg(tmp_path, *sets), mode_of("splitlora"), rank, 3).error
            assert error is not None and error.startswith(expected), (sets, rank, error)
    six_blocks = _cfg(tmp_path, "model.config.n_layer=6", "split.client_layers=4")
    assert check(six_blocks, mode_of("splitlora"), 0, 3).error is None


def _imports(stderr: str) -> list[str]:
    """The modules `python -X importtime` reported (every rank's)."""
    return [line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")]


def _imported(stderr: str) -> set[str]:
    """Top-level names of the imported modules."""
    return {name.split(".")[0] for name in _imports(stderr)}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("import time:")]


def test_one_clients_bad_file_stops_every_rank_before_torch(tmp_path):
    """Client 2's own file has a bad line, client 1's is good: rank 0 prints client 2's error
    once, every rank exits 2, and no rank imported torch, transformers or peft."""
    files = _client_files(tmp_path, {1: 4, 2: 4})
    (tmp_path / "t-2.txt").write_text(GOOD * 4 + "just text here\n")
    args = [a for s in files for a in ("--set", s)]
    cmd = [MPIRUN, "-n", "3", sys.executable, "-X", "importtime", "-m", "splitlora_mpi", *args]
    r = run_cmd(cmd, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    expected = f"error: client 2: config key 'data.train_path': {tmp_path}/t-2.txt:5: no '||' separator"
    assert [line.split(",")[0] for line in _error_lines(r.stderr)] == [expected]
    assert _imports(r.stderr).count("splitlora_mpi.run.preflight") == 3  # every rank's import report is here
    assert "numpy" in _imported(r.stderr) and not HEAVY & _imported(r.stderr)


def test_central_bad_input_stops_before_torch(tmp_path):
    cmd = splitlora("--set", "run.mode=central", "--set", f"data.train_path={tmp_path}/missing.txt")
    r = run_cmd([cmd[0], "-X", "importtime", *cmd[1:]], cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _error_lines(r.stderr) == [f"error: data file {tmp_path}/missing.txt: not found"]
    assert "splitlora_mpi" in _imported(r.stderr) and not HEAVY & _imported(r.stderr)


def test_a_finished_run_of_another_config_is_refused_untouched_and_overwrite_replaces_it(tmp_path):
    """central (one process) in ./runs/central; then 4 steps instead of 3: one line, exit 2,
    every file as it was; with --overwrite the new run replaces it (and its checkpoints)."""
    three = ["--set", "run.mode=central", "--set", "train.steps=3", "--set", "checkpoint.every=2"]
    r = run_cmd(splitlora(*three), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "central"
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert (out / "summary.json") in before and any("checkpoints" in f.parts for f in before)
    four = [*three, "--set", "train.steps=4"]
    r = run_cmd(splitlora(*four), cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.strip() == (
        "error: config key 'run.out_dir': runs/central holds a finished run of another config (train.steps=3 -> 4); "
        "expected a new directory (--set run.name=NAME) or --overwrite to replace that run"
    )
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    r = run_cmd(splitlora(*three), cwd=tmp_path, timeout=300)  # the same config: as before (resumed)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cmd(splitlora(*four, "--overwrite"), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_config(out / "config.yaml").train.steps == 4
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_only_a_complete_run_counts_as_finished(tmp_path):
    """A run that stopped or failed (its summary says so) is resumed or started again by any
    config; a complete one of another config is refused."""
    cfg = _cfg(tmp_path)
    out = cfg.out_dir
    out.mkdir()
    (out / "config.yaml").write_text(_cfg(tmp_path, "train.steps=7").to_yaml())
    for status in ("stopped", "failed"):
        (out / "summary.json").write_text(json.dumps({"status": status}))
        check_previous_run(cfg)
    (out / "summary.json").write_text(json.dumps({"status": "complete"}))
    with pytest.raises(ConfigError, match="holds a finished run of another config"):
        check_previous_run(cfg)
