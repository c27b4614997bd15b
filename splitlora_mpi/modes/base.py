"""The interface every training scheme implements, and what the runner hands it.

A mode decides which role each rank plays and what that role holds; the runner does the
rest alike for every mode (data, handshake, checkpoints, export, outputs, metrics). Adding
a mode = one module here implementing `Mode`, one line in `modes/__init__.py` and its config
rules in `rules.py` (checked when the config loads, before any mode is imported).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:  # (modes load with the config, before torch: fast failure on bad input)
    import torch
    from transformers import PretrainedConfig

    from ..config import ElasticConfig, JobConfig
    from ..data import EncodedData, Tokenizer
    from ..model import SplitPart
    from ..roles.roster import Roster
    from ..training import OnStep
    from ..wire import Transport
    from ..wire.messages import Channel


class Lead(Protocol):
    """Rank 0's role: it runs the step loop the log follows, and holds the run's outputs."""

    parts: list[SplitPart]  # what this rank holds, client side first
    tokens: int

    def meet(self, hellos: dict[int, dict[str, Any]]) -> None: ...
    def run(self, on_step: OnStep, start: int, on_checkpoint: Callable[[int], None],
            stop_requested: Callable[[], bool]) -> None: ...  # fmt: skip
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def adapter_state(self) -> dict[str, torch.Tensor]: ...  # this rank's share of the exported adapter
    def trainable_params(self) -> int: ...
    def client_peer_bytes(self, step: int) -> int: ...  # what clients sent each other (rank 0 cannot see it)


class ClientRole(Protocol):
    parts: list[SplitPart]
    tokens: int
    eval_rows: int  # validation rows it sends rank 0 per evaluation

    def accept(self, verdict: dict[str, Any]) -> None: ...
    def run(self, start: int, on_checkpoint: Callable[[int], None], stop_requested: Callable[[], bool]) -> None: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def adopt(self, saved: dict[str, Any], step: int) -> None: ...  # another client's checkpoint (resume)
    def join(self, step: int, on_checkpoint: Callable[[int], None]) -> int: ...  # joined the running job


@dataclass
class Setup:
    """What the runner built for this rank, for the mode to build a role from."""

    cfg: JobConfig
    config: PretrainedConfig  # the Hugging Face model config
    tokenizer: Tokenizer
    transport: Transport
    channel: Channel
    device: torch.device
    clients: list[int]  # client ranks (none in a one-rank mode)
    data: Callable[[str], EncodedData]  # "train" / "val": the encoded rows of this rank's file
    rows: Callable[[EncodedData], list[int]]  # this rank's training rows
    elastic: ElasticConfig | None = None  # an elastic launch that this mode and config support
    roster: Roster | None = None  # rank 0: the live clients

    @property
    def index(self) -> int:
        """This client's index (0-based)."""
        return self.transport.rank - 1

    def part(self, role: str, client: int = 0) -> SplitPart:
        from ..model import SplitPart

        return SplitPart(self.cfg, self.config, role, self.device, client)  # type: ignore[arg-type]


class Mode(ABC):
    name: ClassVar[str]
    one_rank: ClassVar[bool] = False  # central: one process, no mpirun, no clients
    lead_role: ClassVar[str] = "server"  # rank 0's name in metrics and summary.json
    lead_reads: ClassVar[tuple[str, ...]] = ()  # the data ("train", "val") rank 0's role reads
    client_reads: ClassVar[tuple[str, ...]] = ("train", "val")
    resizable: ClassVar[bool] = False  # resumes a checkpoint written with another number of clients

    def check_clients(self, cfg: JobConfig, num_clients: int) -> None:
        """This mode's rules on the number of clients, checked by every rank before its heavy imports."""
        return None

    def takes_joins(self, cfg: JobConfig) -> bool:
        """Whether a client may join this job while it runs (its data must be its own)."""
        return False

    def not_elastic(self, cfg: JobConfig) -> str | None:
        """Why this mode with this config cannot go on without a lost client (None: it can)."""
        return f"run.mode {self.name} is not elastic yet"

    @abstractmethod
    def lead(self, s: Setup) -> Lead:
        """Rank 0's role. Errors here reach every client through the handshake."""

    def client(self, s: Setup) -> ClientRole:
        raise NotImplementedError(f"{self.name} has no clients")

    def share(self, cfg: JobConfig, hellos: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """What rank 0 tells every client with the handshake's verdict, beyond the resume step."""
        return {}

    def savers(self, cfg: JobConfig, step: int, clients: list[int], elastic: bool = False) -> list[int]:
        """The clients whose state a checkpoint of `step` holds (`elastic`: an elastic run)."""
        return clients

    def exporter(self, cfg: JobConfig, clients: list[int], elastic: bool = False) -> int | None:
        """The client rank that sends rank 0 the final client-side adapter (None: rank 0 has it)."""
        return None

    def summary(self, lead: Lead, stats: dict[int, dict[str, Any]], rss_mb: float) -> dict[str, Any]:
        """summary.json facts on the clients: `stats` is what each client reported at the end (in
        the order the reports arrived; every per-client fact is keyed by rank, in rank order)."""
        return {
            "num_clients": len(stats),
            "tokens_by_client": by_rank(stats, lambda s: s["tokens"]),
            "client_trainable_params": max(s["trainable_params"] for s in stats.values()),
            "server_trainable_params": lead.trainable_params(),
            "peak_rss_mb": {"server": rss_mb, "client_max": max(s["peak_rss_mb"] for s in stats.values())},
            "peak_rss_mb_by_client": by_rank(stats, lambda s: round(s["peak_rss_mb"], 1)),
        }


def by_rank(per_client: dict[int, Any], fact: Callable[[Any], Any]) -> dict[str, Any]:
    """A per-client fact of summary.json: keyed by the client's rank (a JSON key: a string), in rank order."""
    return {str(rank): fact(per_client[rank]) for rank in sorted(per_client)}
