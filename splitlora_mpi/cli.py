"""Command line: `python -m splitlora_mpi [--config F] [--set key.path=value ...] [--print-config]`.

Exit codes: 0 done; 2 bad config / data / arguments (one line on rank 0, no traceback);
143 stopped by SIGTERM/SIGINT after writing a checkpoint (run again to resume); 1 any other
failure (the communicator is aborted so no rank is left waiting). Under an elastic launch a
client never aborts the job (it leaves alone), and every rank ends without MPI_Finalize (it
hangs once any rank died); rank 0 writes how the job ended where SPLITLORA_STATUS_FILE says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

from .config import load_config
from .errors import ConfigError, Diverged, Evicted, JobFailed, Stopped

LAUNCH = """how to launch:
  mpirun -n N+1 python -m splitlora_mpi [options]   rank 0 is the server, ranks 1..N the clients
                                                    (modes splitlora, sl, fedlora; e.g. -n 9: 8 clients)
  python -m splitlora_mpi --set run.mode=central    the one-rank baseline needs no mpirun

config reference: every key with its default and meaning is in docs/configuration.md
("Configuration reference") and in configs/default.yaml; --print-config shows the resolved config.

the other commands (each with --help):
  python -m splitlora_mpi.elastic -n N+1 [options]  a launch that goes on when clients fail
  python -m splitlora_mpi.evaluate RUN_DIR          E2E NLG scores of a finished run
  python -m splitlora_mpi.generate RUN_DIR --prompt TEXT
                                                    completions of a finished run's model
  python -m splitlora_mpi.plan --model DIR ...      what a client and the server hold at each cut
  python -m splitlora_mpi.plot RUN_DIR ...          convergence figure of runs
  python -m splitlora_mpi.prepare_model             a GGUF checkpoint as a model directory"""
ABORT_GRACE_S = 0.5
EXIT_STOPPED = 143  # 128 + SIGTERM: stopped by a signal, checkpoint written


def launcher_rank() -> int:
    """This process's rank as the launcher announces it (readable before MPI starts)."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one `error:` line (from rank 0 only, under mpirun) and exit code 2."""

    def error(self, message: str) -> None:
        if launcher_rank() == 0:
            print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m splitlora_mpi",
        description="Split-federated LoRA fine-tuning over MPI.",
        epilog=LAUNCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (default: the packaged default.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one config key; repeatable; values parse as YAML scalars",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished run of another config in run.out_dir (default: refuse, exit 2)",
    )
    p.add_argument("--join", action="store_true",
                   help="join the running elastic job of this config as a new client (run.out_dir/join/port "
                        "must be readable here); as a singleton or under mpirun -n 1")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = launcher_rank()
    from .run.startup import elastic_launch  # (torch only once every rank's input is checked)

    elastic = elastic_launch()
    code = _run(args, rank, elastic)
    if rank == 0 and not args.print_config:
        _write_status(code)
    if elastic and "mpi4py.MPI" in sys.modules:  # MPI_Finalize hangs once any rank died
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace, rank: int, elastic: bool) -> int:
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            if rank == 0:
                print(cfg.to_yaml(), end="")
            return 0
        from .run.launch import run, run_joining

        if args.join:
            run_joining(cfg)
        else:
            run(cfg, args.overwrite)
        return 0
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if isinstance(e, Diverged) and e.others_running:
            _abort_world(2)
        return 2
    except Stopped as e:
        if rank == 0:
            print(f"stopped: {e}; run the same command again to resume", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        return 130
    except Evicted as e:  # this client alone leaves; the job goes on
        print(f"rank {rank}: evicted: {e}", file=sys.stderr, flush=True)
        return 1
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not (elastic and rank != 0):  # an elastic client never takes the job down
            _abort_world()
        return 1
    except Exception:  # noqa: BLE001 - report, then take every rank down
        print(f"rank {rank}: error:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if not (elastic and rank != 0):
            _abort_world()
        return 1


def _write_status(code: int) -> None:
    """Rank 0 under the elastic launcher: how the job ended (mpiexec's own code cannot say)."""
    from .run.startup import STATUS_ENV

    if os.environ.get(STATUS_ENV):
        status = {0: "complete", EXIT_STOPPED: "stopped"}.get(code, "failed")
        with open(os.environ[STATUS_ENV], "w") as f:
            json.dump({"status": status, "exit_code": code}, f)


def _abort_world(code: int = 1) -> None:
    if launcher_rank() == 0:  # first: the abort may end this process before main() would write it
        _write_status(code)
    if "mpi4py.MPI" in sys.modules:
        from .wire.mpi import abort, world_size

        if world_size() > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(ABORT_GRACE_S)  # the launcher forwards this rank's report before the abort cuts its pipes
            abort(code)
