"""SplitLoRA: clients run the first blocks on their own data in parallel, the server the
rest on all their activations at once; client adapters are averaged (FedAvg) every
`train.aggregate_every` steps. Clients may have their own cut points."""

from __future__ import annotations

from typing import Any

from ..config import JobConfig
from ..errors import ConfigError
from .base import ClientRole, Lead, Mode, Setup


def check_cut_points(cfg: JobConfig, num_clients: int) -> None:
    cuts = cfg.split.cuts()
    if len(cuts) > 1 and len(cuts) != num_clients:
        raise ConfigError(
            f"config key 'split.client_layers': {len(cuts)} cut points for {num_clients} clients; expected one "
            "value per client (or a single value for all)"
        )


def not_elastic_step(cfg: JobConfig) -> str | None:
    """The split step is elastic in its plain form (splitlora, sl); why not with these options."""
    options = {"split.label_private": cfg.split.label_private, "comm.micro_batches > 1": cfg.comm.micro_batches > 1,
               "split.server_update sequential": cfg.split.server_update == "sequential",
               "per-client split.client_layers": len(cfg.split.cuts()) > 1}  # fmt: skip
    on = [k for k, v in options.items() if v]
    return f"{on[0]} is not elastic yet" if on else None


class SplitLoRA(Mode):
    name = "splitlora"
    resizable = True

    def check_clients(self, cfg: JobConfig, num_clients: int) -> None:
        check_cut_points(cfg, num_clients)

    def not_elastic(self, cfg: JobConfig) -> str | None:
        """The plain joint step is elastic; the other schedules are not (yet)."""
        return not_elastic_step(cfg)

    def takes_joins(self, cfg: JobConfig) -> bool:
        """A joining client trains on its own data ({client} paths or data.partition local)."""
        return cfg.data.scheme == "local"

    def lead(self, s: Setup) -> Lead:
        from ..roles.server import Server

        return Server(s.cfg, s.part("server"), s.channel, s.clients, s.roster)

    def client(self, s: Setup) -> ClientRole:
        from ..roles.client import Client

        train, val = s.data("train"), s.data("val")
        part = s.part("client", s.index)
        return Client(s.cfg, part, train, s.rows(train), val, s.channel, s.index, len(s.clients), s.elastic)

    def share(self, cfg: JobConfig, hellos: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Per-client cut points: every client-side adapter tensor (key: shape), for FedAvg by key."""
        if len(cfg.split.cuts()) == 1:
            return {}
        return {"layout": {k: v for h in hellos.values() for k, v in h["adapter_shapes"].items()}}

    def exporter(self, cfg: JobConfig, clients: list[int], elastic: bool = False) -> int | None:
        """After the final average every client holds the same values of its blocks: the one
        with the most blocks has them all."""
        cuts = cfg.split.cuts()
        return clients[cuts.index(max(cuts))]
