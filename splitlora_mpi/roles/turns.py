"""Vanilla split learning (`sl`): clients take turns of `train.aggregate_every` steps; at the
end of its turn a client hands the client model's state (adapter, optimizer, schedule, RNG)
to the next, so one client model travels over all the data. The server is the split
server with one active client per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..data import shard
from ..errors import ConfigError, Diverged, Stopped
from ..training import is_checkpoint_step, is_eval_step, sl_owner, sl_steps_owned
from ..wire import HANDOFF, SERVER
from .client import Client
from .server import Server


class TurnServer(Server):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.handoff_bytes = 0  # client-to-client handoffs, as their senders report them
        self.last_active: list[int] | None = None

    def active(self, step: int) -> list[int]:
        return [self.clients[sl_owner(step, self.cfg.train, len(self.clients))]]

    def evaluators(self, step: int) -> list[int]:
        return self.active(step)  # (the client model is where the turn is)

    def train_step(self, step: int, stop_requested: bool = False) -> tuple[float, int, bool]:
        active = self.active(step)
        if self.last_active not in (None, active):  # a turn ended: its client reports the handoff's size
            previous = self.last_active[0]
            self.handoff_bytes += self.channel.transport.recv_objects([previous], HANDOFF)[previous]
        self.last_active = active
        return super().train_step(step, stop_requested)

    def client_peer_bytes(self, step: int) -> int:
        return self.handoff_bytes

    def state(self) -> dict[str, Any]:
        return {**super().state(), "handoff_bytes": self.handoff_bytes}

    def load_state(self, state: dict[str, Any]) -> None:
        if "carried" in state:  # (roles/relay.py)
            raise ConfigError("config key 'checkpoint.resume': this sl checkpoint was written by an elastic launch "
                              "(rank 0 holds the client model); expected python -m splitlora_mpi.elastic to resume it "
                              "(or checkpoint.resume: never)")  # fmt: skip
        super().load_state(state)
        self.handoff_bytes = state["handoff_bytes"]


class TurnClient(Client):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.val_rows = shard(len(self.val), 1, 0)  # the one active client scores every row
        self.other_clients = [c + 1 for c in range(self.num_clients) if c != self.index]  # ranks

    def adopt(self, saved: dict[str, Any], step: int) -> None:
        """The client whose turn comes next takes over the travelling state (RNG and counts too)."""
        self.load_state(saved["role"])
        self.metrics.load_state(saved["metrics"])
        torch.set_rng_state(saved["torch_rng"])

    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        """Train in this client's turns; in between, wait for the handoff of the client model
        (or the news that training ended: done, stopped or diverged)."""
        t, n = self.cfg.train, self.num_clients
        self.sampler.position = sl_steps_owned(start, self.index, t, n) * t.batch_size
        step = start
        while step < t.steps:
            if sl_owner(step + 1, t, n) != self.index:
                step = self._wait_for_turn(step)
                continue
            step += 1
            try:
                stopping = self.train_step(step, stop_requested())
            except Diverged:
                self._hand_off(step, "diverged")
                raise
            if is_eval_step(step, t):
                self.evaluate(step)
            if stopping or is_checkpoint_step(step, self.cfg.checkpoint.every):
                on_checkpoint(step)
            if stopping:
                self._hand_off(step, "stopped")
                raise Stopped(step)
            if step == t.steps:
                self._hand_off(step, "done")
            elif sl_owner(step + 1, t, n) != self.index:
                self._hand_off(step, None)

    def _hand_off(self, step: int, end: str | None) -> None:
        """End of a turn: the client model to the next client, or the end of training to all others.
        The server learns the size, so its per-step byte counts include the handoff."""
        if end is None:
            nxt = sl_owner(step + 1, self.cfg.train, self.num_clients) + 1
            state = {"trainer": self.trainer.state(), "torch_rng": torch.get_rng_state()}
            sent = self.transport.send_object(nxt, HANDOFF, {"step": step, "end": None, "state": state}, "adapters")
            self.transport.send_object(SERVER, HANDOFF, sent)
        else:
            for c in self.other_clients:
                self.transport.send_object(c, HANDOFF, {"step": step, "end": end, "state": None})

    def _wait_for_turn(self, step: int) -> int:
        """Block (with a deadline of comm.timeout_s per step waited) until the client model
        arrives; returns the step after which this client's turn starts."""
        t = self.cfg.train
        mine = (s for s in range(step + 1, t.steps + 1) if sl_owner(s, t, self.num_clients) == self.index)
        wait = next(mine, t.steps + 1) - step  # (no turn left: wait for the end of training)
        _, msg = self.transport.recv_any(self.other_clients, HANDOFF, self.transport.timeout_s * (wait + 1),
                                         lambda m: "adapters" if m["state"] else "control")  # fmt: skip
        if msg["end"] == "done":
            return t.steps
        if msg["end"] == "stopped":
            raise Stopped(msg["step"])
        if msg["end"] == "diverged":
            raise Diverged(msg["step"], float("nan"))
        self.trainer.load_state(msg["state"]["trainer"])
        torch.set_rng_state(msg["state"]["torch_rng"])
        return msg["step"]
