"""A client rank: its private data, the embeddings and first blocks, its own LoRA.

Per step: forward its batch to the cut layer, send the activations (and the mask and
labels the server's loss needs), receive their gradient, backpropagate, step.
Every `train.aggregate_every` steps: FedAvg of the client adapters with the other clients.

`sl` mode (vanilla split learning): clients take turns of `train.aggregate_every` steps;
at the end of its turn a client hands the client model's state (adapter, optimizer,
schedule, RNG) to the next client, so one client model travels over all the data.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from . import aggregate
from .compress import decode, encode, wire_parts
from .config import JobConfig, Stopped
from .data import Batch, EncodedData, Sampler, make_batch, shard
from .model import SplitPart
from .privacy import privatize
from .protocol import CONTINUE, DIVERGED, EVAL, EVAL_TAIL, HANDOFF, SERVER, STOP, TAIL, TRAIN, Message, Transport
from .training import (
    Diverged,
    PartTrainer,
    checkpoint_or_stop,
    is_aggregation_step,
    is_checkpoint_step,
    is_eval_step,
    lm_loss_sum,
    sl_owner,
    sl_steps_owned,
)


def side_channel(batch: Batch) -> torch.Tensor:
    """Attention mask and labels in one int32 buffer [2, B, T]: what the server's loss needs."""
    return torch.stack([batch.attention_mask, batch.labels]).to(torch.int32)


class Client:
    def __init__(
        self,
        cfg: JobConfig,
        part: SplitPart,
        train: EncodedData,
        train_rows: list[int],
        val: EncodedData,
        transport: Transport,
        index: int,
        num_clients: int,
    ):
        self.cfg = cfg
        self.part = part
        self.trainer = PartTrainer(part, cfg.train)
        self.train = train
        self.sampler = Sampler(train_rows, cfg.train.batch_size, cfg.run.seed, index)
        self.val = val
        self.index = index
        self.num_clients = num_clients
        self.other_clients = [c + 1 for c in range(num_clients) if c != index]  # ranks
        self.val_rows = shard(len(val), 1, 0) if cfg.run.mode == "sl" else shard(len(val), num_clients, index)
        self.transport = transport
        self.wire = cfg.comm.activation_dtype
        self.label_private = cfg.split.label_private
        self.micro_batches = cfg.comm.micro_batches
        self.compute_dtype = getattr(torch, cfg.model.dtype)
        self.device = next(part.parameters()).device
        # per-client cut points: every client-side adapter tensor (key: shape), averaged among the
        # ranks that hold it (the server too, for blocks it runs for clients with an earlier
        # cut); the server sends it with the handshake's verdict
        self.layout: dict[str, list[int]] | None = None
        self.tokens = 0
        self.tokens_since_average = 0

    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        """Steps start+1 .. train.steps (start > 0: resumed from a checkpoint of step `start`).
        `stop_requested()`: a signal arrived; the server then stops everyone after one step."""
        if self.cfg.run.mode == "sl":
            return self.run_turns(start, on_checkpoint, stop_requested)
        t = self.cfg.train
        for step in range(start + 1, t.steps + 1):
            stopping = self.train_step(step, stop_requested())
            if is_aggregation_step(step, t):
                self.average()
            if is_eval_step(step, t):
                self.evaluate(step)
            checkpoint_or_stop(step, self.cfg.checkpoint.every, stopping, on_checkpoint)

    def run_turns(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        """sl mode: train in this client's turns; in between, wait for the handoff of the client
        model (or the news that training ended: done, stopped or diverged)."""
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

    def state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs from this client."""
        return {
            "trainer": self.trainer.state(),
            "sampler_position": self.sampler.position,
            "tokens": self.tokens,
            "tokens_since_average": self.tokens_since_average,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.trainer.load_state(state["trainer"])
        self.sampler.position = state["sampler_position"]
        self.tokens = state["tokens"]
        self.tokens_since_average = state["tokens_since_average"]
        torch.set_rng_state(state["torch_rng"])

    def train_step(self, step: int, ask_to_stop: bool = False) -> bool:
        """One step; True when the server says every rank stops after it."""
        start = time.perf_counter()
        batch = make_batch(self.train, self.sampler.next_indices()).to(self.device)
        flag = STOP if ask_to_stop else CONTINUE
        if self.micro_batches > 1:
            outcome = self._pipelined(step, batch, flag)
        else:
            h = self._cut(batch)
            self.transport.send_tensors(TRAIN, step, {SERVER: self._upload(h, batch)}, flag)
            if self.label_private:
                self._tail_step(step, batch)
            outcome = self._backward(step, h)
        self.trainer.step()
        self.tokens += batch.tokens
        self.tokens_since_average += batch.tokens
        self.transport.metrics.step(step, time.perf_counter() - start, batch.tokens)
        return outcome == STOP

    def _pipelined(self, step: int, batch: Batch, flag: int) -> int:
        """Micro-batches: the labels first (the server needs the step's target count before
        its first backward), then each micro-batch's activations are on their way while the
        next is computed; gradients come back in the same order."""
        self.transport.send_tensors(TRAIN, step, {SERVER: [(side_channel(batch), "labels")]}, flag)
        cuts, waits = [], []
        for micro in batch.split(self.micro_batches):
            cuts.append(self._cut(micro))
            waits.append(self.transport.isend_tensors(TRAIN, step, {SERVER: self._encoded(cuts[-1], "activations")}))
        for wait in waits:
            wait()
        outcomes = [self._backward(step, h) for h in cuts]
        return outcomes[-1]

    def _backward(self, step: int, h: torch.Tensor) -> int:
        """Receive the gradient of `h` and backpropagate it; returns the server's flag. A
        divergence stops this client before it updates anything."""
        replies = self.transport.recv_tensors([SERVER], TRAIN, ["gradients"] * wire_parts(self.wire))[SERVER]
        reply = replies[0]
        if reply.step != step:
            raise RuntimeError(f"rank {self.transport.rank}: gradient for step {reply.step} arrived at step {step}")
        if reply.flag == DIVERGED:  # the server reports it (exit 2)
            raise Diverged(step, float("nan"))
        h.backward(self._decoded(replies))
        return reply.flag

    def _tail_step(self, step: int, batch: Batch) -> None:
        """Label privacy: the loss on this client's tail over the server's output; its gradient
        (and the loss sum, for the server's log) go back. The tail's weights change with the
        rest of the part once the server has accepted the step's loss."""
        msgs = self.transport.recv_tensors([SERVER], TAIL, ["activations"] * wire_parts(self.wire) + ["control"])
        out = self._decoded(msgs[SERVER][:-1]).requires_grad_()
        loss_sum, _ = lm_loss_sum(
            self.part.tail(out, batch.attention_mask), batch.labels, self.cfg.train.label_smoothing
        )
        (loss_sum / int(msgs[SERVER][-1].tensor)).backward()
        back = self._encoded(out.grad, "gradients") + [(loss_sum.detach().double().reshape(1), "control")]
        self.transport.send_tensors(TAIL, step, {SERVER: back})

    def average(self) -> None:
        """Token-weighted FedAvg of the client adapters (one Allreduce)."""
        state, weight = self.part.adapter_state(), float(self.tokens_since_average)
        if self.layout is None:
            state = aggregate.fedavg(state, weight, self.transport.allreduce_sum)
        else:
            world = functools.partial(self.transport.allreduce_sum, world=True)
            state = aggregate.fedavg_by_key(state, dict.fromkeys(state, weight), self.layout, world)
        self.part.load_adapter_state(state)
        self.tokens_since_average = 0

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """Send this client's share of the validation rows through the cut, batch by batch."""
        b = self.cfg.train.batch_size
        for start in range(0, len(self.val_rows), b):
            batch = make_batch(self.val, self.val_rows[start : start + b]).to(self.device)
            self.transport.send_tensors(EVAL, step, {SERVER: self._upload(self._cut(batch), batch)})
            if self.label_private:  # score the server's output here; only (loss sum, targets) leave
                out = self._decoded(
                    self.transport.recv_tensors([SERVER], EVAL_TAIL, ["activations"] * wire_parts(self.wire))[SERVER]
                )
                loss_sum, n = lm_loss_sum(self.part.tail(out, batch.attention_mask), batch.labels)
                sums = torch.tensor([float(loss_sum), n], dtype=torch.float64)
                self.transport.send_tensors(EVAL_TAIL, step, {SERVER: [(sums, "control")]})

    def _cut(self, batch: Batch) -> torch.Tensor:
        """What leaves this client: its part's output, clipped and noised when privacy is on."""
        p = self.cfg.privacy
        return privatize(self.part(batch.input_ids, batch.attention_mask), p.clip, p.noise_multiplier)

    def _upload(self, h: torch.Tensor, batch: Batch) -> list[tuple[torch.Tensor, str]]:
        """The cut-layer activations in the wire format, then the mask and labels (label
        privacy: the mask and the number of target tokens)."""
        if self.label_private:
            mask = batch.attention_mask.to(torch.int32).unsqueeze(0)
            return self._encoded(h, "activations") + [
                (mask, "control"),
                (torch.tensor([batch.target_tokens]), "control"),
            ]
        return self._encoded(h, "activations") + [(side_channel(batch), "labels")]

    def _encoded(self, t: torch.Tensor, kind: str) -> list[tuple[torch.Tensor, str]]:
        return [(x, kind) for x in encode(t, self.wire)]

    def _decoded(self, msgs: list[Message]) -> torch.Tensor:
        return decode([m.tensor for m in msgs], self.compute_dtype).to(self.device)
