"""FedLoRA: every client trains the whole model with LoRA on its own data; one Allreduce
over every rank averages the adapters each round. Rank 0 evaluates and logs."""

from __future__ import annotations

from ..config import JobConfig
from .base import ClientRole, Lead, Mode, Setup


class FedLoRA(Mode):
    name = "fedlora"
    resizable = True
    lead_reads = ("val",)  # rank 0 evaluates the averaged whole model

    def not_elastic(self, cfg: JobConfig) -> str | None:
        return None

    def takes_joins(self, cfg: JobConfig) -> bool:
        """A joining client trains on its own data ({client} paths or data.partition local)."""
        return cfg.data.scheme == "local"

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
