"""The whole model in one process: the central baseline (CenLoRA, all data on one rank)
and each FedLoRA client's local training.

It is the split run with the wire taken out: the same two parts, sampler, optimizers,
schedule and loss, so a split run with one client must match it step for step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import JobConfig
from ..data import EncodedData, Sampler, make_batch
from ..metrics import Metrics
from ..model import SplitPart, joined_adapter_state, load_joined_adapter_state
from ..training import OnStep, PartTrainer, checkpoint_or_stop, evaluate_whole, is_eval_step, server_update


class WholeModel:
    def __init__(
        self,
        cfg: JobConfig,
        client_part: SplitPart,
        server_part: SplitPart,
        train: EncodedData,
        train_rows: list[int],
        val: EncodedData,
        metrics: Metrics,
        client: int = 0,
    ):
        """`client`: the sampler stream to draw (fedlora: a client's own, as in the split run)."""
        self.cfg = cfg
        self.client = PartTrainer(client_part, cfg.train)
        self.server = PartTrainer(server_part, cfg.train)
        self.train = train
        self.sampler = Sampler(train_rows, cfg.train.batch_size, cfg.run.seed, client)
        self.val = val
        self.device = next(client_part.parameters()).device
        self.metrics = metrics
        self.parts = [client_part, server_part]
        self.eval_rows = len(val)
        self.tokens = 0

    def meet(self, hellos: dict[int, dict[str, Any]]) -> None:
        """(No clients.)"""

    def run(self, on_step: OnStep, start: int, on_checkpoint: Callable[[int], None],
            stop_requested: Callable[[], bool]) -> None:  # fmt: skip
        """Steps start+1 .. train.steps, as the server's loop: a signal stops after the step."""
        t = self.cfg.train
        for step in range(start + 1, t.steps + 1):
            lr = self.server.lr
            start = time.perf_counter()
            loss, tokens, _ = self.train_step(step)
            self.metrics.step(step, time.perf_counter() - start, tokens, loss)
            val = self.evaluate() if is_eval_step(step, t) else None
            if val is not None:
                self.metrics.val_loss(val)
            on_step(step, loss, tokens, lr, val)
            stopping = stop_requested()
            checkpoint_or_stop(step, self.cfg.checkpoint.every, stopping, on_checkpoint)

    def state(self) -> dict[str, Any]:
        return {
            "client": self.client.state(),
            "server": self.server.state(),
            "sampler_position": self.sampler.position,
            "tokens": self.tokens,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.client.load_state(state["client"])
        self.server.load_state(state["server"])
        self.sampler.position = state["sampler_position"]
        self.tokens = state["tokens"]

    def train_step(self, step: int) -> tuple[float, int, int]:
        """One step on the whole model: (mean loss, non-pad tokens, target tokens)."""
        batch = make_batch(self.train, self.sampler.next_indices()).to(self.device)
        h = self.client.part(batch.input_ids, batch.attention_mask)
        ls = self.cfg.train.label_smoothing
        loss, grad = server_update(self.server, step, h, batch.attention_mask, batch.labels, ls)
        h.backward(grad)
        self.client.step()
        self.tokens += batch.tokens
        return loss, batch.tokens, batch.target_tokens

    def evaluate(self) -> float:
        return evaluate_whole(self.client.part, self.server.part, self.val, self.cfg.train.batch_size)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return joined_adapter_state(self.parts)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        load_joined_adapter_state(self.parts, state)

    def trainable_params(self) -> int:
        return self.server.part.trainable_numel()

    def client_peer_bytes(self, step: int) -> int:
        return 0
