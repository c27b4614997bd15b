"""The Transport over MPI: the only importer of mpi4py.

A tensor travels as two messages: its 64-byte header (step, dtype, shape, flag), small
enough to go eagerly into a receive posted before it arrives, and its bytes straight from
the tensor's memory (no copy on CPU). The receiver matches each payload with a matched
probe (`Improbe`), so it sizes the buffer without waiting for the header, and receives into
a pooled buffer that is reused once no tensor built on it is alive (no allocation, no page
faults per message). Measured (README, Benchmarks): the header in the payload's message
costs a copy (0.4-0.6 of raw mpi4py throughput) or a struct datatype MPICH packs (0.7-0.76);
the second message costs 1-4 % at the MPI level.

Every wait spins for a millisecond, yielding the core to any process that wants it (a reply
already on its way costs no sleep), then naps of 1/8 of the time waited, up to 0.5 ms (an
idle rank does not burn its core), until the deadline: blocking MPI waits spin forever and
never time out. Control objects (handshake, statistics, export) are pickled: they are off
the hot path. Importing this module needs no torch: a rank checks its input and stops
within a second, before it loads the heavy libraries.
"""

from __future__ import annotations

import functools
import os
import pickle
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from ..errors import CommTimeout
from . import CONTINUE, HEADER_BYTES, SERVER, Message, Outgoing, timeout_message

if TYPE_CHECKING:
    import torch

    from ..metrics import Metrics

HEADER = struct.Struct("8q")  # step, dtype, ndim, d0, d1, d2, d3, flag
assert HEADER.size == HEADER_BYTES
MAX_DIMS = 4
_NO_DIMS = (0,) * MAX_DIMS
# dtype codes, append only; numpy has no bfloat16: its bytes are read as int16, then viewed
DTYPES = ["float32", "bfloat16", "float16", "int32", "int64", "int8", "float64"]
_NUMPY = [np.float32, np.int16, np.float16, np.int32, np.int64, np.int8, np.float64]
_BFLOAT16 = DTYPES.index("bfloat16")
_HEADER, _PAYLOAD = 0, 1
SPIN_S = 1e-3  # polling without sleeping, yielding the core to any other process that wants it
NAP_FRACTION, NAP_MAX_S = 1 / 8, 5e-4  # then naps of 1/8 of the time waited so far, at most 0.5 ms


def world_size() -> int:
    return MPI.COMM_WORLD.Get_size()


def world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def abort(code: int) -> None:
    """Kill every rank: an uncaught error must never leave the others blocked."""
    MPI.COMM_WORLD.Abort(code)


class BufferPool:
    """Host buffers by key (phase, peer, tensor index). A buffer is handed out again only when
    nothing but the pool refers to it: the tensors built on it hold numpy views of it, so its
    reference count says whether one is still alive. Pinned memory when CUDA stages through it."""

    KEEP = 2  # buffers per key; a third one in use makes the oldest the caller's to free

    def __init__(self, pinned: bool = False) -> None:
        self.pinned = pinned
        self.buffers: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self.allocations = 0

    def take(self, key: tuple[Any, ...], nbytes: int) -> np.ndarray:
        held = self.buffers.setdefault(key, [])
        for buf in held:
            # references: the list, this loop's name, getrefcount's argument
            if buf.nbytes >= nbytes and sys.getrefcount(buf) == 3:
                return buf
        buf = self._allocate(nbytes)
        held.append(buf)
        if len(held) > self.KEEP:
            held.pop(0)
        return buf

    def _allocate(self, nbytes: int) -> np.ndarray:
        self.allocations += 1
        if not self.pinned:
            return np.empty(nbytes, dtype=np.uint8)
        import torch

        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()


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
        self.pool = BufferPool()  # pinned once torch is loaded and sees a GPU (launch.py)
        self._status = MPI.Status()

    # ------------------------------------------------------------ waiting

    def _poll(
        self, done: Callable[[], bool], op: str, pending: Callable[[], list[int]], what: str, timeout_s: float = 0
    ) -> None:
        """Call `done()` until it is true: spinning for SPIN_S, then napping (a nap adds at most
        1/8 to a wait), up to comm.timeout_s (or `timeout_s` for a wait known to span several steps)."""
        start = time.perf_counter()
        if not done():
            deadline = start + (timeout_s or self.timeout_s)
            while not done():
                waited = time.perf_counter() - start
                if waited < SPIN_S:
                    os.sched_yield()
                    continue
                if start + waited > deadline:
                    raise CommTimeout(timeout_message(self.rank, pending(), timeout_s or self.timeout_s,
                                                      self.timeout_s, what))  # fmt: skip
                time.sleep(min(waited * NAP_FRACTION, NAP_MAX_S))
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
        keep: list[Any] = []  # what the payloads point into must outlive the requests
        for dest, tensors in messages.items():
            for i, (tensor, kind) in enumerate(tensors):
                payload, owner = self._payload(("send", phase, dest, i), tensor)
                keep.append(owner)
                tag = phase + 2 * i
                requests.append(self.comm.Isend(payload, dest, tag + _PAYLOAD))
                requests.append(self.comm.Isend(_header(step, tensor, flag), dest, tag + _HEADER))
                peers += [dest, dest]
                self.metrics.sent(dest, "control", HEADER_BYTES)
                self.metrics.sent(dest, kind, tensor.nbytes)

        def wait() -> None:
            self._wait(requests, "send", f"sending phase {phase} step {step}", peers)
            keep.clear()

        return wait

    def _payload(self, key: tuple[Any, ...], tensor: torch.Tensor) -> tuple[Any, Any]:
        """The tensor's bytes as an MPI buffer and the object that must stay alive meanwhile:
        the tensor's own memory on CPU, a pooled pinned buffer it is copied into from a GPU."""
        nbytes = tensor.nbytes
        if tensor.is_cuda:
            host = self.pool.take(key, nbytes)[:nbytes]
            _torch().from_numpy(host).copy_(tensor.detach().contiguous().view(-1).view(_torch().uint8))
            return host, host
        t = tensor if tensor.is_contiguous() else tensor.contiguous()
        return (MPI.buffer.fromaddress(t.data_ptr(), nbytes) if nbytes else b""), t

    def recv_tensors(self, sources: list[int], phase: int, kinds: list[str]) -> dict[int, list[Message]]:
        """Headers into receives posted at once; each payload received as soon as a probe
        matches it, into a pooled buffer of its size."""
        keys = [(s, i) for s in sources for i in range(len(kinds))]
        headers = bytearray(len(keys) * HEADER_BYTES)
        view = memoryview(headers)
        header_reqs = [self.comm.Irecv([view[j * HEADER_BYTES : (j + 1) * HEADER_BYTES], MPI.BYTE], s,
                                       phase + 2 * i + _HEADER) for j, (s, i) in enumerate(keys)]  # fmt: skip
        unmatched = dict(enumerate(keys))
        payload_reqs: list[MPI.Request] = []
        payloads: dict[int, np.ndarray] = {}
        status = self._status

        def done() -> bool:
            for j, (s, i) in list(unmatched.items()):
                message = self.comm.Improbe(s, phase + 2 * i + _PAYLOAD, status)
                if message is not None:
                    nbytes = status.Get_count(MPI.BYTE)
                    buf = self.pool.take((phase, s, i), nbytes)[:nbytes]
                    payload_reqs.append(message.Irecv([buf, MPI.BYTE]))
                    payloads[j] = buf
                    del unmatched[j]
            return not unmatched and MPI.Request.Testall(payload_reqs) and MPI.Request.Testall(header_reqs)

        def pending() -> list[int]:
            headers_due = [s for (s, _), r in zip(keys, header_reqs) if not r.Test()]
            return [s for s, _ in unmatched.values()] + headers_due + [-1] * (not MPI.Request.Testall(payload_reqs))

        self._poll(done, "recv", pending, f"receiving phase {phase}")
        out: dict[int, list[Message]] = {s: [] for s in sources}
        for j, (source, i) in enumerate(keys):
            h = HEADER.unpack_from(headers, j * HEADER_BYTES)
            buf = payloads[j]
            self.metrics.received(source, "control", HEADER_BYTES)
            self.metrics.received(source, kinds[i], buf.nbytes)
            out[source].append(Message(h[0], _tensor(buf, h[1], h[3 : 3 + h[2]]), h[7]))
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
        status = self._status

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
        status = self._status
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


@functools.cache
def _torch() -> Any:
    """torch, loaded by the first tensor message (not by importing this module)."""
    import torch

    return torch


@functools.cache
def _dtype_codes() -> dict[Any, int]:
    return {getattr(_torch(), name): code for code, name in enumerate(DTYPES)}


def _header(step: int, tensor: torch.Tensor, flag: int) -> bytes:
    """[step, dtype, ndim, d0, d1, d2, d3, flag] as int64"""
    ndim = tensor.dim()
    if ndim > MAX_DIMS:
        raise ValueError(f"tensor of rank {ndim} does not fit the header")
    return HEADER.pack(step, _dtype_codes()[tensor.dtype], ndim, *tensor.shape, *_NO_DIMS[ndim:], flag)


def _tensor(buf: np.ndarray, code: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A host tensor over the received bytes (no copy; it keeps the pooled buffer busy while
    alive); callers move it to their device."""
    t = _torch().from_numpy(np.ndarray(shape, _NUMPY[code], buf))
    return t.view(_torch().bfloat16) if code == _BFLOAT16 else t
