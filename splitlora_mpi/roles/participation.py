"""Partial participation (`train.clients_per_round` K > 0): which live clients train in a
FedAvg round.

At a round's first step (and at the first step after a resume) rank 0 draws K of the live
clients (from run.seed and the round's first step: the same draw on every run) and tells
every live client whether it trains. An idle client
does no work and sends nothing; its learning-rate schedule moves on with the steps. The
round's FedAvg goes through rank 0 (roles/roster.py's relay) over the K that trained, and
rank 0 hands the sum to the idle ones too, so every live client holds the latest average
(and evaluates it) before its next round. A signal that stops the job mid-round reaches the
idle clients the same way. K = 0 (all) sends none of this: the run is today's, bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import JobConfig
from ..errors import CommTimeout, Stopped
from ..training import is_aggregation_step
from ..wire import ROUND, SERVER, Transport
from .roster import Roster


def first_step_of_round(step: int, cfg: JobConfig) -> bool:
    return step == 1 or is_aggregation_step(step - 1, cfg.train)


def round_start(step: int, cfg: JobConfig) -> int:
    while not first_step_of_round(step, cfg):
        step -= 1
    return step


def round_end(step: int, cfg: JobConfig) -> int:
    """The last step of the round that `step` is in."""
    while not is_aggregation_step(step, cfg.train):
        step += 1
    return step


def draw(live: list[int], k: int, seed: int, step: int) -> list[int]:
    """K of the live clients for the round that starts at `step` (all of them if fewer)."""
    if len(live) <= k:
        return sorted(live)
    return sorted(random.Random(f"{seed}:{step}").sample(sorted(live), k))


class AllTrain:
    """K = all: every live client trains every round; nothing is sent."""

    partial = False

    def __init__(self, roster: Roster):
        self.roster = roster

    def begin(self, step: int, resumed: bool = False) -> None:
        return None

    def members(self, step: int) -> list[int]:
        return list(self.roster.live)

    def share(self, step: int, summed: np.ndarray | None, stopping: bool) -> None:
        return None

    def stop(self, step: int) -> None:
        return None


class Sampled(AllTrain):
    """Rank 0's side of K < all (see the module docstring)."""

    partial = True

    def __init__(self, roster: Roster, transport: Transport, cfg: JobConfig):
        super().__init__(roster)
        self.transport = transport
        self.cfg = cfg
        self.k = cfg.train.clients_per_round
        self.drawn: list[int] = []

    def begin(self, step: int, resumed: bool = False) -> None:
        """At a round's first step (or the first step after a resume): the draw, told to every client."""
        if not (first_step_of_round(step, self.cfg) or resumed):
            return
        self.drawn = draw(self.roster.live, self.k, self.cfg.run.seed, round_start(step, self.cfg))
        for c in self.roster.live:
            self.transport.send_object(c, ROUND, ("train" if c in self.drawn else "idle", step))

    def members(self, step: int) -> list[int]:
        return [c for c in self.drawn if c in self.roster.live]

    def idle(self) -> list[int]:
        return [c for c in self.roster.live if c not in self.drawn]

    def share(self, step: int, summed: np.ndarray | None, stopping: bool) -> None:
        """The round's FedAvg sum to the clients that sat it out (and whether every rank stops)."""
        for c in self.idle():
            self.transport.send_object(c, ROUND, ("sum", (step, summed, stopping)), kind="adapters")

    def stop(self, step: int) -> None:
        """A stop in the middle of a round: the idle clients checkpoint and stop too."""
        if not is_aggregation_step(step, self.cfg.train):
            for c in self.idle():
                self.transport.send_object(c, ROUND, ("stop", (step, None, True)))


class ClientTurns:
    """A client's side of K < all: whether it trains this round, and what it does while idle."""

    def __init__(self, transport: Transport, cfg: JobConfig):
        self.transport = transport
        self.cfg = cfg

    def trains(self, step: int) -> bool:
        """At a round's first step: rank 0's word on this round."""
        word, _ = self._word(step, step)
        return word == "train"

    def sit_out(self, step: int, schedule_to: Callable[[int], None], take_sum: Callable[[np.ndarray], None],
                after_round: Callable[[int, bool], None], on_checkpoint: Callable[[int], None]) -> int:  # fmt: skip
        """Idle from `step` until rank 0's next word: a round's sum (to `take_sum`, then
        `after_round(its last step, stopping)`: evaluation, checkpoint) or a stop in the middle
        (a checkpoint, then Stopped); `schedule_to` moves the schedule over the steps sat out.
        Returns the step the word was for (a joining client may sit out more than one round)."""
        word, (at, summed, stopping) = self._word(step, round_end(step, self.cfg))
        schedule_to(at)
        if word == "stop":
            on_checkpoint(at)
            raise Stopped(at)
        take_sum(summed)
        after_round(at, stopping)
        return at

    def round_sum(self, first: int, last: int) -> np.ndarray:
        """fedlora: an idle round's FedAvg sum (its stop flag and losses inside)."""
        return self._word(first, last)[1][1]

    def _word(self, step: int, last: int) -> tuple[str, Any]:
        """rank 0's next word, waiting up to comm.timeout_s per step until `last` (+1)."""
        t = self.transport
        got = t.recv_objects([SERVER], ROUND, "adapters", give_up_s=t.timeout_s * (last - step + 2))
        if not got:
            raise CommTimeout(f"rank {t.rank}: no word from rank 0 on round {step}..{last} while idle "
                              f"(comm.timeout_s={t.timeout_s:g} per step)")  # fmt: skip
        return got[SERVER]
