"""The FedLoRA baseline: every client trains the whole model with LoRA on its own data,
exactly as `central` does on all data (same two parts, trainers, sampler stream and loss);
every `train.aggregate_every` steps one Allreduce over all ranks averages the adapters
(FedAvg, token-weighted). Rank 0 trains nothing: it adds zeros to the same Allreduce,
which hands it the average and the round's losses at once; it evaluates and logs.

The Allreduce buffer (float64): [w * adapter ..., w, stop, (loss sum, targets, tokens) per
step of the round]. A non-finite loss sum reaches every rank in it (exit 2 after the
round); a signal on any rank stops every rank after the round. Under an elastic launch the
sum survives a lost client (roles/roster.py): the round's losses are then the live clients'.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import aggregate
from ..config import ElasticConfig, JobConfig
from ..data import EncodedData
from ..errors import Diverged, Stopped
from ..model import SplitPart, joined_adapter_state, load_joined_adapter_state
from ..training import (
    OnStep,
    PartTrainer,
    checkpoint_or_stop,
    evaluate_whole,
    is_aggregation_step,
    is_eval_step,
)
from ..wire import Transport
from .participation import AllTrain, ClientTurns, Sampled
from .roster import ClientSum, Roster, ServerSum
from .whole import WholeModel

PER_STEP = 3  # loss sum, target tokens, tokens


def round_steps(after: int, cfg: JobConfig) -> list[int]:
    """The steps of the round that starts after step `after`."""
    steps = []
    for step in range(after + 1, cfg.train.steps + 1):
        steps.append(step)
        if is_aggregation_step(step, cfg.train):
            break
    return steps


class _Round:
    """Reads what the Allreduce summed (the same layout on every rank)."""

    def __init__(self, summed: np.ndarray, numel: int, steps: list[int]):
        self.sum = summed
        self.numel = numel
        self.steps = steps

    def average(self, like: aggregate.State) -> aggregate.State:
        if self.sum[self.numel] == 0:  # (every client of the round was lost: the adapters stay)
            return like
        return aggregate.mean_from_sum(self.sum[: self.numel + 1], like)

    @property
    def stop(self) -> bool:
        return bool(self.sum[self.numel + 1] > 0)

    def per_step(self) -> list[tuple[int, float, int]]:
        """(step, mean loss over all clients' targets, tokens) for each step of the round."""
        out = []
        for i, step in enumerate(self.steps):
            loss_sum, targets, tokens = self.sum[self.numel + 2 + PER_STEP * i : self.numel + 2 + PER_STEP * (i + 1)]
            out.append((step, float(loss_sum / targets) if targets else float("nan"), int(tokens)))
        return out

    def check_finite(self) -> None:
        for i, (step, loss, _) in enumerate(self.per_step()):
            targets = self.sum[self.numel + 2 + PER_STEP * i + 1]
            if targets and not math.isfinite(loss):  # (no targets: nobody trained that step)
                raise Diverged(step, loss)


class FedClient:
    """One client: local steps on the whole model, then the round's Allreduce."""

    def __init__(self, local: WholeModel, transport: Transport, elastic: ElasticConfig | None = None):
        self.local = local
        self.parts = local.parts
        self.cfg = local.cfg
        self.transport = transport
        partial = 0 < self.cfg.train.clients_per_round < transport.size - 1
        give_up_s = elastic.client_timeout_s if elastic else 0.0
        world_sum = functools.partial(transport.allreduce_sum, world=True)
        self.sum = ClientSum(transport, give_up_s, world=True, relay=partial) if elastic or partial else world_sum
        self.turns = ClientTurns(transport, self.cfg) if partial else None
        self.tokens_since_average = 0
        self.eval_rows = 0  # (rank 0 evaluates the average)

    def accept(self, verdict: dict[str, Any]) -> None:
        """(Nothing to learn from rank 0.)"""

    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        step = start
        while step < self.cfg.train.steps:
            steps = round_steps(step, self.cfg)
            if self.turns and not self.turns.trains(steps[0]):  # an idle round: the others' average
                for trainer in (self.local.client, self.local.server):
                    trainer.schedule_to(steps[-1])
                state = self.local.adapter_state()
                numel = sum(t.numel() for t in state.values())
                result = _Round(self.turns.round_sum(steps[0], steps[-1]), numel, steps)
                step = self._end_round(result, state, on_checkpoint)
                continue
            records: list[float] = []
            diverged = False
            for step in steps:
                if diverged:  # nothing more this round; the others learn it from the Allreduce
                    records += [0.0, 0.0, 0.0]
                    continue
                start_time = time.perf_counter()
                try:
                    loss, tokens, targets = self.local.train_step(step)
                except Diverged:
                    diverged = True
                    records += [float("nan"), 1.0, 0.0]
                    continue
                self.tokens_since_average += tokens
                records += [loss * targets, float(targets), float(tokens)]
                self.transport.metrics.step(step, time.perf_counter() - start_time, tokens, loss)
            state = self.local.adapter_state()
            w = float(self.tokens_since_average) if self.cfg.train.fedavg_weights == "tokens" else 1.0
            buf = np.concatenate([aggregate.flatten(state) * w, [w, float(stop_requested())], records])
            step = self._end_round(_Round(self.sum(buf), buf.size - 2 - len(records), steps), state, on_checkpoint)

    def _end_round(self, result: _Round, state: aggregate.State, on_checkpoint: Callable[[int], None]) -> int:
        """The round's average in place, then a checkpoint when due or stopping; its last step."""
        result.check_finite()
        self.local.load_adapter_state(result.average(state))
        self.tokens_since_average = 0
        checkpoint_or_stop(result.steps[-1], self.cfg.checkpoint.every, result.stop, on_checkpoint)
        return result.steps[-1]

    @property
    def tokens(self) -> int:
        return self.local.tokens

    def state(self) -> dict[str, Any]:
        return {"local": self.local.state(), "tokens_since_average": self.tokens_since_average}

    def load_state(self, state: dict[str, Any]) -> None:
        self.local.load_state(state["local"])
        self.tokens_since_average = state["tokens_since_average"]

    def join(self, step: int, on_checkpoint: Callable[[int], None]) -> int:
        """Joined the running job during `step`: idle until that round's average, then in FedAvg
        through rank 0 (it is not in the others' Allreduce); the round's last step."""
        assert isinstance(self.sum, ClientSum)  # (a joiner runs elastic)
        self.sum.relay = True
        state = self.local.adapter_state()
        numel = sum(t.numel() for t in state.values())

        def schedule_to(last: int) -> None:
            for trainer in (self.local.client, self.local.server):
                trainer.schedule_to(last)

        def take_sum(summed: np.ndarray) -> None:
            self.local.load_adapter_state(_Round(summed, numel, []).average(state))

        def after_round(last: int, stopping: bool) -> None:
            checkpoint_or_stop(last, self.cfg.checkpoint.every, stopping, on_checkpoint)

        return ClientTurns(self.transport, self.cfg).sit_out(step, schedule_to, take_sum, after_round, on_checkpoint)

    def adopt(self, saved: dict[str, Any], step: int) -> None:
        """A client new to the checkpoint of `step` (a round's end: every adapter is the average):
        that adapter, a fresh optimizer and sampler, the schedule at `step`."""
        local = saved["role"]["local"]
        for trainer, name in ((self.local.client, "client"), (self.local.server, "server")):
            trainer.part.load_adapter_state(local[name]["adapter"])
            trainer.schedule_to(step)


class FedServer:
    """Rank 0: joins each round's Allreduce with zeros, logs its steps, evaluates the average."""

    def __init__(self, cfg: JobConfig, client_part: SplitPart, server_part: SplitPart, val: EncodedData,
                 transport: Transport, roster: Roster | None = None):  # fmt: skip
        self.cfg = cfg
        self.client_part, self.server_part = client_part, server_part
        self.parts = [client_part, server_part]
        self.schedule = PartTrainer(server_part, cfg.train)  # for the logged learning rate only
        self.val = val
        self.transport = transport
        self.tokens = 0
        self.num_clients = transport.size - 1
        self.roster = roster or Roster(list(range(1, transport.size)), transport)
        partial = 0 < cfg.train.clients_per_round < transport.size - 1
        self.participation = Sampled(self.roster, transport, cfg) if partial else AllTrain(self.roster)
        relayed = self.roster.elastic or partial
        self.relayed = ServerSum(self.roster, transport, world=True, relay=partial) if relayed else None

    def meet(self, hellos: dict[int, dict[str, Any]]) -> None:
        """(Every client trains the same whole model.)"""
        self.roster.meet(hellos)

    def adapter_state(self) -> aggregate.State:
        return joined_adapter_state(self.parts)

    def trainable_params(self) -> int:
        return 0  # rank 0 only averages and evaluates

    def client_peer_bytes(self, step: int) -> int:
        """Every rank's Allreduce buffer is the size of rank 0's."""
        return self.num_clients * self.transport.metrics.sent_bytes[("all", "adapters")]

    def run(self, on_step: OnStep, start: int, on_checkpoint: Callable[[int], None],
            stop_requested: Callable[[], bool]) -> None:  # fmt: skip
        step = start
        while step < self.cfg.train.steps:
            steps = round_steps(step, self.cfg)
            self.roster.begin(steps[0])  # (a client that joins now sits this round out)
            self.participation.begin(steps[0], resumed=steps[0] == start + 1 and start > 0)
            state = self.adapter_state()
            numel = sum(t.numel() for t in state.values())
            buf = np.zeros(numel + 2 + PER_STEP * len(steps))
            buf[numel + 1] = float(stop_requested() or self.roster.below_min)
            round_start = time.perf_counter()
            members = self.participation.members(steps[0])
            result = _Round(self.sum(steps[-1], members, buf, numel), numel, steps)
            seconds = (time.perf_counter() - round_start) / len(steps)  # the round, seen from rank 0
            if not self.roster.live:  # (nobody's adapter in the sum)
                self._too_few(steps[-1], on_checkpoint)
            result.check_finite()
            load_joined_adapter_state(self.parts, result.average(state))
            for s in steps:
                self.roster.took_part(s, members)
            for step, loss, tokens in result.per_step():
                self.tokens += tokens
                self.transport.metrics.step(step, seconds, tokens, loss)
                val = None
                if is_eval_step(step, self.cfg.train):
                    val = evaluate_whole(self.client_part, self.server_part, self.val, self.cfg.train.batch_size)
                    self.transport.metrics.val_loss(val)
                on_step(step, loss, tokens, self.schedule.lr_at(step), val)
            if result.stop and self.roster.below_min:
                self._too_few(step, on_checkpoint)
            checkpoint_or_stop(step, self.cfg.checkpoint.every, result.stop, on_checkpoint)

    def sum(self, step: int, members: list[int], buf: np.ndarray, numel: int) -> np.ndarray:
        """The round's sum: the Allreduce of every rank, or (elastic, partial) through rank 0,
        handed to the clients that sat the round out too."""
        if self.relayed is None:
            return self.transport.allreduce_sum(buf, world=True)
        summed = self.relayed(step, members, buf)
        assert summed is not None  # (rank 0's own buffer is in it)
        self.participation.share(step, summed, bool(summed[numel + 1] > 0))
        self.roster.welcome(step, summed, bool(summed[numel + 1] > 0))
        return summed

    def _too_few(self, step: int, on_checkpoint: Callable[[int], None]) -> None:
        try:
            checkpoint_or_stop(step, 0, True, on_checkpoint)
        except Stopped:
            raise self.roster.too_few(step) from None

    def state(self) -> dict[str, Any]:
        return {"adapter": {k: v.detach().cpu().clone() for k, v in self.adapter_state().items()},
                "tokens": self.tokens}  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        load_joined_adapter_state(self.parts, state["adapter"])
        self.tokens = state["tokens"]
