"""FedLoRA: every client trains the whole model with LoRA on its own data; one Allreduce
over every rank averages the adapters each round. Rank 0 evaluates and logs."""

from __future__ import annotations

from ..config import CLIENT, JobConfig
from ..errors import ConfigError
from .base import ClientRole, Lead, Mode, Setup, check_partial_participation, refuse_cut_options


class FedLoRA(Mode):
    name = "fedlora"
    resizable = True
    lead_reads = ("val",)  # rank 0 evaluates the averaged whole model

    def check_config(self, cfg: JobConfig) -> None:
        check_partial_participation(cfg, "fedlora")
        refuse_cut_options(cfg)
        if CLIENT in (cfg.data.val_path or ""):
            raise ConfigError(
                "config key 'data.val_path': fedlora's rank 0 evaluates the averaged model on one shared "
                f"validation file; expected a path without {CLIENT} (or run.mode splitlora / sl)"
            )
        every, t = cfg.checkpoint.every, cfg.train
        if every and every % t.aggregate_every:
            raise ConfigError(
                f"config key 'checkpoint.every': fedlora checkpoints at the end of a round; expected a multiple of "
                f"train.aggregate_every ({t.aggregate_every}), got {every}"
            )

    def not_elastic(self, cfg: JobConfig) -> str | None:
        return None

    def lead(self, s: Setup) -> Lead:
        from ..roles.fedavg import FedServer

        val = s.data("val")
        return FedServer(s.cfg, s.part("client"), s.part("server"), val, s.transport, s.roster)

    def client(self, s: Setup) -> ClientRole:
        from ..roles.fedavg import FedClient
        from ..roles.whole import WholeModel

        train, val = s.data("train"), s.data("val")
        parts = s.part("client", s.index), s.part("server")  # the whole model, as two parts (exactly as central)
        local = WholeModel(s.cfg, *parts, train, s.rows(train), val, s.transport.metrics, s.index)
        return FedClient(local, s.transport, s.elastic)
