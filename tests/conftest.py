"""Shared helpers: running the installed package as a command, under mpirun or alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from common import MPIRUN


def run_cmd(
    args: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout (a hung MPI job fails the test instead of the suite)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def splitlora(*args: str, ranks: int | None = None) -> list[str]:
    """The command line of a run: `mpirun -n R python -m splitlora_mpi ARGS` (or without mpirun)."""
    cmd = [sys.executable, "-m", "splitlora_mpi", *args]
    if ranks is None:
        return cmd
    assert MPIRUN, "mpirun not found next to python (pip's mpich wheel provides it)"
    return [MPIRUN, "-n", str(ranks), *cmd]


def run_local(out: Path, clients: int, *sets: str) -> Path:
    """A whole job as threads of this process (the local transport): `sets` are `key=value`
    overrides; returns its out_dir. For what MPI is not the point of."""
    from splitlora_mpi.config import load_config
    from splitlora_mpi.run.runner import run_in_process

    run_in_process(load_config(None, [f"run.out_dir={out}", *sets]), clients)
    return out


def run_rows(out: Path) -> list[dict]:
    """metrics.jsonl of a finished run."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def run_adapter(out: Path) -> dict:
    """The exported adapter's tensors."""
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def tiny_args() -> list[str]:
    """A few fast steps of the default model; every knob that matters for equivalence pinned."""
    return [
        "--set",
        "train.steps=6",
        "--set",
        "train.log_every=1",
        "--set",
        "train.aggregate_every=3",
        "--set",
        "train.eval_every=3",
        "--set",
        "train.warmup_steps=2",
    ]
