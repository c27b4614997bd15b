"""The Transport over MPI: the only importer of mpi4py.

A tensor travels as a fixed 8 x int64 header (step, dtype, shape, flag) and the tensor's
bytes as a contiguous buffer: no pickle on the hot path. Every wait polls with short
sleeps and a deadline: blocking MPI waits spin, burn a core, and never time out. Control
objects (handshake, run statistics, export) are pickled: they are off the hot path.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from ..errors import CommTimeout
from ..metrics import Metrics
from . import CONTINUE, HEADER_BYTES, SERVER, Message, Outgoing, timeout_message

HEADER_LEN = HEADER_BYTES // 8
# codes: append only
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.int8, torch.float64]
_HEADER, _PAYLOAD = 0, 1


def world_size() -> int:
    return MPI.COMM_WORLD.Get_size()


def world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def abort(code: int) -> None:
    """Kill every rank: an uncaught error must never leave the others blocked."""
    MPI.COMM_WORLD.Abort(code)


class MpiTransport:
    """`Transport` over MPI.COMM_WORLD; FedAvg over a clients-only communicator."""

    def __init__(self, timeout_s: float, metrics: Metrics):
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.timeout_s = timeout_s
        self.metrics = metrics
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self._clients: MPI.Comm | None = None

    # ------------------------------------------------------------ waiting

    def _poll(
        self, done: Callable[[], bool], op: str, pending: Callable[[], list[int]], what: str, timeout_s: float = 0
    ) -> None:
        """Call `done()` until it is true: a short spin, then sleeps growing to 1 ms, up to comm.timeout_s
        (or `timeout_s` for a wait known to span several steps)."""
        start = time.perf_counter()
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        spins, nap = 0, 1e-5
        while not done():
            spins += 1
            if spins > 50:  # then sleep, 10 us doubling to 1 ms: prompt for quick replies, idle for slow ones
                time.sleep(nap)
                nap = min(2 * nap, 0.001)
            if time.monotonic() > deadline:
                raise CommTimeout(timeout_message(self.rank, pending(), timeout_s, self.timeout_s, what))
        if self.metrics.timing:
            self.metrics.comm(op, time.perf_counter() - start)

    def _wait(self, requests: list[MPI.Request], op: str, what: str, peers: list[int]) -> None:
        def pending() -> list[int]:
            return [p for p, r in zip(peers, requests) if not r.Test()]

        self._poll(lambda: MPI.Request.Testall(requests), op, pending, what)

    def barrier(self, what: str) -> None:
        self._wait([self.comm.Ibarrier()], "recv", what, [-1])

    # ------------------------------------------------------------ tensors

    def send_tensors(self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE) -> None:
        self.isend_tensors(phase, step, messages, flag)()

    def isend_tensors(self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE) -> Callable[[], None]:
        requests: list[MPI.Request] = []
        peers: list[int] = []
        keep: list[np.ndarray] = []  # buffers must outlive the requests
        for dest, tensors in messages.items():
            for i, (tensor, kind) in enumerate(tensors):
                header, payload = _header(step, tensor, flag), _host_bytes(tensor)
                keep += [header, payload]
                tag = phase + 2 * i
                requests.append(self.comm.Isend([header, MPI.INT64_T], dest, tag + _HEADER))
                requests.append(self.comm.Isend([payload, MPI.BYTE], dest, tag + _PAYLOAD))
                peers += [dest, dest]
                self.metrics.sent(dest, "control", header.nbytes)
                self.metrics.sent(dest, kind, payload.nbytes)

        def wait() -> None:
            self._wait(requests, "send", f"sending phase {phase} step {step}", peers)
            keep.clear()

        return wait

    def recv_tensors(self, sources: list[int], phase: int, kinds: list[str]) -> dict[int, list[Message]]:
        """A payload receive is posted as soon as its header arrives."""
        headers = {(s, i): np.zeros(HEADER_LEN, dtype=np.int64) for s in sources for i in range(len(kinds))}
        waiting = {key: self.comm.Irecv([buf, MPI.INT64_T], key[0], phase + 2 * key[1] + _HEADER)
                   for key, buf in headers.items()}  # fmt: skip
        payloads: dict[tuple[int, int], tuple[MPI.Request, np.ndarray]] = {}

        def done() -> bool:
            for key in [k for k, req in waiting.items() if req.Test()]:
                del waiting[key]
                buf = np.empty(_nbytes(headers[key]), dtype=np.uint8)
                payloads[key] = (self.comm.Irecv([buf, MPI.BYTE], key[0], phase + 2 * key[1] + _PAYLOAD), buf)
            return not waiting and all(req.Test() for req, _ in payloads.values())

        def pending() -> list[int]:
            return [s for s, _ in waiting] + [s for (s, _), (req, _) in payloads.items() if not req.Test()]

        self._poll(done, "recv", pending, f"receiving phase {phase}")
        out: dict[int, list[Message]] = {s: [] for s in sources}
        for (source, i), (_, buf) in sorted(payloads.items()):
            header = headers[(source, i)]
            self.metrics.received(source, "control", header.nbytes)
            self.metrics.received(source, kinds[i], buf.nbytes)
            out[source].append(Message(int(header[0]), _tensor(header, buf), int(header[7])))
        return out

    # ------------------------------------------------------------ control objects

    def send_object(self, dest: int, phase: int, obj: Any, kind: str = "control") -> int:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        self.metrics.sent(dest, kind, data.nbytes)
        self._wait([self.comm.Isend([data, MPI.BYTE], dest, phase)], "send", f"sending phase {phase}", [dest])
        return data.nbytes

    def recv_objects(self, sources: list[int], phase: int, kind: str = "control") -> dict[int, Any]:
        """Probes for each object's size."""
        out: dict[int, Any] = {}
        status = MPI.Status()

        def done() -> bool:
            for source in sources:
                if source not in out and self.comm.Iprobe(source, phase, status):
                    buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
                    self.comm.Recv([buf, MPI.BYTE], source, phase)
                    self.metrics.received(source, kind, buf.nbytes)
                    out[source] = pickle.loads(buf.tobytes())
            return len(out) == len(sources)

        self._poll(done, "recv", lambda: [s for s in sources if s not in out], f"receiving phase {phase}")
        return out

    def recv_any(
        self, sources: list[int], phase: int, timeout_s: float, kind_of: Callable[[Any], str]
    ) -> tuple[int, Any]:
        status = MPI.Status()
        got: list[tuple[int, Any]] = []

        def done() -> bool:
            if self.comm.Iprobe(MPI.ANY_SOURCE, phase, status):
                source = status.Get_source()
                buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
                self.comm.Recv([buf, MPI.BYTE], source, phase)
                got.append((source, pickle.loads(buf.tobytes())))
                self.metrics.received(source, kind_of(got[0][1]), buf.nbytes)
            return bool(got)

        self._poll(done, "recv", lambda: sources, f"waiting for its turn (phase {phase})", timeout_s)
        return got[0]

    # ------------------------------------------------------------ clients' allreduce

    def open_clients_group(self) -> None:
        self.barrier("forming the clients' communicator")
        color = MPI.UNDEFINED if self.rank == SERVER else 1
        self._clients = self.comm.Split(color, self.rank)

    def allreduce_sum(self, buf: np.ndarray, world: bool = False) -> np.ndarray:
        """One non-blocking Allreduce polled with a deadline."""
        comm, peer = (self.comm, "all") if world else (self._clients, "clients")
        assert comm is not None, "open_clients_group() first"
        out = np.empty_like(buf)
        req = comm.Iallreduce([buf, MPI.DOUBLE], [out, MPI.DOUBLE], MPI.SUM)
        self.metrics.sent(peer, "adapters", buf.nbytes)
        self.metrics.received(peer, "adapters", out.nbytes)
        self._wait([req], "allreduce", f"averaging adapters (Allreduce over {peer})", [-1])
        return out


def _header(step: int, tensor: torch.Tensor, flag: int) -> np.ndarray:
    """[step, dtype, ndim, d0, d1, d2, d3, flag]"""
    if tensor.dim() > HEADER_LEN - 4:
        raise ValueError(f"tensor of rank {tensor.dim()} does not fit the header")
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    header[0], header[1], header[2] = step, DTYPES.index(tensor.dtype), tensor.dim()
    header[3 : 3 + tensor.dim()] = tensor.shape
    header[7] = flag
    return header


def _tensor(header: np.ndarray, buf: np.ndarray) -> torch.Tensor:
    """A host tensor over the received bytes (no copy); callers move it to their device."""
    shape = [int(d) for d in header[3 : 3 + int(header[2])]]
    return torch.from_numpy(buf).view(DTYPES[int(header[1])]).reshape(shape)


def _nbytes(header: np.ndarray) -> int:
    numel = int(np.prod(header[3 : 3 + int(header[2])]))
    return numel * DTYPES[int(header[1])].itemsize


def _host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes in host memory, zero-copy on CPU. CUDA tensors are staged through
    pinned host memory (for MPI builds that are not CUDA-aware)."""
    t = tensor.detach()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t)
        t = host
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()
