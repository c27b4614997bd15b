"""CenLoRA, the central baseline: one rank, the whole model, all data; no mpirun."""

from __future__ import annotations

from typing import Any

from .base import Lead, Mode, Setup


class Central(Mode):
    name = "central"
    one_rank = True
    lead_role = "central"
    lead_reads = ("train", "val")

    def lead(self, s: Setup) -> Lead:
        from ..roles.whole import WholeModel

        train, val = s.data("train"), s.data("val")
        return WholeModel(s.cfg, s.part("client"), s.part("server"), train, s.rows(train), val, s.transport.metrics)

    def summary(self, lead: Lead, stats: dict[int, dict[str, Any]], rss_mb: float) -> dict[str, Any]:
        """The one rank is the one client too."""
        client, server = (part.trainable_numel() for part in lead.parts)
        return {
            "num_clients": 1,
            "tokens_by_client": {"0": lead.tokens},
            "client_trainable_params": client,
            "server_trainable_params": server,
            "peak_rss_mb": {"server": rss_mb, "client_max": rss_mb},
        }
