"""A client rank: its private data, the embeddings and first blocks, its own LoRA.

Per step: forward its batch to the cut layer, send the activations (and the mask and
labels the server's loss needs), receive their gradient, backpropagate, step.
Every `train.aggregate_every` steps: FedAvg of the client adapters with the other clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from . import aggregate
from .config import JobConfig, Stopped
from .data import Batch, EncodedData, Sampler, make_batch, shard
from .model import SplitPart
from .protocol import CONTINUE, DIVERGED, EVAL, SERVER, STOP, TRAIN, Transport
from .training import Diverged, PartTrainer, is_aggregation_step, is_checkpoint_step, is_eval_step


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

    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None:
        """Steps start+1 .. train.steps (start > 0: resumed from a checkpoint of step `start`).
        `stop_requested()`: a signal arrived; the server then stops everyone after one step."""
        t = self.cfg.train
        for step in range(start + 1, t.steps + 1):
            stopping = self.train_step(step, stop_requested())
            if is_aggregation_step(step, t):
                self.average()
            if is_eval_step(step, t):
                self.evaluate(step)
            if stopping or is_checkpoint_step(step, self.cfg.checkpoint.every):
                on_checkpoint(step)
            if stopping:
                raise Stopped(step)

    def state(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs from this client."""
        return {
            "adapter": {k: v.detach().cpu().clone() for k, v in self.part.adapter_state().items()},
            "trainer": self.trainer.state(),
            "sampler_position": self.sampler.position,
            "tokens": self.tokens,
            "tokens_since_average": self.tokens_since_average,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.part.load_adapter_state(state["adapter"])
        self.trainer.load_state(state["trainer"])
        self.sampler.position = state["sampler_position"]
        self.tokens = state["tokens"]
        self.tokens_since_average = state["tokens_since_average"]
        torch.set_rng_state(state["torch_rng"])

    def train_step(self, step: int, ask_to_stop: bool = False) -> bool:
        """One step; True when the server says every rank stops after it."""
        start = time.perf_counter()
        batch = make_batch(self.train, self.sampler.next_indices()).to(self.device)
        h = self.part(batch.input_ids, batch.attention_mask)
        self.transport.send_tensors(
            TRAIN,
            step,
            {SERVER: [(h.to(self.wire_dtype), "activations"), (side_channel(batch), "labels")]},
            STOP if ask_to_stop else CONTINUE,
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
        return reply.flag == STOP

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
