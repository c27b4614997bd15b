"""`sl` under an elastic launch: the travelling client model goes through rank 0.

A plain sl run hands the client model (adapter, optimizer, schedule, RNG) from client to
client directly (roles/turns.py). Elastic, rank 0 keeps the latest copy, so a lost client
loses nothing but its own half-done turn:

- every turn starts with rank 0's handoff to the next live client after the previous owner
  (rank order, round and round: with no loss, sl's static schedule), carrying the last copy;
- the owner sends the client model back to rank 0 at the end of its turn, at a checkpoint step
  and when the job stops (after the step's evaluation, as a plain owner hands it off);
- an owner lost in its turn (no upload, reply or state within elastic.client_timeout_s): the
  step counter goes on, and the next live client takes the step it was lost in and the rest
  of the turn, starting from rank 0's copy (its schedule moved to the step). The lost client's
  updates of the client model since that copy are lost; the server part keeps its own updates
  of those steps (as splitlora's half-done step does). A client lost while waiting is found
  when its turn comes (the handoff or its first upload goes unanswered) or at the end;
- checkpoints and the exported adapter take the client model from rank 0's copy (no client
  file); at the end rank 0 tells every live client that training is over.

Every handoff is a pickled object sent as an int8 tensor, so that rank 0's send to a client
that may be dead has the same deadline as its other sends.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CommTimeout, ConfigError, Diverged, Stopped, TooFewClients
from ..training import is_aggregation_step, is_checkpoint_step, is_eval_step
from ..wire import HANDOFF, SERVER
from .server import Server
from .turns import TurnClient

Carried = dict[str, Any]  # {"step": the step it was taken after, "state": {"trainer": ..., "torch_rng": ...}}


def pack(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.int8)


def unpack(tensor: torch.Tensor) -> Any:
    return pickle.loads(tensor.numpy().tobytes())


def syncs(step: int, server_stops: bool, cfg: Any) -> bool:
    """Whether the owner sends the client model to rank 0 after `step`: its turn ends, a
    checkpoint is due or the job stops (`cfg`: the JobConfig)."""
    return is_aggregation_step(step, cfg.train) or is_checkpoint_step(step, cfg.checkpoint.every) or server_stops


class RelayServer(Server):
    """Rank 0 of an elastic sl run (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.aggregate = lambda step, stopping: None  # (no FedAvg: the model travels)
        self.exchange = self._turn
        self.owner: int | None = None  # whose turn it is (or was last)
        self.carried: Carried | None = None  # rank 0's copy of the client model (None: the initial one)
        self.batches = dict.fromkeys(self.clients, 0)  # batches each client trained (its sampler position)
        self.first = 1  # the first step of this process (a handoff starts it, turn or not)

    def run(self, on_step: Any, start: int, on_checkpoint: Callable[[int], None],
            stop_requested: Callable[[], bool]) -> None:  # fmt: skip
        """The step loop; then every live client that is not the owner learns how training ended
        (the owner learns a stop or a divergence from its reply)."""
        self.first = start + 1
        try:
            super().run(on_step, start, on_checkpoint, stop_requested)
        except Diverged:
            self._tell_end("diverged")
            raise
        except (Stopped, TooFewClients):
            self._tell_end("stopped")
            raise
        self._tell_end("done")

    def active(self, step: int) -> list[int]:
        return [self.owner] if self.owner in self.roster.live else []

    def evaluators(self, step: int) -> list[int]:
        return self.active(step)  # (the client model is where the turn is)

    def _turn(self, step: int, active: list[int], stopping: bool) -> tuple[float, dict, bool]:
        """The step over the owner's batch; an owner lost before its upload arrived passes the
        step to the next live client (from rank 0's copy), until one answers or too few are left."""
        starts = step == self.first or is_aggregation_step(step - 1, self.cfg.train)  # (a turn or this process)
        while True:
            if starts or self.owner not in self.roster.live:
                self._hand_over(step)
                starts = False
            if self.owner not in self.roster.live:
                return float("nan"), {}, True  # (nobody left)
            loss, masks, stop = self._whole_batch(step, [self.owner], stopping)
            if masks:
                self.batches[self.owner] += 1
                return loss, masks, stop
            if self.roster.below_min:
                return loss, masks, True

    def _hand_over(self, step: int) -> None:
        """Rank 0's copy to the client whose turn starts at `step`: the owner again when a
        process (re)starts mid-turn, else the next live client after it."""
        r = self.roster
        while r.live:
            live, turn_starts = r.live, is_aggregation_step(step - 1, self.cfg.train)
            if self.owner in live and not turn_starts:
                nxt = self.owner
            else:
                nxt = next((c for c in live if c > (self.owner or 0)), live[0])
            handoff = {"step": step - 1, "end": None, "carried": self.carried, "batches": self.batches[nxt],
                       "tokens": self.tokens_since_average[nxt]}  # fmt: skip
            self.owner = nxt
            late = self.channel.transport.isend_tensors(HANDOFF, step, {nxt: [(pack(handoff), "adapters")]},
                                                        give_up_s=r.give_up_s)()  # fmt: skip
            if not late:
                return
            r.lose(late, step)

    def end_step(self, step: int, stopping: bool) -> None:
        """The owner's client model back to rank 0, when it sends it (see `syncs`)."""
        owner, r = self.owner, self.roster
        if owner not in r.live or not syncs(step, stopping, self.cfg):
            return
        got = r.keep([owner], self.channel.transport.recv_tensors([owner], HANDOFF, ["adapters"], r.give_up_s), step)
        if got:
            self.carried = {"step": step, "state": unpack(got[owner][0].tensor)}

    def _tell_end(self, end: str) -> None:
        """How training ended, to the clients waiting for a turn (with the tokens each trained: a
        client resumed after its last turn learns them here)."""
        r = self.roster
        words = {c: [(pack({"end": end, "tokens": self.tokens_since_average[c]}), "control")]
                 for c in r.live if c != self.owner}  # fmt: skip
        r.lose(self.channel.transport.isend_tensors(HANDOFF, 0, words, give_up_s=r.give_up_s)(), self.cfg.train.steps)

    def client_peer_bytes(self, step: int) -> int:
        return 0  # (every handoff passes through rank 0, which counts it)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The exported adapter: rank 0's copy of the client model and the server part."""
        if self.carried is None:
            raise RuntimeError("rank 0: no client ever handed the client model back; nothing to export")
        return {**self.carried["state"]["trainer"]["adapter"], **self.part.adapter_state()}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "carried": self.carried, "owner": self.owner, "batches": self.batches}

    def load_state(self, state: dict[str, Any]) -> None:
        if "carried" not in state:
            raise ConfigError("config key 'checkpoint.resume': this sl checkpoint was written by a plain launch (the "
                              "client model is in its owner's file); expected a plain launch to resume it (or "
                              "checkpoint.resume: never)")  # fmt: skip
        super().load_state(state)
        self.carried, self.owner = state["carried"], state["owner"]
        self.batches = {c: state["batches"].get(c, 0) for c in self.clients}


class RelayClient(TurnClient):
    """A client of an elastic sl run: it trains the turns rank 0 hands it."""

    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        """Wait for rank 0's word; train the turn it hands over; until rank 0 says training ended."""
        step, first = start, True
        while step < self.cfg.train.steps:
            word = self._word(step)
            if first:  # (the same number a client keeps itself: it matters after a resume)
                self.tokens = word["tokens"]
            if word["end"] == "done":
                return
            if word["end"] == "stopped":
                raise Stopped(step)
            if word["end"] == "diverged":
                raise Diverged(step, float("nan"))
            self._take_over(word, first)
            first = False
            step = self._turn(word["step"], stop_requested)

    def _take_over(self, word: dict[str, Any], first: bool) -> None:
        """Rank 0's copy of the client model (None: nobody handed it back yet, this client's own
        initial one), the schedule at the step; where this client's data stands, after a (re)start."""
        carried = word["carried"]
        if carried is not None:
            self.trainer.load_state(carried["state"]["trainer"])
            torch.set_rng_state(carried["state"]["torch_rng"])
        self.trainer.schedule_to(word["step"])
        if first:  # (the same number a client keeps itself: it matters after a resume)
            self.sampler.position = word["batches"] * self.cfg.train.batch_size

    def _turn(self, after: int, stop_requested: Callable[[], bool]) -> int:
        """Steps after+1 .. the end of the turn; the client model back to rank 0 when due."""
        step = after
        while True:
            step += 1
            stopping = self.train_step(step, stop_requested())
            if is_eval_step(step, self.cfg.train):
                self.evaluate(step)
            if syncs(step, stopping, self.cfg):
                state = {"trainer": self.trainer.state(), "torch_rng": torch.get_rng_state()}
                self.transport.send_tensors(HANDOFF, step, {SERVER: [(pack(state), "adapters")]})
            if stopping:
                raise Stopped(step)
            if is_aggregation_step(step, self.cfg.train):
                return step

    def _word(self, step: int) -> dict[str, Any]:
        """Rank 0's next handoff or end, waiting up to comm.timeout_s per step left (+1)."""
        t = self.transport
        got = t.recv_tensors([SERVER], HANDOFF, ["adapters"], give_up_s=t.timeout_s * (self.cfg.train.steps - step + 1))
        if not got:
            raise CommTimeout(f"rank {t.rank}: no word from rank 0 on the client model after step {step} "
                              f"(comm.timeout_s={t.timeout_s:g} per step)")  # fmt: skip
        return unpack(got[SERVER][0].tensor)
