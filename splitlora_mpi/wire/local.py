"""The Transport between threads of one process: every rank of a job in one Python, for
in-process tests of the roles and for one-rank modes (central), which need no MPI.

Same contract as the MPI transport: per (source, tag) FIFO order, arrival-order receives,
bytes counted alike (a 64-byte header per tensor as `control`), deadlines that raise
`CommTimeout` naming the silent ranks. Sends are buffered copies (a sender may reuse its
tensors at once). When one rank fails, `LocalWorld.abort` wakes every waiting rank.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CommTimeout, Evicted, JobFailed
from ..metrics import Metrics
from . import CONTINUE, EVICT, HEADER_BYTES, SERVER, Message, Outgoing, Transport, timeout_message


class Vanish(BaseException):
    """Raised in a rank's thread to make it disappear as a killed process would: it stops
    answering and the world is not aborted (in-process tests of elastic runs)."""


class LocalWorld:
    """Mailboxes and collectives shared by the ranks of one in-process job."""

    def __init__(self, size: int):
        self.size = size
        self.cond = threading.Condition()
        self.boxes: dict[tuple[int, int, int], deque[Any]] = defaultdict(deque)  # (source, dest, tag)
        self.parts: dict[tuple[str, int], dict[int, np.ndarray]] = defaultdict(dict)  # collective -> contributions
        self.taken: dict[tuple[str, int], int] = defaultdict(int)
        self.failure: str | None = None

    def transport(self, rank: int, timeout_s: float, metrics: Metrics) -> LocalTransport:
        return LocalTransport(self, rank, timeout_s, metrics)

    def abort(self, reason: str) -> None:
        with self.cond:
            self.failure = self.failure or reason
            self.cond.notify_all()

    def run(self, target: Callable[[Transport], None], timeout_s: float, metrics: Callable[[int], Metrics]) -> None:
        """`target(transport)` for every rank, each in its own thread; the first error (the cause,
        not the aborts it triggers on the other ranks) is raised once all have ended."""
        errors: list[BaseException] = []

        def rank_main(rank: int) -> None:
            try:
                target(self.transport(rank, timeout_s, metrics(rank)))
            except (Vanish, Evicted):  # gone, as a killed or evicted process: the others go on
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                with self.cond:
                    errors.append(e)
                self.abort(f"rank {rank} failed: {e}")

        threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank-{r}") for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]


class LocalTransport:
    """`Transport` for one rank of a `LocalWorld`."""

    def __init__(self, world: LocalWorld, rank: int, timeout_s: float, metrics: Metrics):
        self.world = world
        self.rank, self.size = rank, world.size
        self.local_rank, self.local_size = rank, world.size
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._rounds: dict[str, int] = defaultdict(int)  # collectives joined, per group
        self._watching = False

    # ------------------------------------------------------------ waiting

    def _wait(
        self, ready: Callable[[], bool], pending: Callable[[], list[int]], what: str, op: str = "recv",
        timeout_s: float = 0, give_up_s: float = 0,
    ) -> bool:  # fmt: skip
        """Until `ready()` (called under the world's lock), a failure elsewhere, or the deadline
        (`give_up_s` > 0: returns False then instead of raising)."""
        start = time.perf_counter()
        timeout_s = give_up_s or timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        cond = self.world.cond
        with cond:
            while not ready():
                if self.world.failure:
                    raise JobFailed(f"rank {self.rank}: stopped while {what}: {self.world.failure}")
                if self._watching and self._has(SERVER, EVICT):
                    raise Evicted(pickle.loads(self.world.boxes[(SERVER, self.rank, EVICT)].popleft()))
                left = deadline - time.monotonic()
                if left <= 0:
                    if give_up_s:
                        return False
                    raise CommTimeout(timeout_message(self.rank, pending(), timeout_s, self.timeout_s, what))
                cond.wait(left)
        if self.metrics.timing:
            self.metrics.comm(op, time.perf_counter() - start)
        return True

    def evict(self, rank: int, notice: str) -> None:
        self._post(rank, EVICT, pickle.dumps(notice))

    def watch_eviction(self) -> None:
        self._watching = True

    def _post(self, dest: int, tag: int, item: Any) -> None:
        with self.world.cond:
            self.world.boxes[(self.rank, dest, tag)].append(item)
            self.world.cond.notify_all()

    def _has(self, source: int, tag: int) -> bool:
        return bool(self.world.boxes.get((source, self.rank, tag)))

    def _take(self, source: int, tag: int) -> Any:
        with self.world.cond:
            return self.world.boxes[(source, self.rank, tag)].popleft()

    # ------------------------------------------------------------ tensors

    def send_tensors(self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE) -> None:
        for dest, tensors in messages.items():
            for i, (tensor, kind) in enumerate(tensors):
                copy = tensor.detach().to("cpu", copy=True).contiguous()
                self.metrics.sent(dest, "control", HEADER_BYTES)
                self.metrics.sent(dest, kind, copy.numel() * copy.element_size())
                self._post(dest, phase + 2 * i, Message(step, copy, flag))

    def isend_tensors(
        self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE, give_up_s: float = 0
    ) -> Callable[[], list[int]]:
        self.send_tensors(phase, step, messages, flag)  # buffered: complete at once
        return lambda: []

    def recv_tensors(
        self, sources: list[int], phase: int, kinds: list[str], give_up_s: float = 0
    ) -> dict[int, list[Message]]:
        keys = [(s, phase + 2 * i) for s in sources for i in range(len(kinds))]
        self._wait(lambda: all(self._has(*k) for k in keys), lambda: [s for s, t in keys if not self._has(s, t)],
                   f"receiving phase {phase}", give_up_s=give_up_s)  # fmt: skip
        with self.world.cond:  # (given up: the sources with every tensor here)
            sources = [s for s in sources if all(self._has(s, phase + 2 * i) for i in range(len(kinds)))]
        out: dict[int, list[Message]] = {s: [] for s in sources}
        for s in sources:
            for i, kind in enumerate(kinds):
                msg = self._take(s, phase + 2 * i)
                self.metrics.received(s, "control", HEADER_BYTES)
                self.metrics.received(s, kind, msg.tensor.numel() * msg.tensor.element_size())
                out[s].append(msg)
        return out

    # ------------------------------------------------------------ control objects

    def send_object(self, dest: int, phase: int, obj: Any, kind: str = "control") -> int:
        data = pickle.dumps(obj)
        self.metrics.sent(dest, kind, len(data))
        self._post(dest, phase, data)
        return len(data)

    def recv_objects(
        self, sources: list[int], phase: int, kind: str = "control", give_up_s: float = 0
    ) -> dict[int, Any]:
        self._wait(lambda: all(self._has(s, phase) for s in sources),
                   lambda: [s for s in sources if not self._has(s, phase)], f"receiving phase {phase}",
                   give_up_s=give_up_s)  # fmt: skip
        out = {}
        for s in [s for s in sources if self._has(s, phase)]:
            data = self._take(s, phase)
            self.metrics.received(s, kind, len(data))
            out[s] = pickle.loads(data)
        return out

    def recv_any(
        self, sources: list[int], phase: int, timeout_s: float, kind_of: Callable[[Any], str]
    ) -> tuple[int, Any]:
        self._wait(lambda: any(self._has(s, phase) for s in sources), lambda: sources,
                   f"waiting for its turn (phase {phase})", timeout_s=timeout_s)  # fmt: skip
        source = next(s for s in sources if self._has(s, phase))
        data = self._take(source, phase)
        obj = pickle.loads(data)
        self.metrics.received(source, kind_of(obj), len(data))
        return source, obj

    # ------------------------------------------------------------ collectives

    def _reduce(
        self, group: str, members: list[int], buf: np.ndarray, what: str, op: str, give_up_s: float = 0
    ) -> np.ndarray | None:
        """Sum of every member's `buf`, added in rank order (the same result on every member)."""
        key = (group, self._rounds[group])
        self._rounds[group] += 1
        world = self.world
        with world.cond:
            world.parts[key][self.rank] = np.array(buf, dtype=np.float64, copy=True)
            world.cond.notify_all()
        if not self._wait(lambda: len(world.parts[key]) == len(members),
                          lambda: [m for m in members if m not in world.parts[key]], what, op,
                          give_up_s=give_up_s):  # fmt: skip
            return None
        with world.cond:
            parts = world.parts[key]
            out = np.array(parts[members[0]], copy=True)
            for m in members[1:]:
                out += parts[m]
            world.taken[key] += 1
            if world.taken[key] == len(members):
                del world.parts[key], world.taken[key]
        return out

    def barrier(self, what: str) -> None:
        self._reduce("barrier", list(range(self.size)), np.zeros(0), what, "recv")

    def open_clients_group(self) -> None:
        self.barrier("forming the clients' communicator")

    def allreduce_sum(self, buf: np.ndarray, world: bool = False, give_up_s: float = 0) -> np.ndarray | None:
        group, members = ("all", list(range(self.size))) if world else ("clients", list(range(1, self.size)))
        assert world or self.rank != SERVER, "the server is not in the clients' group"
        self.metrics.sent(group, "adapters", buf.nbytes)
        self.metrics.received(group, "adapters", buf.nbytes)
        what = f"averaging adapters (Allreduce over {group})"
        return self._reduce(group, members, buf, what, "allreduce", give_up_s)
