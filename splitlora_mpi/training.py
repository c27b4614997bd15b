"""What every side does with its part: the loss, the optimizer, the step.

Shared by the split roles and the central baseline, so the baseline differs from the
split run only by the wire in the middle.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from .config import TrainConfig
from .data import EncodedData, make_batch, target_count
from .errors import Diverged, Stopped
from .model import SplitPart
from .progress import Progress

OnStep = Callable[[int, float, int, float, "float | None"], None]  # after a step: step, loss, tokens, lr, val loss


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over target tokens and their count (caller averages, so
    losses from several batches or clients combine exactly)."""
    targets = labels[:, 1:].reshape(-1)
    n = target_count(labels)
    if n == 0:
        raise ValueError("batch has no target tokens")  # never average over zero tokens
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets,
        ignore_index=-100,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    return loss, n


class PartTrainer:
    """AdamW + linear warm-up/decay + gradient clipping over one part's LoRA parameters."""

    def __init__(self, part: SplitPart, cfg: TrainConfig, updates_per_step: int = 1):
        """`updates_per_step`: optimizer steps per training step (the sequential server: one per
        client); the schedule keeps its shape over train.steps."""
        self.part = part
        self.params = part.trainable_parameters()
        self.grad_clip = cfg.grad_clip
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        k = updates_per_step
        self.schedule = get_linear_schedule_with_warmup(self.optimizer, cfg.warmup_steps * k, cfg.steps * k)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def lr_at(self, step: int) -> float:
        """The learning rate of `step` (1-based) by the schedule, without stepping anything."""
        return self.schedule.base_lrs[0] * self.schedule.lr_lambdas[0](step - 1)

    def state(self) -> dict:
        """The part's adapter, optimizer and schedule: what a bit-exact resume needs of it."""
        adapter = {k: v.detach().cpu().clone() for k, v in self.part.adapter_state().items()}
        return {"adapter": adapter, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state(self, state: dict) -> None:
        self.part.load_adapter_state(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])

    def schedule_to(self, step: int) -> None:
        """The learning-rate schedule as if this part had stepped through `step` (a client that sat
        rounds out follows the job's steps)."""
        with warnings.catch_warnings():  # (stepping the schedule without the optimizer, on purpose)
            warnings.simplefilter("ignore", UserWarning)
            while self.schedule.last_epoch < step:
                self.schedule.step()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)


def server_update(
    trainer: PartTrainer,
    step: int,
    activations: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float,
) -> tuple[float, torch.Tensor]:
    """The server's half of a step: loss over the batch, server step, and the gradient w.r.t.
    the activations it was given (for the client part)."""
    h = activations.detach().requires_grad_()
    loss_sum, n = lm_loss_sum(trainer.part(h, attention_mask), labels, label_smoothing)
    loss = apply_loss(trainer, step, loss_sum, n)
    assert h.grad is not None
    return loss, h.grad


def apply_loss(trainer: PartTrainer, step: int, loss_sum: torch.Tensor, n: int) -> float:
    """Backward of the token-mean loss, then the step. A non-finite loss raises `Diverged`
    before any weight changes."""
    loss = loss_sum / n
    if not torch.isfinite(loss):
        raise Diverged(step, float(loss.detach()))
    loss.backward()
    trainer.step()
    return float(loss.detach())


@torch.no_grad()
def eval_loss_sum(
    server_part: SplitPart, activations: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[float, int]:
    """Summed validation loss (no smoothing) and its target-token count."""
    loss_sum, n = lm_loss_sum(server_part(activations, attention_mask), labels)
    return float(loss_sum), n


@torch.no_grad()
def evaluate_whole(client_part: SplitPart, server_part: SplitPart, val: EncodedData, batch_size: int) -> float:
    """Validation loss of the whole model (both parts in one process) over every row (rank 0:
    progress lines when it takes long)."""
    device = next(client_part.parameters()).device
    total, count = 0.0, 0
    progress = Progress("eval", len(val))
    for start in range(0, len(val), batch_size):
        batch = make_batch(val, list(range(start, min(start + batch_size, len(val))))).to(device)
        loss_sum, n = eval_loss_sum(server_part, client_part(batch.input_ids, batch.attention_mask),
                                    batch.attention_mask, batch.labels)  # fmt: skip
        total, count = total + loss_sum, count + n
        progress.add(len(batch.input_ids))
    progress.finish()
    return total / count


def is_aggregation_step(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.aggregate_every == 0 or step == cfg.steps


def aggregations_until(step: int, cfg: TrainConfig) -> int:
    """FedAvg rounds done by the end of `step`."""
    return step // cfg.aggregate_every + (1 if step == cfg.steps and step % cfg.aggregate_every else 0)


def is_checkpoint_step(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def checkpoint_or_stop(step: int, every: int, stopping: bool, on_checkpoint: Callable[[int], None]) -> None:
    """End of a step on every rank alike: a checkpoint when due or when a signal stops the
    job, then `Stopped` (exit 143) in the latter case."""
    if stopping or is_checkpoint_step(step, every):
        on_checkpoint(step)
    if stopping:
        raise Stopped(step)


def is_eval_step(step: int, cfg: TrainConfig) -> bool:
    return (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == cfg.steps


def sl_owner(step: int, cfg: TrainConfig, num_clients: int) -> int:
    """sl mode: the client (0-based) that trains `step`; clients take turns of aggregate_every steps."""
    return (step - 1) // cfg.aggregate_every % num_clients


def sl_steps_owned(before: int, client: int, cfg: TrainConfig, num_clients: int) -> int:
    """sl mode: steps 1..before that `client` trained (its sampler position in batches)."""
    return sum(1 for s in range(1, before + 1) if sl_owner(s, cfg, num_clients) == client)
