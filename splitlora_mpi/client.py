"""A client rank: its private data, the embeddings and first blocks, its own LoRA.

Per step: forward its batch to the cut layer, send the activations (and the mask and
labels the server's loss needs), receive their gradient, backpropagate, step.
Every `train.aggregate_every` steps: FedAvg of the client adapters with the other clients.
"""

from __future__ import annotations

import time

import torch

from . import aggregate
from .config import JobConfig
from .data import Batch, EncodedData, Sampler, make_batch, shard
from .model import SplitPart
from .protocol import DIVERGED, EVAL, SERVER, TRAIN, Transport
from .training import Diverged, PartTrainer, is_aggregation_step, is_eval_step


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
        self.val_rows = shard(len(val), num_clients, index)
        self.transport = transport
        self.wire_dtype = getattr(torch, cfg.comm.activation_dtype)
        self.device = next(part.parameters()).device
        self.tokens = 0
        self.tokens_since_average = 0

    def run(self) -> None:
        t = self.cfg.train
        for step in range(1, t.steps + 1):
            self.train_step(step)
            if is_aggregation_step(step, t):
                self.average()
            if is_eval_step(step, t):
                self.evaluate(step)

    def train_step(self, step: int) -> None:
        start = time.perf_counter()
        batch = make_batch(self.train, self.sampler.next_indices()).to(self.device)
        h = self.part(batch.input_ids, batch.attention_mask)
        self.transport.send_tensors(
            TRAIN, step, {SERVER: [(h.to(self.wire_dtype), "activations"), (side_channel(batch), "labels")]}
        )
        reply = self.transport.recv_tensors([SERVER], TRAIN, ["gradients"])[SERVER][0]
        if reply.step != step:
            raise RuntimeError(f"rank {self.transport.rank}: gradient for step {reply.step} arrived at step {step}")
        if reply.flag == DIVERGED:  # the server reports it (exit 2); stop before updating anything
            raise Diverged(step, float("nan"))
        h.backward(reply.tensor.to(h.dtype))
        self.trainer.step()
        self.tokens += batch.tokens
        self.tokens_since_average += batch.tokens
        self.transport.metrics.step(step, time.perf_counter() - start, batch.tokens)

    def average(self) -> None:
        """Token-weighted FedAvg of the client adapters (one Allreduce)."""
        state = aggregate.fedavg(self.part.adapter_state(), self.tokens_since_average, self.transport.allreduce_sum)
        self.part.load_adapter_state(state)
        self.tokens_since_average = 0

    @torch.no_grad()
    def evaluate(self, step: int) -> None:
        """Send this client's share of the validation rows through the cut, batch by batch."""
        b = self.cfg.train.batch_size
        for start in range(0, len(self.val_rows), b):
            batch = make_batch(self.val, self.val_rows[start : start + b]).to(self.device)
            h = self.part(batch.input_ids, batch.attention_mask)
            self.transport.send_tensors(
                EVAL, step, {SERVER: [(h.to(self.wire_dtype), "activations"), (side_channel(batch), "labels")]}
            )
