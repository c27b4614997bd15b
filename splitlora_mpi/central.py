"""The central baseline (CenLoRA): one rank, the whole model, all data.

It is the split run with the wire taken out: the same two parts, sampler, optimizers,
schedule and loss, so a split run with one client must match it step for step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .config import JobConfig
from .data import EncodedData, Sampler, make_batch
from .metrics import Metrics
from .model import SplitPart
from .training import PartTrainer, eval_loss_sum, is_eval_step, server_update


class Central:
    def __init__(
        self,
        cfg: JobConfig,
        client_part: SplitPart,
        server_part: SplitPart,
        train: EncodedData,
        train_rows: list[int],
        val: EncodedData,
        metrics: Metrics,
    ):
        self.cfg = cfg
        self.client = PartTrainer(client_part, cfg.train)
        self.server = PartTrainer(server_part, cfg.train)
        self.train = train
        self.sampler = Sampler(train_rows, cfg.train.batch_size, cfg.run.seed, 0)
        self.val = val
        self.device = next(client_part.parameters()).device
        self.metrics = metrics
        self.tokens = 0

    def run(self, on_step: Callable[[int, float, int, float, float | None], None]) -> None:
        t = self.cfg.train
        for step in range(1, t.steps + 1):
            lr = self.server.lr
            start = time.perf_counter()
            loss, tokens = self.train_step(step)
            self.metrics.step(step, time.perf_counter() - start, tokens, loss)
            val = self.evaluate() if is_eval_step(step, t) else None
            if val is not None:
                self.metrics.val_loss(val)
            on_step(step, loss, tokens, lr, val)

    def train_step(self, step: int) -> tuple[float, int]:
        batch = make_batch(self.train, self.sampler.next_indices()).to(self.device)
        h = self.client.part(batch.input_ids, batch.attention_mask)
        ls = self.cfg.train.label_smoothing
        loss, grad = server_update(self.server, step, h, batch.attention_mask, batch.labels, ls)
        h.backward(grad)
        self.client.step()
        self.tokens += batch.tokens
        return loss, batch.tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        total, count = 0.0, 0
        b = self.cfg.train.batch_size
        for start in range(0, len(self.val), b):
            batch = make_batch(self.val, list(range(start, min(start + b, len(self.val))))).to(self.device)
            h = self.client.part(batch.input_ids, batch.attention_mask)
            loss_sum, n = eval_loss_sum(self.server.part, h, batch.attention_mask, batch.labels)
            total, count = total + loss_sum, count + n
        return total / count
