"""SL (vanilla split learning): one client model travels from client to client in turns of
`train.aggregate_every` steps; the server trains on one client's activations per step."""

from __future__ import annotations

from ..config import JobConfig
from .base import ClientRole, Lead, Mode, Setup


class SL(Mode):
    name = "sl"

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
