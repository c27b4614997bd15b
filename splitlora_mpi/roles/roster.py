"""Which clients take part: rank 0's roster, and the FedAvg sum that survives a client lost
in the middle of it (elastic runs, DESIGN §2 "No hang").

Under a plain launch the roster is fixed: no wait gives up (`give_up_s` 0), a silent client
raises CommTimeout and mpirun ends the job, as before. Under an elastic launch rank 0 gives
each client `elastic.client_timeout_s` per wait; a client that misses it is lost: recorded
(rank, step, reason), sent an eviction notice, and left out of every later wait.

FedAvg (elastic): MPICH here has no ULFM, and a communicator over the live ranks is built by
a collective with no deadline (a death meanwhile hangs it). So while every client is live
the clients' Allreduce runs as before (bit-identical to a plain run), bounded by
`client_timeout_s`, and each client reports to rank 0 whether it completed; rank 0 commits
the round only if every client did. Otherwise, and in every round after a loss, the sum goes
through rank 0: each live client sends its contribution, rank 0 adds them in rank order
(float64) and returns the sum, all point to point with deadlines.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..config import ElasticConfig
from ..errors import TooFewClients
from ..fsutil import say
from ..wire import AVERAGE, OUTCOME, ROUND, SERVER, Transport


class Roster:
    """Rank 0's live clients and the record of those lost."""

    def __init__(self, clients: list[int], transport: Transport, elastic: ElasticConfig | None = None):
        """`elastic`: None under a plain launch (a fixed roster)."""
        self.live = sorted(clients)
        self.lost: list[dict[str, Any]] = []  # summary.json clients_lost: {rank, step, reason}
        self.participants: list[list[int]] = []  # summary.json: [first step, last step, clients] runs
        self.joined: list[dict[str, int]] = []  # summary.json clients_joined: {rank, step}
        self.joining: list[int] = []  # joined, waiting for the end of the round to get the average
        self.admit: Callable[[int], dict[int, dict[str, Any]]] = lambda step: {}  # run/join.py, elastic runs
        self.on_admit: Callable[[int, dict[str, Any]], None] = lambda rank, hello: None  # the lead role's
        self.last_ids: list[int] = []  # the clients of the last step
        self.give_up_s = elastic.client_timeout_s if elastic else 0.0
        self.min_clients = elastic.min_clients if elastic else 1
        self.transport = transport
        self.processes: dict[int, tuple[str, int]] = {}  # rank -> (host, pid), for the reason of a loss
        if clients:
            transport.metrics.clients_live(len(self.live))

    @property
    def elastic(self) -> bool:
        return self.give_up_s > 0

    @property
    def relaying(self) -> bool:
        """Whether FedAvg goes through rank 0: the clients' Allreduce lacks a lost or joined client."""
        return bool(self.lost or self.joined)

    def begin(self, step: int) -> None:
        """Between steps: the clients that asked to join are connected and handshaken."""
        for rank, hello in self.admit(step).items():
            self.joined.append({"rank": rank, "step": step})
            self.joining.append(rank)
            self.processes[rank] = (hello["host"], hello["pid"])
            self.on_admit(rank, hello)
            self.transport.metrics.client_joined()

    def welcome(self, step: int, summed: np.ndarray | None, stopping: bool) -> None:
        """The end of a round: the clients that joined during it get its sum and are live from now on."""
        for rank in self.joining:
            self.transport.send_object(rank, ROUND, ("sum", (step, summed, stopping)), kind="adapters")
        self.live = sorted(self.live + self.joining)
        self.joining = []
        self.transport.metrics.clients_live(len(self.live))

    @property
    def below_min(self) -> bool:
        return len(self.live) < self.min_clients

    def meet(self, hellos: dict[int, dict[str, Any]]) -> None:
        self.processes = {r: (h["host"], h["pid"]) for r, h in hellos.items() if "host" in h}

    def state(self) -> dict[str, Any]:
        """What a resumed run's summary.json continues: the losses, joins and participants so far."""
        return {"lost": self.lost, "joined": self.joined, "participants": self.participants}

    def load_state(self, state: dict[str, Any] | None) -> None:
        if state:  # (a checkpoint from before elastic runs has none)
            self.lost, self.joined, self.participants = state["lost"], state["joined"], state["participants"]

    def took_part(self, step: int, clients: list[int]) -> None:
        """The clients whose rows a step trained on (summary.json counts, metrics.jsonl ids)."""
        self.last_ids = sorted(clients)
        last = self.participants[-1] if self.participants else None
        if last and last[2] == len(clients) and last[1] == step - 1:
            last[1] = step
        else:
            self.participants.append([step, step, len(clients)])

    def too_few(self, step: int) -> TooFewClients:
        return TooFewClients(
            f"rank 0: {len(self.live)} live client(s) after step {step}, fewer than elastic.min_clients="
            f"{self.min_clients}; a checkpoint of step {step} was written"
        )

    def keep(self, sources: list[int], got: dict[int, Any], step: int) -> dict[int, Any]:
        """`got` (what arrived from `sources`), after losing the sources that sent nothing."""
        self.lose([s for s in sources if s not in got], step)
        return got

    def lose(self, ranks: list[int], step: int) -> None:
        """Drop these clients: recorded, told (if they can still hear it), never waited for again."""
        for rank in sorted(set(ranks) & set(self.live)):
            reason = self._reason(rank)
            self.live.remove(rank)
            self.lost.append({"rank": rank, "step": step, "reason": reason})
            self.transport.evict(rank, f"rank 0 dropped this client at step {step} ({reason}: silent for "
                                       f"{self.give_up_s:g} s, elastic.client_timeout_s)")  # fmt: skip
            self.transport.metrics.client_lost(reason)
            say(f"server: client {rank} lost at step {step} ({reason}); going on with {len(self.live)} "
                f"client{'s' * (len(self.live) != 1)}")  # fmt: skip
        self.transport.metrics.clients_live(len(self.live))

    def _reason(self, rank: int) -> str:
        """killed / stopped when the client's process is on this host and says so; else timeout
        (a silent peer elsewhere: dead, frozen or cut off look alike from here)."""
        host, pid = self.processes.get(rank, ("", 0))
        if host != socket.gethostname() or not pid:
            return "timeout"
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return "killed"
        return {"T": "stopped", "t": "stopped", "Z": "killed", "X": "killed"}.get(state, "timeout")


class ClientSum:
    """A client's FedAvg sum (elastic runs): the Allreduce confirmed by rank 0, or the relay."""

    def __init__(self, transport: Transport, give_up_s: float, world: bool = False, relay: bool = False):
        self.transport = transport
        self.give_up_s = give_up_s
        self.world = world  # rank 0 adds its own buffer too (fedlora)
        self.relay = relay  # from the start (partial participation), or once a client was lost

    def __call__(self, buf: np.ndarray) -> np.ndarray:
        t = self.transport
        summed = None if self.relay else t.allreduce_sum(buf, world=self.world, give_up_s=self.give_up_s)
        t.send_object(SERVER, OUTCOME, summed is not None)
        if t.recv_objects([SERVER], OUTCOME)[SERVER] == "commit":
            assert summed is not None
            return summed
        self.relay = True
        t.send_tensors(AVERAGE, 0, {SERVER: [(torch.from_numpy(buf), "adapters")]})
        return t.recv_tensors([SERVER], AVERAGE, ["adapters"])[SERVER][0].tensor.numpy()


class ServerSum:
    """Rank 0's part in a FedAvg round of an elastic run (see the module docstring)."""

    def __init__(self, roster: Roster, transport: Transport, world: bool = False, relay: bool = False):
        self.roster = roster
        self.transport = transport
        self.world = world  # rank 0's buffer is one of the Allreduce's (fedlora)
        self.relay = relay  # every round through rank 0 (partial participation: no Allreduce of all)

    def __call__(self, step: int, members: list[int], own: np.ndarray | None = None) -> np.ndarray | None:
        """The sum over `members` (the live clients that trained this round); None when rank 0 is
        not in it and nothing passed through it."""
        r, t = self.roster, self.transport
        summed = None
        if self.world and not (r.lost or self.relay):  # (after a join the clients still try theirs once)
            summed = t.allreduce_sum(own, world=True, give_up_s=r.give_up_s)
        outcomes = r.keep(members, t.recv_objects(members, OUTCOME, give_up_s=2 * r.give_up_s), step)
        commit = not (r.relaying or self.relay) and all(outcomes.values()) and (summed is not None or not self.world)
        members = [c for c in members if c in r.live]
        for c in members:
            t.send_object(c, OUTCOME, "commit" if commit else "relay")
        if commit:
            return summed
        self.relay = True  # (as the clients are now)
        asked = members
        got = r.keep(asked, t.recv_tensors(asked, AVERAGE, ["adapters"], give_up_s=r.give_up_s), step)
        total = np.array(own if own is not None else 0.0, dtype=np.float64)
        for c in sorted(got):
            total = total + got[c][0].tensor.numpy()
        if got:
            back = {c: [(torch.from_numpy(total), "adapters")] for c in sorted(got)}
            r.lose(t.isend_tensors(AVERAGE, step, back, give_up_s=r.give_up_s)(), step)
        return total if got or own is not None else None
