"""The wire between ranks: one `Transport` interface, two implementations (`mpi`: the real job,
`local`: threads in one process, for tests and one-rank runs) and named message records
(`messages`) that the roles speak instead of positional tensor lists.

A tensor message is (step, flag, tensor); its 64-byte header is counted as `control`, the
tensor's bytes as the kind its sender names. Every phase has its own tags, so a fast
client's next message can never match a receive meant for another phase. Every wait has a
deadline (`comm.timeout_s`) and raises `CommTimeout` naming the ranks that did not answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # (importable before torch: a rank checks its input first)
    import numpy as np
    import torch

    from ..metrics import Metrics

SERVER = 0
HEADER_BYTES = 64  # 8 x int64: step, dtype, ndim, 4 dims, flag

# the flag of a tensor message: on an upload, the client asks to stop (it got SIGTERM/SIGINT);
# on a gradient reply, what every client does after this step
CONTINUE, DIVERGED, STOP = 0, 1, 2
RELAY = 4  # a bit on a gradient reply (elastic runs): a client was lost or joined, FedAvg goes through rank 0

# phase tags: a message's tag is phase + 2 x (index of the tensor in the message) + header/payload;
# TAIL / EVAL_TAIL: label privacy, the server's output to the client's tail and what comes back
TRAIN, TAIL, EVAL, EVAL_TAIL = 100, 150, 200, 250
HANDSHAKE, EXPORT, STATS, CHECKPOINT, HANDOFF = 400, 410, 420, 430, 440
PREFLIGHT = 405  # every rank's input checks, before its heavy imports (run/preflight.py)
# elastic runs: FedAvg through rank 0 (tensors), each round's outcome and verdict (objects), rank 0's
# eviction notice, the end of the job
AVERAGE, OUTCOME, EVICT, FINISH = 450, 455, 460, 470
ROUND = 480  # rank 0 to a client: whether it trains this round, and (idle, joining) the round's end

Outgoing = dict[int, list[tuple["torch.Tensor", str]]]  # destination -> [(tensor, byte kind)]


@dataclass
class Message:
    step: int
    tensor: torch.Tensor
    flag: int = CONTINUE


class Transport(Protocol):
    """Counted, deadline-bounded point-to-point messages, pickled control objects and the
    Allreduce of FedAvg. Rank 0 is the server, ranks 1..size-1 the clients."""

    rank: int
    size: int
    local_rank: int  # among the ranks of this host
    local_size: int
    timeout_s: float
    metrics: Metrics

    def send_tensors(self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE) -> None:
        """Send each destination its tensors; return once all are sent."""

    def isend_tensors(
        self, phase: int, step: int, messages: Outgoing, flag: int = CONTINUE, give_up_s: float = 0
    ) -> Callable[[], list[int]]:
        """Start sending; returns the wait for completion (the caller computes meanwhile). The
        wait returns the destinations given up on (`give_up_s` > 0: not done within it)."""

    def recv_tensors(
        self, sources: list[int], phase: int, kinds: list[str], give_up_s: float = 0
    ) -> dict[int, list[Message]]:
        """len(kinds) tensors from each source, in whatever order the sources send; host tensors.
        `give_up_s` > 0: a source not done within it is left out of the result (its receives
        cancelled) instead of raising CommTimeout."""

    def send_object(self, dest: int, phase: int, obj: Any, kind: str = "control") -> int:
        """Pickle and send one object; returns its size in bytes."""

    def recv_objects(
        self, sources: list[int], phase: int, kind: str = "control", give_up_s: float = 0
    ) -> dict[int, Any]:
        """One pickled object from each source (`give_up_s` as in recv_tensors)."""

    def recv_any(
        self, sources: list[int], phase: int, timeout_s: float, kind_of: Callable[[Any], str]
    ) -> tuple[int, Any]:
        """The first object any of `sources` sends; `kind_of(obj)` names the byte kind it counts as."""

    def barrier(self, what: str) -> None:
        """Every rank arrives (within the deadline) before any leaves."""

    def open_clients_group(self) -> None:
        """Collective over all ranks: the clients-only group used by `allreduce_sum`."""

    def allreduce_sum(self, buf: np.ndarray, world: bool = False, give_up_s: float = 0) -> np.ndarray | None:
        """float64 sum of `buf` over the clients, or over every rank with `world` (None: not
        done within `give_up_s` > 0; the collective is abandoned)."""

    def evict(self, rank: int, notice: str) -> None:
        """Elastic runs, rank 0: tell a dropped client it is out (never waited for: it may be dead)."""

    def watch_eviction(self) -> None:
        """Elastic runs, a client: every wait that lasts raises Evicted once rank 0's notice is here."""


def timeout_message(rank: int, pending: list[int], timeout_s: float, configured: float, what: str) -> str:
    return (
        f"rank {rank}: no answer from rank(s) {sorted(set(pending))} within {timeout_s:g} s "
        f"(comm.timeout_s={configured:g}) while {what}"
    )
