"""Starting one rank: the MPI world, this rank's input checks agreed with every other rank
(preflight.py), and only then the heavy imports (torch, transformers, peft) and the runner.
A bad input stops every rank before any of them pays for those imports; summary.json
`startup_s` says where each rank's start-up went."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import warnings
from types import ModuleType
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError
from ..metrics import Metrics
from ..modes import Mode, mode_of
from ..wire import SERVER
from . import preflight
from .startup import Startup, process_age_s

_STOP = threading.Event()


def run(cfg: JobConfig, overwrite: bool = False) -> None:
    """This process's rank of the job (raises ConfigError for bad input). One-rank modes run
    without MPI on an in-process transport. `overwrite`: a previous run in out_dir is replaced."""
    startup = Startup(process_age_s())
    from ..wire.mpi import MpiTransport, world_rank, world_size

    mode, size, rank = mode_of(cfg.run.mode), world_size(), world_rank()
    _check_world(mode, size)
    _catch_stop_signals(rank)
    metrics = Metrics(rank, mode.lead_role if rank == SERVER else "client", export=exported(cfg))
    checked = preflight.check(cfg, mode, rank, size, overwrite)
    transport = None
    if mode.one_rank and checked.error is not None:
        raise ConfigError(checked.error)
    if not mode.one_rank:
        transport = MpiTransport(cfg.comm.timeout_s, metrics)
        preflight.agree(transport, cfg, checked)
    if overwrite and rank == SERVER:
        preflight.clear_previous_run(cfg)
    startup.lap("preflight")
    runner = _import_runner()  # torch, transformers, peft: only once every rank's input is good
    import torch

    if transport is not None:  # GPU tensors reach MPI (not CUDA-aware) through pinned host buffers
        transport.pool.pinned = torch.cuda.is_available()
    startup.lap("import")
    runner.start(cfg, transport, metrics, _STOP.is_set, checked, startup)


def run_joining(cfg: JobConfig) -> None:
    """A client joining a running elastic job (run/join.py): connect, learn its id, check its
    input, then the same client as at start-up from the next round on."""
    startup = Startup(process_age_s())
    mode = mode_of(cfg.run.mode)
    if not mode.takes_joins(cfg):
        raise ConfigError(
            f"--join: a {mode.name} job with data.partition {cfg.data.scheme} takes no joining clients; expected "
            "run.mode splitlora or fedlora with each client's own data ({client} paths or data.partition local)"
        )
    if "PMI_RANK" not in os.environ:  # a singleton: the same command again under an mpiexec of its own
        from .join import own_mpiexec

        command = own_mpiexec(sys.executable, "-m", "splitlora_mpi", *sys.argv[1:])
        os.execve(command[0], command, os.environ)
    from ..wire import HANDSHAKE
    from ..wire.mpi import MpiTransport
    from .join import connect

    _catch_stop_signals(-1)
    runner = _import_runner()  # (before connecting: rank 0 then waits less for this client's hello)

    startup.lap("import")
    transport = MpiTransport(cfg.comm.timeout_s, Metrics(-1, "client"), joined=(connect(cfg), -1, 0))
    word = transport.recv_objects([SERVER], HANDSHAKE)[SERVER]
    transport.rank, transport.size = word["rank"], word["size"]
    transport.metrics = Metrics(word["rank"], "client", export=exported(cfg))
    checked = preflight.check(cfg, mode, transport.rank, transport.size)
    startup.lap("preflight")
    runner.start(cfg, transport, transport.metrics, _STOP.is_set, checked, startup, joined=word)


def exported(cfg: JobConfig) -> bool:
    """Whether this job's metrics leave the ranks (served and/or pushed)."""
    return cfg.metrics.enabled or cfg.metrics.pushgateway is not None


def _check_world(mode: Mode, size: int) -> None:
    if mode.one_rank and size > 1:
        raise ConfigError(
            f"config key 'run.mode': '{mode.name}' runs on one rank, got {size} ranks; start it without "
            f"mpirun: python -m splitlora_mpi --set run.mode={mode.name}"
        )
    if not mode.one_rank and size < 2:
        raise ConfigError(
            f"config key 'run.mode': '{mode.name}' needs 1 server + at least 1 client rank, got 1 rank. "
            "Launch with `mpirun -n 9 python -m splitlora_mpi` using the mpirun of the MPI that mpi4py loaded "
            "(pip's mpich wheel puts it next to python); another launcher starts N separate 1-rank jobs"
        )


def _catch_stop_signals(rank: int) -> None:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C): stop after the current step with a checkpoint
    (exit code 143); a second signal exits at once. mpirun forwards a signal to every rank;
    rank 0 says what happens (os.write: print is not safe inside a signal handler)."""

    def handler(signum: int, frame: Any) -> None:
        if _STOP.is_set():
            if rank == 0:
                os.write(2, f"second signal ({signum}): exiting at once, without a checkpoint\n".encode())
            os._exit(128 + signum)
        _STOP.set()
        if rank == 0:
            os.write(
                2,
                f"signal {signum}: stopping after this step with a checkpoint; signal again to exit at once\n".encode(),
            )

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _import_runner() -> ModuleType:
    """The runner, with torch, transformers and peft. The cyclic GC is off meanwhile: the imports
    make ~0.6 M objects and almost no garbage, and the ~900 collections they would trigger cost
    10-25 % of their CPU, paid once per rank on a host. Frozen, those objects are never scanned again."""
    gc.disable()
    try:
        _quiet_libraries()
        from . import runner
    finally:
        gc.enable()
    gc.freeze()
    return runner


def _quiet_libraries() -> None:
    """Hugging Face progress bars and notices on every rank drown the progress lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
