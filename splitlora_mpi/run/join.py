"""A client joining a running elastic job: `python -m splitlora_mpi --join [same config]`.

Rank 0 opens an MPI port and writes its name to `<out_dir>/join/port`. A joining process
(a rebooted device, a new one; a singleton or its own `mpirun -n 1`) reads it, leaves a
request file in `<out_dir>/join/requests/` and connects. Rank 0 looks for requests between
steps and accepts each on demand (an Accept waiting in a thread would freeze rank 0's other
MPI traffic until someone connects) and gives the client the next free id. The client builds
its part with that id (its data is its own `{client}` path or local file) and sends the same
hello as at start-up; rank 0 checks it between later steps without waiting for it (the
fingerprint, the tokenizer) and answers. The client then waits for the end of the round,
takes the round's average from rank 0 and trains from the next round on. The port file is the
only rendezvous: the joiner needs to read it (same host, a shared volume, or a copy).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import JobConfig
from ..errors import ConfigError
from ..fsutil import say, write_atomic
from ..wire import HANDSHAKE
from .handshake import verdict

STALE_S = 30.0  # a request older than this is from a joiner that gave up (never accepted: Accept would wait)


def join_dir(cfg: JobConfig) -> Path:
    return cfg.out_dir / "join"


class JoinDesk:
    """Rank 0's side: the port, the requests, the handshake of each joiner."""

    def __init__(self, cfg: JobConfig, transport: Any, fingerprint: dict[str, Any], first_id: int,
                 share: Callable[[dict[int, Any]], dict[str, Any]]):  # fmt: skip
        self.cfg = cfg
        self.transport = transport
        self.fingerprint = fingerprint
        self.next_id = first_id
        self.share = share
        self.port = transport.open_port()
        self.pending: dict[int, tuple[int, float]] = {}  # accepted, hello not yet here: id -> (step, since)
        self.requests = join_dir(cfg) / "requests"
        self.requests.mkdir(parents=True, exist_ok=True)
        for old in self.requests.iterdir():  # (from an earlier run of this out_dir)
            old.unlink(missing_ok=True)
        # a joiner's UCX must offer what rank 0's does (else "Invalid port"): its transports beside the port
        write_atomic(join_dir(cfg) / "ucx_tls", os.environ.get("UCX_TLS", ""))
        write_atomic(join_dir(cfg) / "port", self.port + "\n")

    def close(self) -> None:
        """The job has ended: no joiner may connect to it any more; one that asked meanwhile is
        accepted and told so (it would wait in its Connect otherwise)."""
        (join_dir(self.cfg) / "port").unlink(missing_ok=True)
        for request in self._requests():
            request.unlink(missing_ok=True)
            self.transport.accept(self.port, self.next_id)
            self.transport.send_object(self.next_id, HANDSHAKE, {"ended": True})
            self.next_id += 1

    def _requests(self) -> list[Path]:
        return sorted(p for p in self.requests.iterdir() if not p.name.startswith("."))  # (not a temp file)

    def admit(self, step: int) -> dict[int, dict[str, Any]]:
        """Between steps: new requests accepted and given an id; the clients whose hello passed
        the handshake are admitted (id -> hello). Never waits for a hello (<= 1 ms per step)."""
        t = self.transport
        for request in self._requests():
            fresh = time.time() - request.stat().st_mtime < STALE_S
            request.unlink(missing_ok=True)
            if fresh:
                peer, self.next_id = self.next_id, self.next_id + 1
                t.accept(self.port, peer)
                t.send_object(peer, HANDSHAKE, {"rank": peer, "size": peer + 1, "step": step})
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
            error = verdict(self.fingerprint, {peer: hello}, shared_val=False)
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
    # (a job that ended meanwhile never accepts: give up as MPI's connect timeout says)
    os.environ.setdefault("MPIR_CVAR_CH4_COMM_CONNECT_TIMEOUT", str(max(1, int(cfg.comm.timeout_s))))
    tls = join_dir(cfg) / "ucx_tls"  # (rank 0's transports: see JoinDesk)
    if tls.is_file() and (transports := tls.read_text().strip()):
        os.environ.setdefault("UCX_TLS", transports)
    from ..wire import mpi

    requests = join_dir(cfg) / "requests"
    requests.mkdir(parents=True, exist_ok=True)
    port = port_file.read_text().strip()
    write_atomic(requests / f"{socket.gethostname()}-{os.getpid()}", "")
    if not port_file.exists():  # (the job ended meanwhile: nobody would accept)
        raise ConfigError(f"--join: the job of {cfg.out_dir} has ended")
    return mpi.connect(port)
