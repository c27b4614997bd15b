"""A client rank: its private data, the embeddings and first blocks, its own LoRA.

Per step: forward its batch to the cut, send the activations (and what the server's loss
needs), receive their gradient, backpropagate, step. Every `train.aggregate_every` steps:
FedAvg of the client adapters with the other clients.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import aggregate
from ..config import ElasticConfig, JobConfig
from ..data import Batch, EncodedData, Sampler, make_batch, shard
from ..errors import Diverged
from ..model import SplitPart
from ..privacy import privatize
from ..training import PartTrainer, checkpoint_or_stop, is_aggregation_step, is_eval_step, lm_loss_sum
from ..wire import CONTINUE, DIVERGED, EVAL, EVAL_TAIL, RELAY, SERVER, STOP, TAIL, TRAIN
from ..wire.messages import (
    Channel,
    EvalSums,
    EvalTailInput,
    GradientReply,
    Labels,
    MicroUpload,
    PrivateUpload,
    TailInput,
    TailReply,
    Upload,
)
from .participation import ClientTurns, first_step_of_round
from .roster import ClientSum


def side_channel(batch: Batch) -> torch.Tensor:
    """Attention mask and labels in one int32 buffer [2, B, T]: what the server's loss needs."""
    return torch.stack([batch.attention_mask, batch.labels]).to(torch.int32)


class LossAtServer:
    """The plain split: the labels travel with the activations."""

    def upload(self, h: torch.Tensor, batch: Batch) -> Upload:
        return Upload(h, side_channel(batch))

    def after_upload(self, step: int, batch: Batch) -> None:
        """Nothing: the server computes the loss."""

    def score(self, step: int, batch: Batch) -> None:
        """Nothing: the server scores validation batches."""


class LossOnTail:
    """Label privacy: only the mask and the target count leave; the loss is computed on this
    client's tail over the server's output."""

    def __init__(self, part: SplitPart, channel: Channel, label_smoothing: float):
        self.part = part
        self.channel = channel
        self.label_smoothing = label_smoothing

    def upload(self, h: torch.Tensor, batch: Batch) -> PrivateUpload:
        mask = batch.attention_mask.to(torch.int32).unsqueeze(0)
        return PrivateUpload(h, mask, torch.tensor([batch.target_tokens]))

    def after_upload(self, step: int, batch: Batch) -> None:
        """The loss on the tail; its gradient (and the loss sum, for the server's log) go back.
        The tail's weights change with the rest of the part once the server accepted the loss."""
        got = self.channel.recv([SERVER], TAIL, TailInput)[SERVER].body
        out = got.output.requires_grad_()
        loss_sum, _ = lm_loss_sum(self.part.tail(out, batch.attention_mask), batch.labels, self.label_smoothing)
        (loss_sum / int(got.targets)).backward()
        self.channel.send(TAIL, step, {SERVER: TailReply(out.grad, loss_sum.detach().double().reshape(1))})

    @torch.no_grad()
    def score(self, step: int, batch: Batch) -> None:
        """A validation batch: score the server's output here; only (loss sum, targets) leave."""
        out = self.channel.recv([SERVER], EVAL_TAIL, EvalTailInput)[SERVER].body.output
        loss_sum, n = lm_loss_sum(self.part.tail(out, batch.attention_mask), batch.labels)
        self.channel.send(EVAL_TAIL, step, {SERVER: EvalSums(torch.tensor([float(loss_sum), n], dtype=torch.float64))})


class Client:
    def __init__(
        self,
        cfg: JobConfig,
        part: SplitPart,
        train: EncodedData,
        train_rows: list[int],
        val: EncodedData,
        channel: Channel,
        index: int,
        num_clients: int,
        elastic: ElasticConfig | None = None,
    ):
        """`elastic`: under an elastic launch, FedAvg survives a lost client (roles/roster.py)."""
        self.cfg = cfg
        self.part = part
        self.parts = [part]
        self.trainer = PartTrainer(part, cfg.train)
        self.train = train
        self.sampler = Sampler(train_rows, cfg.train.batch_size, cfg.run.seed, index)
        self.val = val
        own = cfg.data.scheme == "local"  # its own validation file: all of it; a shared one: its shard
        self.val_rows = list(range(len(val))) if own else shard(len(val), num_clients, index)
        self.index = index
        self.num_clients = num_clients
        self.channel = channel
        self.transport = channel.transport
        self.metrics = channel.transport.metrics
        self.device = next(part.parameters()).device
        self.micro_batches = cfg.comm.micro_batches
        self.loss: LossAtServer | LossOnTail = (
            LossOnTail(part, channel, cfg.train.label_smoothing) if cfg.split.label_private else LossAtServer()
        )
        self.exchange = self._micro_batches if self.micro_batches > 1 else self._whole_batch
        partial = 0 < cfg.train.clients_per_round < num_clients  # (FedAvg then goes through rank 0)
        give_up_s = elastic.client_timeout_s if elastic else 0.0
        self.sum = ClientSum(self.transport, give_up_s, relay=partial) if elastic or partial else None
        self.fedavg = functools.partial(aggregate.fedavg, allreduce_sum=self.sum or self.transport.allreduce_sum)
        self.turns = ClientTurns(self.transport, cfg) if partial else None
        self.tokens = 0
        self.tokens_since_average = 0
        self.averaged: aggregate.State | None = None  # the adapter after the last FedAvg (checkpoints)

    @property
    def eval_rows(self) -> int:
        """The validation rows this client sends per evaluation."""
        return len(self.val_rows)

    def accept(self, verdict: dict[str, Any]) -> None:
        """Per-client cut points: every client-side adapter tensor (key: shape) is averaged among
        the ranks that hold it, the server too (for the blocks it runs for clients with an
        earlier cut) -- one Allreduce over every rank."""
        layout = verdict.get("layout")
        if layout is None:
            return
        world = functools.partial(self.transport.allreduce_sum, world=True)

        def fedavg_by_key(state: aggregate.State, weight: float) -> aggregate.State:
            return aggregate.fedavg_by_key(state, dict.fromkeys(state, weight), layout, world)

        self.fedavg = fedavg_by_key

    # ------------------------------------------------------------ the loop

    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        """Steps start+1 .. train.steps (start > 0: resumed from a checkpoint of step `start`).
        `stop_requested()`: a signal arrived; the server then stops everyone after one step."""
        t = self.cfg.train
        step = start
        while step < t.steps:
            step += 1
            resumed = step == start + 1 and start > 0
            if self.turns and (first_step_of_round(step, self.cfg) or resumed) and not self.turns.trains(step):
                step = self.turns.sit_out(step, self.trainer.schedule_to, self.take_sum,
                                          lambda last, stopping: self.end_step(last, stopping, on_checkpoint),
                                          on_checkpoint)  # fmt: skip
                continue
            stopping = self.train_step(step, stop_requested())
            if is_aggregation_step(step, t):
                self.average()
            self.end_step(step, stopping, on_checkpoint)

    def end_step(self, step: int, stopping: bool, on_checkpoint: Callable[[int], None]) -> None:
        """Validation when due, then the checkpoint when due or stopping."""
        if is_eval_step(step, self.cfg.train):
            self.evaluate(step)
        checkpoint_or_stop(step, self.cfg.checkpoint.every, stopping, on_checkpoint)

    def join(self, step: int, on_checkpoint: Callable[[int], None]) -> int:
        """Joined the running job during `step`: idle until that round's average; its last step."""
        return ClientTurns(self.transport, self.cfg).sit_out(
            step, self.trainer.schedule_to, self.take_sum,
            lambda last, stopping: self.end_step(last, stopping, on_checkpoint), on_checkpoint)  # fmt: skip

    def take_sum(self, summed: Any) -> None:
        """An idle round's end: the FedAvg of the clients that trained (rank 0 relays its sum)."""
        self.part.load_adapter_state(aggregate.mean_from_sum(summed, self.part.adapter_state()))
        self.tokens_since_average = 0
        self.averaged = {k: v.detach().cpu().clone() for k, v in self.part.adapter_state().items()}

    def train_step(self, step: int, ask_to_stop: bool = False) -> bool:
        """One step; True when the server says every rank stops after it."""
        start = time.perf_counter()
        batch = make_batch(self.train, self.sampler.next_indices()).to(self.device)
        outcome = self.exchange(step, batch, STOP if ask_to_stop else CONTINUE)
        self.trainer.step()
        self.tokens += batch.tokens
        self.tokens_since_average += batch.tokens
        self.metrics.step(step, time.perf_counter() - start, batch.tokens)
        return outcome == STOP

    # ------------------------------------------------------------ the two schedules of a step

    def _whole_batch(self, step: int, batch: Batch, flag: int) -> int:
        h = self.cut(batch)
        self.channel.send(TRAIN, step, {SERVER: self.loss.upload(h, batch)}, flag)
        self.loss.after_upload(step, batch)
        return self.backward(step, h)

    def _micro_batches(self, step: int, batch: Batch, flag: int) -> int:
        """The labels first (the server needs the step's target count before its first
        backward), then each micro-batch's activations are on their way while the next is
        computed; gradients come back in the same order."""
        self.channel.send(TRAIN, step, {SERVER: Labels(side_channel(batch))}, flag)
        cuts, waits = [], []
        for micro in batch.split(self.micro_batches):
            cuts.append(self.cut(micro))
            waits.append(self.channel.isend(TRAIN, step, {SERVER: MicroUpload(cuts[-1])}))
        for wait in waits:
            wait()
        return [self.backward(step, h) for h in cuts][-1]

    # ------------------------------------------------------------ pieces

    def cut(self, batch: Batch) -> torch.Tensor:
        """What leaves this client: its part's output, clipped and noised when privacy is on."""
        p = self.cfg.privacy
        return privatize(self.part(batch.input_ids, batch.attention_mask), p.clip, p.noise_multiplier)

    def backward(self, step: int, h: torch.Tensor) -> int:
        """Receive the gradient of `h` and backpropagate it; returns the server's flag. A
        divergence stops this client before it updates anything."""
        reply = self.channel.recv([SERVER], TRAIN, GradientReply)[SERVER]
        if reply.step != step:
            raise RuntimeError(f"rank {self.transport.rank}: gradient for step {reply.step} arrived at step {step}")
        if reply.flag == DIVERGED:  # the server reports it (exit 2)
            raise Diverged(step, float("nan"))
        if reply.flag & RELAY and self.sum is not None:  # a client was lost or joined: no Allreduce of all
            self.sum.relay = True
        h.backward(reply.body.gradient)
        return reply.flag & ~RELAY

    def average(self) -> None:
        """FedAvg of the client adapters (one Allreduce), weighted by train.fedavg_weights."""
        weight = float(self.tokens_since_average) if self.cfg.train.fedavg_weights == "tokens" else 1.0
        self.part.load_adapter_state(self.fedavg(self.part.adapter_state(), weight))
        self.tokens_since_average = 0
        self.averaged = {k: v.detach().cpu().clone() for k, v in self.part.adapter_state().items()}

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """Send this client's share of the validation rows through the cut, batch by batch."""
        b = self.cfg.train.batch_size
        for start in range(0, len(self.val_rows), b):
            batch = make_batch(self.val, self.val_rows[start : start + b]).to(self.device)
            self.channel.send(EVAL, step, {SERVER: self.loss.upload(self.cut(batch), batch)})
            self.loss.score(step, batch)

    # ------------------------------------------------------------ for the runner

    def state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs from this client."""
        return {"trainer": self.trainer.state(), "sampler_position": self.sampler.position, "tokens": self.tokens,
                "tokens_since_average": self.tokens_since_average, "averaged": self.averaged}  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        self.trainer.load_state(state["trainer"])
        self.sampler.position = state["sampler_position"]
        self.tokens = state["tokens"]
        self.tokens_since_average = state["tokens_since_average"]
        self.averaged = state.get("averaged")  # (checkpoints before elastic runs have none)

    def adopt(self, saved: dict[str, Any], step: int) -> None:
        """A client with no state of its own in the checkpoint of `step` (the job has more clients
        now, or it was lost before): the last averaged client adapter, a fresh optimizer and
        sampler, the schedule at `step`."""
        role = saved["role"]
        self.averaged = role.get("averaged") or role["trainer"]["adapter"]
        self.part.load_adapter_state(self.averaged)
        self.trainer.schedule_to(step)
