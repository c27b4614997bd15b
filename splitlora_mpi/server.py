"""The server rank: the remaining blocks, final norm and LM head, one shared LoRA.

Per step: take every client's activations in arrival order, concatenate them in rank
order (deterministic), compute the token-averaged loss, step, and return each client the
gradient slice of the activations it sent. In `sl` mode only one client (the one whose
turn it is) sends per step; everything else is the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from .compress import decode, encode, wire_parts
from .config import JobConfig
from .data import shard
from .model import SplitPart
from .protocol import CONTINUE, DIVERGED, EVAL, HANDOFF, STOP, TRAIN, Message, Transport
from .training import (
    Diverged,
    PartTrainer,
    checkpoint_or_stop,
    eval_loss_sum,
    is_eval_step,
    server_update,
    sl_owner,
)


class Server:
    def __init__(self, cfg: JobConfig, part: SplitPart, transport: Transport, clients: list[int], val_rows: int):
        self.cfg = cfg
        self.part = part
        self.trainer = PartTrainer(part, cfg.train)
        self.transport = transport
        self.clients = sorted(clients)
        self.val_rows = val_rows
        self.wire = cfg.comm.activation_dtype
        self.kinds_up = ["activations"] * wire_parts(self.wire) + ["labels"]
        self.compute_dtype = getattr(torch, cfg.model.dtype)
        self.device = next(part.parameters()).device
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
            val = self.evaluate(step) if is_eval_step(step, t) else None
            on_step(step, loss, tokens, lr, val)
            checkpoint_or_stop(step, self.cfg.checkpoint.every, stopping, on_checkpoint)

    def state(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state(),
            "tokens": self.tokens,
            "handoff_bytes": self.handoff_bytes,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.trainer.load_state(state["trainer"])
        self.tokens = state["tokens"]
        self.handoff_bytes = state["handoff_bytes"]
        torch.set_rng_state(state["torch_rng"])

    def active(self, step: int) -> list[int]:
        """The clients that send activations in `step`."""
        if self.cfg.run.mode == "sl":
            return [self.clients[sl_owner(step, self.cfg.train, len(self.clients))]]
        return self.clients

    def _batch(self, uploads: dict[int, list[Message]], step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for rank, msgs in uploads.items():
            if msgs[0].step != step:
                raise RuntimeError(f"rank 0: rank {rank} sent activations of step {msgs[0].step} during step {step}")
        order = sorted(uploads)
        h = torch.cat([decode([m.tensor for m in uploads[r][:-1]], self.compute_dtype) for r in order]).to(self.device)
        side = torch.cat([uploads[r][-1].tensor for r in order], dim=1).to(self.device).long()
        return h, side[0], side[1]

    def train_step(self, step: int, stop_requested: bool = False) -> tuple[float, int, bool]:
        start = time.perf_counter()
        active = self.active(step)
        if step > self.start + 1 and active != self.active(step - 1):  # sl: a turn ended
            previous = self.active(step - 1)[0]
            self.handoff_bytes += self.transport.recv_objects([previous], HANDOFF)[previous]
        uploads = self.transport.recv_tensors(active, TRAIN, self.kinds_up)
        stopping = stop_requested or any(msgs[0].flag == STOP for msgs in uploads.values())
        h, mask, labels = self._batch(uploads, step)
        sizes = [uploads[r][0].tensor.shape[0] for r in sorted(uploads)]
        try:
            loss, grad = server_update(self.trainer, step, h, mask, labels, self.cfg.train.label_smoothing)
        except Diverged:  # every client must stop too, before it updates anything
            self._reply(step, torch.zeros_like(h).split(sizes), DIVERGED)
            raise
        self._reply(step, grad.split(sizes), STOP if stopping else CONTINUE)
        tokens = int(mask.sum())
        self.tokens += tokens
        self.transport.metrics.step(step, time.perf_counter() - start, tokens, loss)
        return loss, tokens, stopping

    def _reply(self, step: int, grads: tuple[torch.Tensor, ...], flag: int) -> None:
        wire = {rank: [(t, "gradients") for t in encode(g, self.wire)] for rank, g in zip(self.active(step), grads)}
        self.transport.send_tensors(TRAIN, step, wire, flag)

    def evaluate(self, step: int) -> float:
        """Validation loss over every active client's share, round by round (one batch per client)."""
        active = self.active(step)
        b = self.cfg.train.batch_size
        batches = {c: -(-len(shard(self.val_rows, len(active), i)) // b) for i, c in enumerate(active)}
        total, count = 0.0, 0
        for r in range(max(batches.values())):
            senders = [c for c in active if batches[c] > r]
            h, mask, labels = self._batch(self.transport.recv_tensors(senders, EVAL, self.kinds_up), step)
            loss_sum, n = eval_loss_sum(self.part, h, mask, labels)
            total, count = total + loss_sum, count + n
        self.transport.metrics.val_loss(total / count)
        return total / count
