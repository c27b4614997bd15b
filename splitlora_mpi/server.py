"""The server rank: the remaining blocks, final norm and LM head, one shared LoRA.

Per step: take every client's activations in arrival order, concatenate them in rank
order (deterministic), compute the token-averaged loss, step, and return each client the
gradient slice of the activations it sent. In `sl` mode only one client (the one whose
turn it is) sends per step; everything else is the same.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from . import aggregate
from .compress import decode, encode, wire_parts
from .config import JobConfig
from .data import IGNORE, shard
from .model import SplitPart
from .protocol import CONTINUE, DIVERGED, EVAL, EVAL_TAIL, HANDOFF, STOP, TAIL, TRAIN, Message, Transport
from .training import (
    Diverged,
    PartTrainer,
    apply_loss,
    checkpoint_or_stop,
    is_aggregation_step,
    is_eval_step,
    lm_loss_sum,
    sl_owner,
)


class Server:
    def __init__(
        self,
        cfg: JobConfig,
        part: SplitPart,
        transport: Transport,
        clients: list[int],
        val_rows: int,
        client_adapters: dict[int, dict[str, list[int]]] | None = None,
    ):
        """`client_adapters`: with per-client cut points, each client's adapter tensors (key:
        shape); the server's copies of blocks some clients hold join their FedAvg."""
        self.cfg = cfg
        self.part = part
        self.trainer = PartTrainer(part, cfg.train)
        self.transport = transport
        self.clients = sorted(clients)
        self.cut = {c: cfg.split.cut_of(c - 1) for c in self.clients}  # the block each client's rows enter at
        self.val_rows = val_rows
        self.wire = cfg.comm.activation_dtype
        self.label_private = cfg.split.label_private
        self.micro_batches = cfg.comm.micro_batches
        self._stopping = False  # a signal asked this step to be the last
        side = ["control", "control"] if self.label_private else ["labels"]  # (mask, target count) or (mask + labels)
        self.kinds_up = ["activations"] * wire_parts(self.wire) + side
        self.compute_dtype = getattr(torch, cfg.model.dtype)
        self.device = next(part.parameters()).device
        self.client_adapters = client_adapters
        self.layout = (
            None if client_adapters is None else {k: v for a in client_adapters.values() for k, v in a.items()}
        )
        self.tokens_since_average = dict.fromkeys(self.clients, 0)
        self.tokens = 0
        self.handoff_bytes = 0  # sl: client-to-client handoffs, as their senders report them
        self.start = 0

    def run(
        self,
        on_step: Callable[[int, float, int, float, float | None], None],
        start: int,
        on_checkpoint: Callable[[int], None],
        stop_requested: Callable[[], bool],
    ) -> None:
        """Steps start+1 .. train.steps; `on_step(step, loss, tokens, lr, val_loss)` after each.
        A stop asked for by a signal here or on any client ends every rank after the same step."""
        t = self.cfg.train
        self.start = start
        for step in range(start + 1, t.steps + 1):
            lr = self.trainer.lr
            loss, tokens, stopping = self.train_step(step, stop_requested())
            if self.layout is not None and is_aggregation_step(step, t):
                self.average()
            val = self.evaluate(step) if is_eval_step(step, t) else None
            on_step(step, loss, tokens, lr, val)
            checkpoint_or_stop(step, self.cfg.checkpoint.every, stopping, on_checkpoint)

    def state(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state(),
            "tokens": self.tokens,
            "tokens_since_average": self.tokens_since_average,
            "handoff_bytes": self.handoff_bytes,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.trainer.load_state(state["trainer"])
        self.tokens = state["tokens"]
        self.tokens_since_average = state["tokens_since_average"]
        self.handoff_bytes = state["handoff_bytes"]
        torch.set_rng_state(state["torch_rng"])

    def active(self, step: int) -> list[int]:
        """The clients that send activations in `step`, in batch order: by cut point, then rank."""
        if self.cfg.run.mode == "sl":
            return [self.clients[sl_owner(step, self.cfg.train, len(self.clients))]]
        return sorted(self.clients, key=lambda c: (self.cut[c], c))

    def _forward(
        self, uploads: dict[int, list[Message]], step: int, requires_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The server part over every upload (clients that share a cut point form one batch):
        (output, labels or the clients' target counts, the activations per client)."""
        for rank, msgs in uploads.items():
            if msgs[0].step != step:
                raise RuntimeError(f"rank 0: rank {rank} sent activations of step {msgs[0].step} during step {step}")
        order = [c for c in self.active(step) if c in uploads]
        n = wire_parts(self.wire)
        h = {r: decode([m.tensor for m in uploads[r][:n]], self.compute_dtype).to(self.device) for r in order}
        h = {r: x.requires_grad_(requires_grad) for r, x in h.items()}
        side = torch.cat([uploads[r][n].tensor for r in order], dim=1).to(self.device).long()
        mask = side[0]
        rows = {r: uploads[r][n].tensor.shape[1] for r in order}
        inputs, at = [], 0
        for cut in sorted({self.cut[r] for r in order}):
            group = [r for r in order if self.cut[r] == cut]
            size = sum(rows[r] for r in group)
            inputs.append((cut, torch.cat([h[r] for r in group]), mask[at : at + size]))
            at += size
        targets = torch.cat([uploads[r][n + 1].tensor for r in order]) if self.label_private else side[1]
        return self.part.forward_joined(inputs), targets, h

    def train_step(self, step: int, stop_requested: bool = False) -> tuple[float, int, bool]:
        start = time.perf_counter()
        active = self.active(step)
        if step > self.start + 1 and active != self.active(step - 1):  # sl: a turn ended
            previous = self.active(step - 1)[0]
            self.handoff_bytes += self.transport.recv_objects([previous], HANDOFF)[previous]
        if self.micro_batches > 1:
            return self._pipelined(step, active, stop_requested, start)
        uploads = self.transport.recv_tensors(active, TRAIN, self.kinds_up)
        self._stopping = stop_requested or any(msgs[0].flag == STOP for msgs in uploads.values())
        out, targets, h = self._forward(uploads, step, requires_grad=True)
        try:
            if self.label_private:
                loss = self._client_loss(step, out, targets, h)
            else:
                loss_sum, n = lm_loss_sum(out, targets, self.cfg.train.label_smoothing)
                loss = apply_loss(self.trainer, step, loss_sum, n)
        except Diverged:  # every client must stop too, before it updates anything
            self._reply(step, {r: torch.zeros_like(x) for r, x in h.items()}, DIVERGED)
            raise
        self._reply(step, {r: x.grad for r, x in h.items()}, STOP if self._stopping else CONTINUE)
        return self._count(step, start, loss, {r: msgs[wire_parts(self.wire)].tensor for r, msgs in uploads.items()})

    def _count(self, step: int, start: float, loss: float, sides: dict[int, torch.Tensor]) -> tuple[float, int, bool]:
        """Token counts of a finished step (from each client's mask), metrics; returns
        (loss, tokens, whether every rank stops after this step)."""
        per_client = {r: int(side[0].sum()) for r, side in sides.items()}
        for r, n in per_client.items():
            self.tokens_since_average[r] += n
        tokens = sum(per_client.values())
        self.tokens += tokens
        self.transport.metrics.step(step, time.perf_counter() - start, tokens, loss)
        return loss, tokens, self._stopping

    def _pipelined(self, step: int, active: list[int], stop_requested: bool, start: float) -> tuple[float, int, bool]:
        """Micro-batches: with every client's labels in hand (the step's target count), each
        micro-batch is forwarded, backpropagated and its gradients returned as soon as it has
        arrived from all clients; one optimizer step at the end. The last reply carries the flag."""
        sides = {r: msgs[0] for r, msgs in self.transport.recv_tensors(active, TRAIN, ["labels"]).items()}
        self._stopping = stop_requested or any(m.flag == STOP for m in sides.values())
        total = sum(int((m.tensor[1][:, 1:] != IGNORE).sum()) for m in sides.values())
        chunks = {r: m.tensor.chunk(self.micro_batches, dim=1) for r, m in sides.items()}
        loss_sum, replies = 0.0, []
        for i in range(self.micro_batches):
            uploads = self.transport.recv_tensors(active, TRAIN, self.kinds_up[:-1])
            uploads = {r: msgs + [Message(step, chunks[r][i])] for r, msgs in uploads.items()}
            out, targets, h = self._forward(uploads, step, requires_grad=True)
            part_sum, _ = lm_loss_sum(out, targets, self.cfg.train.label_smoothing)
            loss_sum += float(part_sum.detach())
            (part_sum / total).backward()
            if i < self.micro_batches - 1:  # (not waiting: the clients finish sending before they receive)
                replies.append(self._reply(step, {r: x.grad for r, x in h.items()}, CONTINUE, wait=False))
        for wait in replies:
            wait()
        loss = loss_sum / total
        if not math.isfinite(loss):  # the clients have not stepped: the last reply stops them
            self._reply(step, {r: torch.zeros_like(x) for r, x in h.items()}, DIVERGED)
            raise Diverged(step, loss)
        self.trainer.step()
        self._reply(step, {r: x.grad for r, x in h.items()}, STOP if self._stopping else CONTINUE)
        return self._count(step, start, loss, {r: m.tensor for r, m in sides.items()})

    def _client_loss(self, step: int, out: torch.Tensor, targets: torch.Tensor, h: dict[int, torch.Tensor]) -> float:
        """Label privacy: each client gets its rows of the output (and the batch's target count),
        computes its loss on its own tail and returns the gradient and its loss sum."""
        total = targets.sum().reshape(1)
        outputs = dict(zip(h, out.split([x.shape[0] for x in h.values()])))
        self.transport.send_tensors(TAIL, step, {r: self._encoded(o, "activations") + [(total, "control")]
                                                 for r, o in outputs.items()})  # fmt: skip
        back = self.transport.recv_tensors(list(h), TAIL, ["gradients"] * wire_parts(self.wire) + ["control"])
        loss = sum(float(back[r][-1].tensor) for r in h) / int(total)
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        grads = [decode([m.tensor for m in back[r][:-1]], out.dtype).to(self.device) for r in h]
        out.backward(torch.cat(grads))
        self.trainer.step()
        return loss

    def average(self) -> None:
        """Per-client cut points: the server's copy of a block that some clients hold is one
        more holder in that block's FedAvg, weighted by the tokens of the clients it ran for."""
        assert self.layout is not None and self.client_adapters is not None
        state = {k: v for k, v in self.part.adapter_state().items() if k in self.layout}
        weights = {k: float(sum(n for c, n in self.tokens_since_average.items() if k not in self.client_adapters[c]))
                   for k in state}  # fmt: skip
        world = functools.partial(self.transport.allreduce_sum, world=True)
        self.part.load_adapter_state(aggregate.fedavg_by_key(state, weights, self.layout, world))
        self.tokens_since_average = dict.fromkeys(self.clients, 0)

    def _encoded(self, t: torch.Tensor, kind: str) -> list[tuple[torch.Tensor, str]]:
        return [(x, kind) for x in encode(t, self.wire)]

    def _reply(self, step: int, grads: dict[int, torch.Tensor], flag: int, wait: bool = True) -> Callable[[], None]:
        """Each client the gradient of the activations it sent; returns the wait for completion."""
        messages = {r: self._encoded(g, "gradients") for r, g in grads.items()}
        done = self.transport.isend_tensors(TRAIN, step, messages, flag)
        if wait:
            done()
        return done

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Validation loss over every active client's share, round by round (one batch per client)."""
        active = self.active(step)
        b = self.cfg.train.batch_size
        shares = {c: shard(self.val_rows, len(active), self.clients.index(c) if len(active) > 1 else 0) for c in active}
        batches = {c: -(-len(rows) // b) for c, rows in shares.items()}
        total, count = 0.0, 0
        for r in range(max(batches.values())):
            senders = [c for c in active if batches[c] > r]
            out, targets, h = self._forward(self.transport.recv_tensors(senders, EVAL, self.kinds_up), step, False)
            if self.label_private:  # the clients score their rows and send (loss sum, targets)
                outputs = dict(zip(h, out.split([x.shape[0] for x in h.values()])))
                self.transport.send_tensors(EVAL_TAIL, step, {c: self._encoded(o, "activations")
                                                              for c, o in outputs.items()})  # fmt: skip
                sums = self.transport.recv_tensors(senders, EVAL_TAIL, ["control"])
                loss_sum, n = (sum(float(sums[c][0].tensor[i]) for c in senders) for i in (0, 1))
            else:
                loss_sum, n = lm_loss_sum(out, targets)
                loss_sum = float(loss_sum)
            total, count = total + loss_sum, count + int(n)
        self.transport.metrics.val_loss(total / count)
        return total / count
