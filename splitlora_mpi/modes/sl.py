"""SL (vanilla split learning): one client model travels from client to client in turns of
`train.aggregate_every` steps; the server trains on one client's activations per step.
Under an elastic launch the client model travels through rank 0 (roles/relay.py), which
therefore holds it for checkpoints and the export."""

from __future__ import annotations

from ..config import JobConfig
from .base import ClientRole, Lead, Mode, Setup
from .splitlora import not_elastic_step


class SL(Mode):
    name = "sl"

    def not_elastic(self, cfg: JobConfig) -> str | None:
        return not_elastic_step(cfg)

    def lead(self, s: Setup) -> Lead:
        if s.elastic:
            from ..roles.relay import RelayServer

            return RelayServer(s.cfg, s.part("server"), s.channel, s.clients, s.roster)
        from ..roles.turns import TurnServer

        return TurnServer(s.cfg, s.part("server"), s.channel, s.clients)

    def client(self, s: Setup) -> ClientRole:
        from ..roles.relay import RelayClient
        from ..roles.turns import TurnClient

        train, val = s.data("train"), s.data("val")
        part = s.part("client", s.index)
        role = RelayClient if s.elastic else TurnClient
        return role(s.cfg, part, train, s.rows(train), val, s.channel, s.index, len(s.clients))

    def savers(self, cfg: JobConfig, step: int, clients: list[int], elastic: bool = False) -> list[int]:
        """Only the client whose turn it is holds the travelling client model (elastic: rank 0's copy)."""
        from ..training import sl_owner

        return [] if elastic else [clients[sl_owner(step, cfg.train, len(clients))]]

    def exporter(self, cfg: JobConfig, clients: list[int], elastic: bool = False) -> int | None:
        """The client that trained last holds the travelling client model (elastic: rank 0's copy)."""
        from ..training import sl_owner

        return None if elastic else clients[sl_owner(cfg.train.steps, cfg.train, len(clients))]
