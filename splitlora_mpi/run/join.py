"""A client joining a running elastic job: `python -m splitlora_mpi --join [same config]`.

Rank 0 opens an MPI port and writes its name to `<out_dir>/join/port`. A joining process
(a rebooted device, a new one; under an mpiexec of its own, see `own_mpiexec`) reads it, leaves a
request file in `<out_dir>/join/requests/` and waits. Rank 0 looks for requests between steps
(an Accept waiting in a thread would freeze rank 0's other MPI traffic until someone
connects), answers one with a file in `join/accepting/`, on which the joiner connects and
sends its request's name, and accepts it, giving the client the next free id. An MPI Accept
has no deadline: a joiner that dies before it connects would leave rank 0 in it forever, so a
process started just before connects to the port itself after `elastic.client_timeout_s`,
says so, and both sides close that connection. The client builds
its part with that id (its data is its own `{client}` path or local file) and sends the same
hello as at start-up; rank 0 checks it between later steps without waiting for it (the
fingerprint, the tokenizer) and answers. The client then waits for the end of the round,
takes the round's average from rank 0 and trains from the next round on. The port file is the
only rendezvous: the joiner needs to read it (same host, a shared volume, or a copy).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError
from ..fsutil import say, write_atomic
from ..wire import HANDSHAKE
from . import secret
from .handshake import verdict
from .startup import mpiexec_path, without_launcher

STALE_S = 30.0  # a request older than this is from a joiner that gave up
UNBLOCKED = "unblocked"  # what the unblocking process says instead of a request's name
# connects to rank 0's port at a deadline (argv: port, time.time() then), ending an Accept nobody else ends
UNBLOCK = f"""import pickle, sys, time
from mpi4py import MPI
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
comm = MPI.COMM_SELF.Connect(sys.argv[1])
comm.Send([pickle.dumps({UNBLOCKED!r}), MPI.BYTE], 0, {HANDSHAKE})
comm.Disconnect()
"""


def own_mpiexec(*command: str) -> list[str]:
    """A process that connects to rank 0 runs under an mpiexec of its own: two singletons that
    connected to the same rank 0 look alike to it (MPICH 5: the second one's messages from rank
    0 go to the first; tested), processes of distinct mpiexecs do not."""
    return [mpiexec_path(), "-n", "1", *command]


def join_dir(cfg: JobConfig) -> Path:
    return cfg.out_dir / "join"


class JoinDesk:
    """Rank 0's side: the port, the requests, the handshake of each joiner."""

    def __init__(self, cfg: JobConfig, transport: Any, fingerprint: dict[str, Any], first_id: int,
                 share: Callable[[dict[int, Any]], dict[str, Any]], job_secret: bytes | None = None):  # fmt: skip
        self.cfg = cfg
        self.secret = job_secret
        self.challenges: dict[int, bytes | None] = {}
        self.transport = transport
        self.fingerprint = fingerprint
        self.next_id = first_id
        self.share = share
        self.port = transport.open_port()
        self.pending: dict[int, tuple[int, float]] = {}  # accepted, hello not yet here: id -> (step, since)
        self.requests, self.accepting = join_dir(cfg) / "requests", join_dir(cfg) / "accepting"
        for d in (self.requests, self.accepting):
            d.mkdir(parents=True, exist_ok=True)
            for old in d.iterdir():  # (from an earlier run of this out_dir)
                old.unlink(missing_ok=True)
        # a joiner's UCX must offer what rank 0's does (else "Invalid port"): its transports beside the port
        write_atomic(join_dir(cfg) / "ucx_tls", os.environ.get("UCX_TLS", ""))
        write_atomic(join_dir(cfg) / "port", self.port + "\n")

    def close(self) -> None:
        """The job has ended: no joiner may connect to it any more (one that asked meanwhile sees
        the port file gone and says so)."""
        (join_dir(self.cfg) / "port").unlink(missing_ok=True)
        for request in self._requests():
            request.unlink(missing_ok=True)

    def _accept(self, name: str) -> bool:
        """The joiner that asked as `name`, connected as the next id; False when it did not
        connect within elastic.client_timeout_s (the unblocking process did: dropped)."""
        give_up_s = self.cfg.elastic.client_timeout_s
        command = own_mpiexec(sys.executable, "-c", UNBLOCK, self.port, str(time.time() + give_up_s))
        unblock = subprocess.Popen(command, env=without_launcher(dict(os.environ)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)  # fmt: skip
        write_atomic(self.accepting / name, "")
        t, peer = self.transport, self.next_id
        t.accept(self.port, peer)
        (self.accepting / name).unlink(missing_ok=True)
        said = t.recv_objects([peer], HANDSHAKE, give_up_s=give_up_s).get(peer)
        if said == UNBLOCKED:
            t.forget(peer, together=True)
        else:  # (still asleep: it never connects)
            unblock.kill()
        unblock.wait()
        if said == name:
            return True
        if said != UNBLOCKED:  # (connected, then silent: gone)
            t.forget(peer)
        say(f"server: a client that asked to join ({name}) did not connect within "
            f"elastic.client_timeout_s={give_up_s:g} s; going on without it")  # fmt: skip
        return False

    def _requests(self) -> list[Path]:
        return sorted(p for p in self.requests.iterdir() if not p.name.startswith("."))  # (not a temp file)

    def admit(self, step: int) -> dict[int, dict[str, Any]]:
        """Between steps: new requests accepted and given an id; the clients whose hello passed
        the handshake are admitted (id -> hello). Never waits for a hello (<= 1 ms per step)."""
        t = self.transport
        for request in self._requests():
            fresh = time.time() - request.stat().st_mtime < STALE_S
            request.unlink(missing_ok=True)
            if fresh and self._accept(request.name):
                peer, self.next_id = self.next_id, self.next_id + 1
                self.challenges[peer] = secret.nonce(self.secret)
                word = {"rank": peer, "size": peer + 1, "step": step, "challenge": self.challenges[peer]}
                t.send_object(peer, HANDSHAKE, word)
                self.pending[peer] = (step, time.monotonic())
        if not self.pending:
            return {}
        hellos = t.recv_objects(list(self.pending), HANDSHAKE, give_up_s=1e-6)
        for peer in [p for p, (_, since) in self.pending.items() if time.monotonic() - since > t.timeout_s]:
            if peer not in hellos:  # (built nothing within comm.timeout_s: gone)
                del self.pending[peer]
                t.evict(peer, "no hello within comm.timeout_s of joining")
        admitted = {}
        for peer, hello in hellos.items():
            del self.pending[peer]
            proofs = {peer: hello.get("proof")}
            error = secret.refusal(self.secret, self.challenges, self.cfg.fingerprint(), proofs) or verdict(
                self.fingerprint, {peer: hello}, shared_val=False
            )
            t.send_object(peer, HANDSHAKE, {"error": error, **(self.share({peer: hello}) if error is None else {})})
            if error is not None:
                say(f"server: refused a client that asked to join: {error}")
                continue
            admitted[peer] = hello
            print(f"server: client {peer} joined at step {step} (pid {hello['pid']} on {hello['host']}); it trains "
                  "from the next round", flush=True)  # fmt: skip
        return admitted


def connect(cfg: JobConfig) -> Any:
    """The joiner's side: the port from rank 0's file, a request, the connection (an
    intercommunicator whose remote rank 0 is the server)."""
    port_file = join_dir(cfg) / "port"
    if not port_file.is_file():
        raise ConfigError(
            f"--join: no {port_file}; expected the out_dir of a running elastic job (python -m "
            "splitlora_mpi.elastic, same config) — or a copy of that file where this client runs"
        )
    # (rank 0 is in its Accept when this process connects, and leaves it after client_timeout_s)
    os.environ.setdefault("MPIR_CVAR_CH4_COMM_CONNECT_TIMEOUT", str(max(1, int(cfg.elastic.client_timeout_s))))
    tls = join_dir(cfg) / "ucx_tls"  # (rank 0's transports: see JoinDesk)
    if tls.is_file() and (transports := tls.read_text().strip()):
        os.environ.setdefault("UCX_TLS", transports)
    from ..wire import mpi

    port = port_file.read_text().strip()
    name = f"{socket.gethostname()}-{os.getpid()}"
    request, go = join_dir(cfg) / "requests" / name, join_dir(cfg) / "accepting" / name
    write_atomic(request, "")
    deadline = time.monotonic() + cfg.comm.timeout_s
    while not go.exists():  # (rank 0 looks between steps; fedlora between rounds)
        if not port_file.exists():
            raise ConfigError(f"--join: the job of {cfg.out_dir} has ended")
        if time.monotonic() > deadline:
            request.unlink(missing_ok=True)
            raise ConfigError(f"--join: rank 0 of {cfg.out_dir} took no new client within comm.timeout_s="
                              f"{cfg.comm.timeout_s:g} s")  # fmt: skip
        time.sleep(0.02)
    return mpi.connect(port, name)
