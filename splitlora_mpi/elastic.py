"""The elastic launch: `python -m splitlora_mpi.elastic -n 9 [--hosts FILE] [job options]`.

Runs `mpiexec ... python -m splitlora_mpi [job options]` so that a client that dies, freezes
or loses its link is dropped and the others go on (what torchrun is to torch):

- hydra's auto-cleanup off (`-disable-auto-cleanup`): a rank that exits does not end the job;
- on one host (no --hosts): each rank gets its own hydra proxy (`-launcher fork` with a hosts
  file of distinct names), since a rank killed by a signal takes down every rank of its proxy,
  and UCX uses shared memory only (`UCX_TLS=posix,sysv,self` unless set): its cross-memory
  attach failed inside a transfer from a killed peer (`process_vm_readv(...) returned -1: No
  such process`; rank 0 never returned) and its TCP segfaults in a send to a killed peer;
- with --hosts (one proxy per host already): the file goes to mpiexec as `-f`;
- the ranks learn they run elastic from SPLITLORA_ELASTIC=1, and rank 0 writes how the job
  ended to SPLITLORA_STATUS_FILE. mpiexec's exit code after a loss is the dead rank's, so this
  command exits with the job's own code from that file: 0 when it finished (over the clients
  that answered), 1 failed, 2 bad input, 143 stopped by a signal.

A frozen client (SIGSTOP) keeps mpiexec waiting for it forever: once rank 0 has written the
status, mpiexec and every rank left get --grace seconds (default 30) to end, then mpiexec is
killed, and each hydra proxy that loses mpiexec kills its ranks, the stopped one included.
(Under load mpiexec sometimes dies of SIGPIPE first, writing to the proxy of a rank that has
exited; the proxies end their ranks the same way, and the job's code is still the status file's.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .cli import OneLineParser
from .run.startup import ELASTIC_ENV, STATUS_ENV, mpiexec_path

FINISH_GRACE_S = 30.0


def command(ranks: int, job_args: list[str], status_file: Path, hosts: Path | None, workdir: Path) -> list[str]:
    """The mpiexec command line of an elastic job (writes the one-host hosts file into `workdir`)."""
    if hosts is None:
        hosts = workdir / "hosts"
        hosts.write_text("".join(f"n{i}:1\n" for i in range(ranks)))
        placement = ["-launcher", "fork", "-f", str(hosts)]
        if "UCX_TLS" not in os.environ:
            placement += ["-genv", "UCX_TLS", "posix,sysv,self"]
    else:
        placement = ["-f", str(hosts)]
    return [mpiexec_path(), "-disable-auto-cleanup", *placement, "-genv", ELASTIC_ENV, "1",
            "-genv", STATUS_ENV, str(status_file), "-n", str(ranks),
            sys.executable, "-m", "splitlora_mpi", *job_args]  # fmt: skip


def run(ranks: int, job_args: list[str], hosts: Path | None = None, grace_s: float = FINISH_GRACE_S) -> int:
    """The job's exit code (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="splitlora-elastic-") as tmp:
        status_file = Path(tmp) / "status.json"
        job = subprocess.Popen(command(ranks, job_args, status_file, hosts, Path(tmp)), start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            os.killpg(job.pid, signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        ended_at = None
        while job.poll() is None:
            if ended_at is None and status_file.exists():
                ended_at = time.monotonic()
            elif ended_at is not None and time.monotonic() - ended_at > grace_s:
                print(f"elastic: ranks still running {grace_s:g} s after the job ended (a frozen "
                      "client?): killing them", file=sys.stderr, flush=True)  # fmt: skip
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
                break
            time.sleep(0.2)
        try:
            return int(json.loads(status_file.read_text())["exit_code"])
        except (OSError, ValueError, KeyError):  # rank 0 never got to write it
            return job.returncode or 1


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(
        prog="python -m splitlora_mpi.elastic",
        description="Run a splitlora_mpi job that goes on over the clients that answer.",
        epilog="Other options go to python -m splitlora_mpi (e.g. --config F --set train.steps=50).",
    )
    p.add_argument("-n", type=int, default=9, help="ranks: 1 server + n-1 clients (default 9)")
    p.add_argument("--hosts", type=Path,
                   help="hydra hosts file (several hosts); default: this host, one proxy per rank")  # fmt: skip
    p.add_argument(
        "--grace",
        type=float,
        default=FINISH_GRACE_S,
        help="seconds the ranks get to end after rank 0 has finished (then killed: a frozen client)",
    )
    args, job_args = p.parse_known_args(argv)
    if args.n < 2:
        p.error(f"-n: expected at least 2 ranks (1 server + 1 client), got {args.n}")
    if args.hosts is not None and not args.hosts.is_file():
        p.error(f"--hosts {args.hosts}: file not found")
    return run(args.n, job_args, args.hosts, args.grace)


if __name__ == "__main__":
    sys.exit(main())
