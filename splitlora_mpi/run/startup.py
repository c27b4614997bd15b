"""How this rank was launched (elastic or not) and what its start-up cost, phase by phase.
Shared by launch.py (which starts a rank) and runner.py (which reports it): no heavy imports."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

PHASES = ("launch", "preflight", "import", "build", "handshake")
ELASTIC_ENV = "SPLITLORA_ELASTIC"  # "1": launched by python -m splitlora_mpi.elastic
STATUS_ENV = "SPLITLORA_STATUS_FILE"  # where rank 0 writes how the job ended (the elastic launcher reads it)


def mpiexec_path() -> str:
    """The mpiexec beside this python (pip's mpich wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else (shutil.which("mpiexec") or "mpiexec")


def without_launcher(env: dict[str, str]) -> dict[str, str]:
    """`env` minus what mpiexec gave this rank: a process started from it is no rank of this job."""
    return {k: v for k, v in env.items() if not k.startswith(("PMI_", "MPI_LOCAL"))}


def elastic_launch() -> bool:
    """Whether a client's death leaves the other ranks running: the elastic launcher says so,
    or hydra's auto-cleanup is off by its config file (HYDRA_CONFIG_FILE or ~/.mpiexec.hydra.conf)."""
    if os.environ.get(ELASTIC_ENV) == "1":
        return True
    conf = Path(os.environ.get("HYDRA_CONFIG_FILE") or Path.home() / ".mpiexec.hydra.conf")
    try:
        return "-disable-auto-cleanup" in conf.read_text()
    except OSError:
        return False


class Startup:
    """Seconds of this rank's start-up by phase, each from the end of the one before: `launch`
    (process start to the runner: python, the CLI, the config), `preflight` (MPI, the input
    checks and their exchange), `import` (torch, transformers, peft), `build` (tokenizer, data,
    model parts with LoRA), `handshake` (waiting for every rank to be built, and the verdict)."""

    def __init__(self, launch_s: float = 0.0) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0) | {"launch": round(launch_s, 3)}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now

    def report(self) -> dict[str, float]:
        """summary.json `startup_s` of this rank: the phases and their `total`."""
        return {**self.seconds, "total": round(sum(self.seconds.values()), 3)}


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
