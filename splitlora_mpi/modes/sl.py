"""SL (vanilla split learning): one client model travels from client to client in turns of
`train.aggregate_every` steps; the server trains on one client's activations per step."""

from __future__ import annotations

from ..config import JobConfig
from .base import ClientRole, Lead, Mode, Setup, check_partial_participation, refuse_option, refuse_per_client_cuts


class SL(Mode):
    name = "sl"

    def check_config(self, cfg: JobConfig) -> None:
        check_partial_participation(cfg, "sl")
        refuse_per_client_cuts(cfg)
        refuse_option(cfg, "split.server_update", "sequential",
                      "is what sl's server does anyway (one client per step); expected joint")  # fmt: skip
        refuse_option(cfg, "train.fedavg_weights", "uniform",
                      "weights a FedAvg, which sl does not run (its model travels); expected tokens")  # fmt: skip

    def lead(self, s: Setup) -> Lead:
        from ..roles.turns import TurnServer

        return TurnServer(s.cfg, s.part("server"), s.channel, s.clients)

    def client(self, s: Setup) -> ClientRole:
        from ..roles.turns import TurnClient

        train, val = s.data("train"), s.data("val")
        part = s.part("client", s.index)
        return TurnClient(s.cfg, part, train, s.rows(train), val, s.channel, s.index, len(s.clients))

    def savers(self, cfg: JobConfig, step: int, clients: list[int]) -> list[int]:
        """Only the client whose turn it is holds the travelling client model."""
        from ..training import sl_owner

        return [clients[sl_owner(step, cfg.train, len(clients))]]

    def exporter(self, cfg: JobConfig, clients: list[int]) -> int | None:
        """The client that trained last holds the travelling client model."""
        from ..training import sl_owner

        return clients[sl_owner(cfg.train.steps, cfg.train, len(clients))]
