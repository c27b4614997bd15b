"""The server rank: the blocks after the cut, the final norm and LM head, one shared LoRA.

Per step: take every active client's upload in arrival order, join them in (cut point, rank)
order (deterministic), compute the token-averaged loss (here, or on the clients' tails with
label privacy), step, and return each client the gradient of the activations it sent.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import aggregate
from ..config import JobConfig
from ..data import target_count
from ..errors import Diverged, Stopped
from ..model import SplitPart
from ..progress import Progress
from ..training import (
    OnStep,
    PartTrainer,
    aggregations_until,
    apply_loss,
    checkpoint_or_stop,
    is_aggregation_step,
    is_eval_step,
    lm_loss_sum,
)
from ..wire import CONTINUE, DIVERGED, EVAL, EVAL_TAIL, RELAY, STOP, TAIL, TRAIN
from ..wire.messages import (
    Channel,
    EvalSums,
    EvalTailInput,
    GradientReply,
    Labels,
    Letter,
    MicroUpload,
    PrivateUpload,
    TailInput,
    TailReply,
    Upload,
)
from .participation import AllTrain, Sampled
from .roster import Roster, ServerSum

Uploads = dict[int, Letter[Any]]  # client rank -> its Upload / PrivateUpload


class ServerLoss:
    """The plain split: the labels come with the activations; loss, backward and step here."""

    upload = Upload

    def __init__(self, trainer: PartTrainer, label_smoothing: float):
        self.trainer = trainer
        self.label_smoothing = label_smoothing

    def train(self, step: int, out: torch.Tensor, uploads: Uploads, h: dict[int, torch.Tensor]) -> float:
        labels = torch.cat([uploads[r].body.labels for r in h]).long()
        loss_sum, n = lm_loss_sum(out, labels, self.label_smoothing)
        return apply_loss(self.trainer, step, loss_sum, n)

    def evaluate(self, step: int, out: torch.Tensor, uploads: Uploads, h: dict[int, torch.Tensor]) -> tuple[float, int]:
        loss_sum, n = lm_loss_sum(out, torch.cat([uploads[r].body.labels for r in h]).long())
        return float(loss_sum), n


class ClientTailLoss:
    """Label privacy: each client gets its rows of the output (and the batch's target count),
    computes the loss on its own tail and returns the output's gradient and its loss sum."""

    upload = PrivateUpload

    def __init__(self, trainer: PartTrainer, channel: Channel):
        self.trainer = trainer
        self.channel = channel

    def train(self, step: int, out: torch.Tensor, uploads: Uploads, h: dict[int, torch.Tensor]) -> float:
        total = torch.cat([uploads[r].body.targets for r in h]).sum().reshape(1).cpu()
        outputs = dict(zip(h, out.split([x.shape[0] for x in h.values()])))
        self.channel.send(TAIL, step, {r: TailInput(o, total) for r, o in outputs.items()})
        back = self.channel.recv(list(h), TAIL, TailReply)
        loss = sum(float(back[r].body.loss_sum) for r in h) / int(total)
        if not math.isfinite(loss):
            raise Diverged(step, loss)
        out.backward(torch.cat([back[r].body.gradient for r in h]))
        self.trainer.step()
        return loss

    def evaluate(self, step: int, out: torch.Tensor, uploads: Uploads, h: dict[int, torch.Tensor]) -> tuple[float, int]:
        outputs = dict(zip(h, out.split([x.shape[0] for x in h.values()])))
        self.channel.send(EVAL_TAIL, step, {r: EvalTailInput(o) for r, o in outputs.items()})
        sums = [s.body.sums for s in self.channel.recv(list(h), EVAL_TAIL, EvalSums).values()]
        return sum(float(s[0]) for s in sums), int(sum(float(s[1]) for s in sums))


class Server:
    def __init__(
        self,
        cfg: JobConfig,
        part: SplitPart,
        channel: Channel,
        clients: list[int],
        roster: Roster | None = None,
    ):
        """`roster`: the live clients (an elastic one gives up on a silent client, see
        roles/roster.py); None: a fixed roster of `clients`."""
        self.cfg = cfg
        self.part = part
        self.parts = [part]
        sequential = cfg.split.server_update == "sequential"
        self.trainer = PartTrainer(part, cfg.train, updates_per_step=len(clients) if sequential else 1)
        self.channel = channel
        self.metrics = channel.transport.metrics
        self.clients = sorted(clients)
        self.cut = {c: cfg.split.cut_of(c - 1) for c in self.clients}  # the block each client's rows enter at
        self.eval_rows: dict[int, int] = {}  # validation rows each client sends (from the handshake)
        self.micro_batches = cfg.comm.micro_batches
        self.loss = ClientTailLoss(self.trainer, channel) if cfg.split.label_private else ServerLoss(
            self.trainer, cfg.train.label_smoothing)  # fmt: skip
        self.exchange = (self._one_by_one if sequential else
                         self._micro_batches if self.micro_batches > 1 else self._whole_batch)  # fmt: skip
        self.client_adapters: dict[int, dict[str, list[int]]] | None = None
        self.client_adapter_numel = 0
        self.roster = roster or Roster(clients, channel.transport)
        self.roster.on_admit = self.admit
        partial = 0 < cfg.train.clients_per_round < len(clients)  # (K >= N: every client, as K = 0)
        self.participation = Sampled(self.roster, channel.transport, cfg) if partial else AllTrain(self.roster)
        self.sum = ServerSum(self.roster, channel.transport, relay=partial)
        # rank 0's part in FedAvg: none (the clients' Allreduce), a sum through rank 0 (elastic or
        # partial participation), or its copies of client blocks (per-client cut points, see meet)
        self.aggregate: Callable[[int, bool], Any] = self._sum_round if self.roster.elastic or partial else (
            lambda step, stopping: None)  # fmt: skip
        self.tokens_since_average = dict.fromkeys(self.clients, 0)
        self.tokens = 0

    def meet(self, hellos: dict[int, dict[str, Any]]) -> None:
        """What the handshake told of the clients. With per-client cut points, each client's
        adapter tensors (key: shape): the server's copies of blocks some clients hold join
        their FedAvg."""
        self.eval_rows = {c: hellos[c]["eval_rows"] for c in self.clients}
        self.client_adapter_numel = hellos[self.clients[0]]["adapter_numel"]
        self.roster.meet(hellos)
        if len(self.cfg.split.cuts()) > 1:
            self.client_adapters = {c: hellos[c]["adapter_shapes"] for c in self.clients}
            self.aggregate = lambda step, stopping: self.average()

    # ------------------------------------------------------------ the loop

    def run(self, on_step: OnStep, start: int, on_checkpoint: Callable[[int], None],
            stop_requested: Callable[[], bool]) -> None:  # fmt: skip
        """Steps start+1 .. train.steps. A stop asked for by a signal here or on any client ends
        every rank after the same step."""
        t = self.cfg.train
        for step in range(start + 1, t.steps + 1):
            self.roster.begin(step)
            self.participation.begin(step, resumed=step == start + 1 and start > 0)
            lr = self.trainer.lr
            loss, tokens, stopping = self.train_step(step, stop_requested())
            if is_aggregation_step(step, t):
                self.aggregate(step, stopping)
            elif stopping:
                self.participation.stop(step)
            val = self.evaluate(step) if is_eval_step(step, t) else None
            self.end_step(step, stopping)
            on_step(step, loss, tokens, lr, val)
            try:
                checkpoint_or_stop(step, self.cfg.checkpoint.every, stopping, on_checkpoint)
            except Stopped:
                if self.roster.below_min:
                    raise self.roster.too_few(step) from None
                raise

    def end_step(self, step: int, stopping: bool) -> None:
        """After a step's evaluation, before its log line and checkpoint: nothing here (elastic sl
        takes the travelling client model back, roles/relay.py)."""

    def active(self, step: int) -> list[int]:
        """The clients that send activations in `step` (the live ones, or this round's draw), in
        batch order: by cut point, then rank."""
        return self.batch_order(self.participation.members(step))

    def evaluators(self, step: int) -> list[int]:
        """The clients that send validation rows: every live one (each holds the latest average)."""
        return self.batch_order(self.roster.live)

    def batch_order(self, clients: list[int]) -> list[int]:
        return sorted(clients, key=lambda c: (self.cut[c], c))

    def _sum_round(self, step: int, stopping: bool) -> None:
        """FedAvg through rank 0: the sum over the clients that trained, and to the idle ones and
        the ones that joined during the round."""
        summed = self.sum(step, self.participation.members(step))
        self.participation.share(step, summed, stopping)
        self.roster.welcome(step, summed, stopping)

    def admit(self, rank: int, hello: dict[str, Any]) -> None:
        """A client that joined the running job (one cut point: it enters where the others do)."""
        self.cut[rank] = self.cfg.split.cut_of(0)
        self.eval_rows[rank] = hello["eval_rows"]
        self.tokens_since_average[rank] = 0

    def train_step(self, step: int, stop_requested: bool = False) -> tuple[float, int, bool]:
        """One step; returns (loss, tokens, whether every rank stops after it)."""
        start = time.perf_counter()
        loss, masks, stopping = self.exchange(step, self.active(step), stop_requested)
        self.roster.took_part(step, list(masks))
        per_client = {r: int(m.sum()) for r, m in masks.items()}
        for r, n in per_client.items():
            self.tokens_since_average[r] += n
        tokens = sum(per_client.values())
        self.tokens += tokens
        self.metrics.step(step, time.perf_counter() - start, tokens, loss)
        return loss, tokens, stopping

    # ------------------------------------------------------------ the three schedules of a step

    def _whole_batch(self, step: int, active: list[int], stopping: bool) -> tuple[float, dict, bool]:
        """Every client's whole batch at once; the loss where `self.loss` computes it. Elastic:
        the batch is the rows of the clients whose upload arrived within client_timeout_s (a
        client lost after its upload arrived still counts in this step's server update)."""
        roster = self.roster
        uploads = roster.keep(active, self.channel.recv(active, TRAIN, self.loss.upload, roster.give_up_s), step)
        stopping = stopping or roster.below_min or any(u.flag == STOP for u in uploads.values())
        if not uploads:
            return float("nan"), {}, True
        out, h = self.forward(uploads, step, requires_grad=True)
        try:
            loss = self.loss.train(step, out, uploads, h)
        except Diverged:  # every client must stop too, before it updates anything
            self.reply(step, {r: torch.zeros_like(x) for r, x in h.items()}, DIVERGED)
            raise
        self.reply(step, {r: x.grad for r, x in h.items()}, STOP if stopping else CONTINUE)
        return loss, {r: u.body.mask for r, u in uploads.items()}, stopping

    def _micro_batches(self, step: int, active: list[int], stopping: bool) -> tuple[float, dict, bool]:
        """With every client's labels in hand (the step's target count), each micro-batch is
        forwarded, backpropagated and its gradients returned as soon as it has arrived from all
        clients; one optimizer step at the end. The last reply carries the flag."""
        labels = self.channel.recv(active, TRAIN, Labels)
        stopping = stopping or any(u.flag == STOP for u in labels.values())
        total = sum(target_count(u.body.side[1]) for u in labels.values())
        chunks = {r: u.body.side.chunk(self.micro_batches, dim=1) for r, u in labels.items()}
        loss_sum, waits = 0.0, []
        for i in range(self.micro_batches):
            micro = self.channel.recv(active, TRAIN, MicroUpload)
            uploads = {r: Letter(m.step, m.flag, Upload(m.body.activations, chunks[r][i])) for r, m in micro.items()}
            out, h = self.forward(uploads, step, requires_grad=True)
            part_sum, _ = lm_loss_sum(out, torch.cat([uploads[r].body.labels for r in h]).long(),
                                      self.cfg.train.label_smoothing)  # fmt: skip
            loss_sum += float(part_sum.detach())
            (part_sum / total).backward()
            if i < self.micro_batches - 1:  # (not waiting: the clients finish sending before they receive)
                waits.append(self.reply(step, {r: x.grad for r, x in h.items()}, CONTINUE, wait=False))
        for wait in waits:
            wait()
        loss = loss_sum / total
        if not math.isfinite(loss):  # the clients have not stepped: the last reply stops them
            self.reply(step, {r: torch.zeros_like(x) for r, x in h.items()}, DIVERGED)
            raise Diverged(step, loss)
        self.trainer.step()
        self.reply(step, {r: x.grad for r, x in h.items()}, STOP if stopping else CONTINUE)
        return loss, {r: u.body.side[0] for r, u in labels.items()}, stopping

    def _one_by_one(self, step: int, active: list[int], stopping: bool) -> tuple[float, dict, bool]:
        """split.server_update sequential (the official SplitLoRA code's schedule): each client's
        batch alone, in rank order (deterministic: resume stays bit-exact): forward, loss,
        backward, a server step, and that client's gradient sent at once, so it updates while the
        server works on the next. The step's loss: the clients' losses weighted by target tokens."""
        uploads = self.channel.recv(active, TRAIN, Upload)
        stopping = stopping or any(u.flag == STOP for u in uploads.values())
        loss_sum, targets, waits = 0.0, 0, []
        order = sorted(active)
        for i, r in enumerate(order):
            out, h = self.forward({r: uploads[r]}, step, requires_grad=True)
            try:
                loss = self.loss.train(step, out, uploads, h)
            except Diverged as e:  # the clients not answered yet stop before they update; rank 0 aborts the others
                self.reply(step, dict.fromkeys(order[i:], torch.zeros(1)), DIVERGED)
                e.others_running = i > 0
                raise
            waits.append(self.reply(step, {r: h[r].grad}, STOP if stopping else CONTINUE, wait=False))
            n = target_count(uploads[r].body.labels)
            loss_sum, targets = loss_sum + loss * n, targets + n
        for wait in waits:
            wait()
        return loss_sum / targets, {r: u.body.mask for r, u in uploads.items()}, stopping

    # ------------------------------------------------------------ pieces

    def forward(self, uploads: Uploads, step: int, requires_grad: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The server part over every upload (clients that share a cut point form one batch):
        (output, the activations per client in batch order)."""
        for rank, u in uploads.items():
            if u.step != step:
                raise RuntimeError(f"rank 0: rank {rank} sent activations of step {u.step} during step {step}")
        order = self.batch_order(list(uploads))
        h = {r: uploads[r].body.activations.requires_grad_(requires_grad) for r in order}
        inputs = []
        for cut in sorted({self.cut[r] for r in order}):
            group = [r for r in order if self.cut[r] == cut]
            inputs.append(
                (cut, torch.cat([h[r] for r in group]), torch.cat([uploads[r].body.mask for r in group]).long())
            )
        return self.part.forward_joined(inputs), h

    def reply(self, step: int, grads: dict[int, torch.Tensor], flag: int, wait: bool = True) -> Callable[[], None]:
        """Each client the gradient of the activations it sent; returns the wait for completion.
        After a loss or a join every reply carries RELAY (the clients' FedAvg goes through rank 0)."""
        roster = self.roster
        flag |= RELAY if roster.relaying else 0
        records = {c: GradientReply(g) for c, g in grads.items()}
        sending = self.channel.isend(TRAIN, step, records, flag, roster.give_up_s)

        def done() -> None:
            roster.lose(sending(), step)

        if wait:
            done()
        return done

    def average(self) -> None:
        """Per-client cut points: the server's copy of a block that some clients hold is one
        more holder in that block's FedAvg, weighted by the tokens of the clients it ran for."""
        assert self.client_adapters is not None
        layout = {k: v for a in self.client_adapters.values() for k, v in a.items()}
        state = {k: v for k, v in self.part.adapter_state().items() if k in layout}
        weights = {k: float(sum(n for c, n in self.tokens_since_average.items() if k not in self.client_adapters[c]))
                   for k in state}  # fmt: skip
        world = functools.partial(self.channel.transport.allreduce_sum, world=True)
        self.part.load_adapter_state(aggregate.fedavg_by_key(state, weights, layout, world))
        self.tokens_since_average = dict.fromkeys(self.clients, 0)

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Validation loss over every live client's rows, round by round (one batch per client)."""
        active = self.evaluators(step)
        b = self.cfg.train.batch_size
        batches = {c: -(-self.eval_rows[c] // b) for c in active}
        total, count = 0.0, 0
        progress = Progress("eval", sum(self.eval_rows[c] for c in active))
        for i in range(max(batches.values(), default=0)):
            due = [c for c in active if batches[c] > i and c in self.roster.live]
            uploads = self.roster.keep(due, self.channel.recv(due, EVAL, self.loss.upload, self.roster.give_up_s), step)
            if uploads:
                out, h = self.forward(uploads, step, requires_grad=False)
                loss_sum, n = self.loss.evaluate(step, out, uploads, h)
                total, count = total + loss_sum, count + n
            progress.add(sum(min(b, self.eval_rows[c] - i * b) for c in uploads))
        progress.finish()
        val = total / count if count else float("nan")
        self.metrics.val_loss(val)
        return val

    # ------------------------------------------------------------ for the runner

    def state(self) -> dict[str, Any]:
        return {"trainer": self.trainer.state(), "tokens": self.tokens,
                "tokens_since_average": self.tokens_since_average}  # fmt: skip

    def load_state(self, state: dict[str, Any]) -> None:
        self.trainer.load_state(state["trainer"])
        self.tokens = state["tokens"]
        saved = state["tokens_since_average"]  # (keyed by the clients of the checkpoint: there may be more now)
        self.tokens_since_average = {c: saved.get(c, 0) for c in self.clients}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self.part.adapter_state()

    def trainable_params(self) -> int:
        return self.part.trainable_numel()

    def client_peer_bytes(self, step: int) -> int:
        """What clients sent each other by the end of `step` (rank 0 sees everything else):
        FedAvg's Allreduce, each client's buffer its adapter and weight in float64 (per-client
        cut points: every rank's buffer of the world Allreduce is the size of rank 0's)."""
        if self.client_adapters is not None:
            return len(self.clients) * self.metrics.sent_bytes[("all", "adapters")]
        return aggregations_until(step, self.cfg.train) * len(self.clients) * (self.client_adapter_numel + 1) * 8
