"""The Transport over MPI: the only importer of mpi4py.

A tensor travels as two messages: its 64-byte header (step, dtype, shape, flag), small
enough to go eagerly into a receive posted before it arrives, and its bytes straight from
the tensor's memory (no copy on CPU). The receiver matches each payload with a matched
probe (`Improbe`), so it sizes the buffer without waiting for the header, and receives into
a pooled buffer that is reused once no tensor built on it is alive (no allocation, no page
faults per message). Measured (docs/benchmarks.md, Systems): the header in the payload's message
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
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from ..errors import CommTimeout, Evicted
from . import CONTINUE, EVICT, HANDSHAKE, HEADER_BYTES, SERVER, Message, Outgoing, timeout_message

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


def connect(port: str, name: str) -> MPI.Intercomm:
    """A joining client's connection to rank 0 (which accepts it once it sees the request), and
    the request's name: what tells rank 0 who connected."""
    comm = MPI.COMM_SELF.Connect(port)
    comm.Send([pickle.dumps(name), MPI.BYTE], 0, HANDSHAKE)
    return comm


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
    """`Transport` over MPI.COMM_WORLD; FedAvg over a clients-only communicator. A client that
    joined a running job (`joined`) talks to rank 0 alone, over the intercommunicator of its
    connection, as the client id rank 0 gave it."""

    def __init__(self, timeout_s: float, metrics: Metrics, joined: tuple[MPI.Intercomm, int, int] | None = None):
        """`joined`: (intercommunicator to rank 0, this client's id, the job's size)."""
        self.comm = MPI.COMM_WORLD if joined is None else joined[0]
        self.rank = self.comm.Get_rank() if joined is None else joined[1]
        self.size = self.comm.Get_size() if joined is None else joined[2]
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._peers: dict[int, tuple[MPI.Comm, int]] = {}  # rank 0: joined clients, by id
        if joined is None:
            # ranks on this host by host name, not by shared memory: an elastic launch on one host
            # gives every rank its own hydra proxy (no shared memory), and they still share the cores
            hosts = self.comm.allgather(socket.gethostname())
            self.local_rank = hosts[: self.rank].count(hosts[self.rank])
            self.local_size = hosts.count(hosts[self.rank])
        else:
            self.local_rank, self.local_size = 0, 1
        self._clients: MPI.Comm | None = None
        self.pool = BufferPool()  # pinned once torch is loaded and sees a GPU (launch.py)
        self._status = MPI.Status()
        self._watching = False  # a client of an elastic run: rank 0 may evict it
        self._abandoned: list[Any] = []  # requests given up on and what they point into (never freed)

    # ------------------------------------------------------------ waiting

    def _poll(
        self,
        done: Callable[[], bool],
        op: str,
        pending: Callable[[], list[int]],
        what: str,
        timeout_s: float = 0,
        give_up_s: float = 0,
    ) -> bool:
        """Call `done()` until it is true: spinning for SPIN_S, then napping (a nap adds at most
        1/8 to a wait), up to comm.timeout_s (or `timeout_s` for a wait known to span several
        steps). `give_up_s` > 0: returns False at that deadline instead of raising."""
        start = time.perf_counter()
        if not done():
            patience = give_up_s or timeout_s or self.timeout_s
            deadline = start + patience
            while not done():
                waited = time.perf_counter() - start
                if waited < SPIN_S:
                    os.sched_yield()
                    continue
                if self._watching:
                    self._check_eviction()
                if start + waited > deadline:
                    if give_up_s:
                        return False
                    raise CommTimeout(timeout_message(self.rank, pending(), patience, self.timeout_s, what))
                time.sleep(min(waited * NAP_FRACTION, NAP_MAX_S))
        if self.metrics.timing:
            self.metrics.comm(op, time.perf_counter() - start)
        return True

    def _wait(
        self, requests: list[MPI.Request], op: str, what: str, peers: list[int], give_up_s: float = 0
    ) -> list[int]:
        """Until every request is done; returns the peers of the requests given up on (abandoned)."""

        def pending() -> list[int]:
            return [p for p, r in zip(peers, requests) if not r.Test()]

        if self._poll(lambda: MPI.Request.Testall(requests), op, pending, what, give_up_s=give_up_s):
            return []
        late = [(p, r) for p, r in zip(peers, requests) if not r.Test()]
        self._abandoned += [r for _, r in late]
        return sorted({p for p, _ in late})

    def barrier(self, what: str) -> None:
        self._wait([self.comm.Ibarrier()], "recv", what, [-1])

    # ------------------------------------------------------------ elastic runs

    def _at(self, peer: int) -> tuple[MPI.Comm, int]:
        """The communicator and rank that reach `peer` (a joined client: its intercommunicator)."""
        return self._peers.get(peer) or (self.comm, peer)

    def open_port(self) -> str:
        """Rank 0: the port a joining client connects to."""
        return MPI.Open_port()

    def accept(self, port: str, peer: int) -> None:
        """Rank 0: the connection of a client that asked to join (it is connecting now), as `peer`."""
        self._peers[peer] = (MPI.COMM_SELF.Accept(port), 0)
        self.size = max(self.size, peer + 1)

    def forget(self, peer: int, together: bool = False) -> None:
        """Rank 0: drop a connection just accepted: its other side went silent (freed here), or
        `together`: it disconnects too (MPI's Disconnect waits for both sides)."""
        comm, _ = self._peers.pop(peer)
        comm.Disconnect() if together else comm.Free()
        self.size = max([self.comm.Get_size(), *(p + 1 for p in self._peers)])

    def evict(self, rank: int, notice: str) -> None:
        data = pickle.dumps(notice)
        comm, r = self._at(rank)
        self._abandoned += [data, comm.Isend([data, MPI.BYTE], r, EVICT)]

    def watch_eviction(self) -> None:
        self._watching = True

    def _check_eviction(self) -> None:
        status = self._status
        if self.comm.Iprobe(SERVER, EVICT, status):
            buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
            self.comm.Recv([buf, MPI.BYTE], SERVER, EVICT)
            raise Evicted(pickle.loads(buf.tobytes()))

    # ------------------------------------------------------------ tensors

    def send_tensors(self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE) -> None:
        self.isend_tensors(phase, step, messages, flag)()

    def isend_tensors(
        self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE, give_up_s: float = 0
    ) -> Callable[[], list[int]]:
        requests: list[MPI.Request] = []
        peers: list[int] = []
        keep: list[Any] = []  # what the payloads point into must outlive the requests
        for dest, tensors in messages.items():
            for i, (tensor, kind) in enumerate(tensors):
                payload, owner = self._payload(("send", phase, dest, i), tensor)
                keep.append(owner)
                tag = phase + 2 * i
                comm, r = self._at(dest)
                requests.append(comm.Isend(payload, r, tag + _PAYLOAD))
                requests.append(comm.Isend(_header(step, tensor, flag), r, tag + _HEADER))
                peers += [dest, dest]
                self.metrics.sent(dest, "control", HEADER_BYTES)
                self.metrics.sent(dest, kind, tensor.nbytes)

        def wait() -> list[int]:
            late = self._wait(requests, "send", f"sending phase {phase} step {step}", peers, give_up_s)
            if late:
                self._abandoned.append(list(keep))
            keep.clear()
            return late

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

    def recv_tensors(
        self, sources: list[int], phase: int, kinds: list[str], give_up_s: float = 0
    ) -> dict[int, list[Message]]:
        """Headers into receives posted at once; each payload received as soon as a probe
        matches it, into a pooled buffer of its size."""
        keys = [(s, i) for s in sources for i in range(len(kinds))]
        headers = bytearray(len(keys) * HEADER_BYTES)
        view = memoryview(headers)
        routes = {s: self._at(s) for s in sources}
        header_reqs = [routes[s][0].Irecv([view[j * HEADER_BYTES : (j + 1) * HEADER_BYTES], MPI.BYTE], routes[s][1],
                                          phase + 2 * i + _HEADER) for j, (s, i) in enumerate(keys)]  # fmt: skip
        unmatched = dict(enumerate(keys))
        payload_reqs: list[MPI.Request] = []
        payload_keys: list[int] = []  # the key index of each payload request
        payloads: dict[int, np.ndarray] = {}
        status = self._status

        def done() -> bool:
            for j, (s, i) in list(unmatched.items()):
                comm, r = routes[s]
                message = comm.Improbe(r, phase + 2 * i + _PAYLOAD, status)
                if message is not None:
                    nbytes = status.Get_count(MPI.BYTE)
                    buf = self.pool.take((phase, s, i), nbytes)[:nbytes]
                    payload_reqs.append(message.Irecv([buf, MPI.BYTE]))
                    payload_keys.append(j)
                    payloads[j] = buf
                    del unmatched[j]
            return not unmatched and MPI.Request.Testall(payload_reqs) and MPI.Request.Testall(header_reqs)

        def pending() -> list[int]:
            headers_due = [s for (s, _), r in zip(keys, header_reqs) if not r.Test()]
            return [s for s, _ in unmatched.values()] + headers_due + [-1] * (not MPI.Request.Testall(payload_reqs))

        late: set[int] = set()
        if not self._poll(done, "recv", pending, f"receiving phase {phase}", give_up_s=give_up_s):
            late = self._give_up(keys, header_reqs, unmatched, payload_keys, payload_reqs, payloads)
        out: dict[int, list[Message]] = {s: [] for s in sources if s not in late}
        for j, (source, i) in enumerate(keys):
            if source in late:
                continue
            h = HEADER.unpack_from(headers, j * HEADER_BYTES)
            buf = payloads[j]
            self.metrics.received(source, "control", HEADER_BYTES)
            self.metrics.received(source, kinds[i], buf.nbytes)
            out[source].append(Message(h[0], _tensor(buf, h[1], h[3 : 3 + h[2]]), h[7]))
        return out

    def _give_up(
        self,
        keys: list[tuple[int, int]],
        header_reqs: list[MPI.Request],
        unmatched: dict[int, tuple[int, int]],
        payload_keys: list[int],
        payload_reqs: list[MPI.Request],
        payloads: dict[int, np.ndarray],
    ) -> set[int]:
        """The sources of recv_tensors not done by its deadline: their header receives cancelled,
        their matched payload receives abandoned with their buffers (never handed out again)."""
        late = {keys[j][0] for j in unmatched}
        late |= {keys[j][0] for j, r in zip(payload_keys, payload_reqs) if not r.Test()}
        late |= {s for (s, _), r in zip(keys, header_reqs) if not r.Test()}
        for (s, _), r in zip(keys, header_reqs):
            if s in late and r != MPI.REQUEST_NULL:
                r.Cancel()
                self._abandoned.append(r)
        for j, r in zip(payload_keys, payload_reqs):
            if keys[j][0] in late:
                self._abandoned += [r, payloads[j]]  # (the view keeps the pool from reusing its buffer)
        return late

    # ------------------------------------------------------------ control objects

    def send_object(self, dest: int, phase: int, obj: Any, kind: str = "control") -> int:
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        self.metrics.sent(dest, kind, data.nbytes)
        comm, r = self._at(dest)
        self._wait([comm.Isend([data, MPI.BYTE], r, phase)], "send", f"sending phase {phase}", [dest])
        return data.nbytes

    def recv_objects(
        self, sources: list[int], phase: int, kind: str = "control", give_up_s: float = 0
    ) -> dict[int, Any]:
        """A matched probe sizes each object's buffer; its receive is polled like the rest (a
        sender that dies mid-message leaves a receive that never ends, given up on with it)."""
        out: dict[int, Any] = {}
        receiving: dict[int, tuple[MPI.Request, np.ndarray]] = {}
        status = self._status

        def done() -> bool:
            for source in sources:
                if source not in out and source not in receiving:
                    comm, r = self._at(source)
                    message = comm.Improbe(r, phase, status)
                    if message is not None:
                        buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
                        receiving[source] = (message.Irecv([buf, MPI.BYTE]), buf)
            for source, (req, buf) in list(receiving.items()):
                if req.Test():
                    del receiving[source]
                    self.metrics.received(source, kind, buf.nbytes)
                    out[source] = pickle.loads(buf.tobytes())
            return len(out) == len(sources)

        pending = lambda: [s for s in sources if s not in out]  # noqa: E731
        if not self._poll(done, "recv", pending, f"receiving phase {phase}", give_up_s=give_up_s):
            self._abandoned += list(receiving.values())
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

    def allreduce_sum(self, buf: np.ndarray, world: bool = False, give_up_s: float = 0) -> np.ndarray | None:
        """One non-blocking Allreduce polled with a deadline."""
        comm, peer = (self.comm, "all") if world else (self._clients, "clients")
        assert comm is not None, "open_clients_group() first"
        out = np.empty_like(buf)
        req = comm.Iallreduce([buf, MPI.DOUBLE], [out, MPI.DOUBLE], MPI.SUM)
        self.metrics.sent(peer, "adapters", buf.nbytes)
        self.metrics.received(peer, "adapters", out.nbytes)
        if self._wait([req], "allreduce", f"averaging adapters (Allreduce over {peer})", [-1], give_up_s):
            self._abandoned += [buf, out]
            return None
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
