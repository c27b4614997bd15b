"""Before the heavy imports: every check of this rank's input that needs no torch, and the
exchange that stops every rank alike on the first error. Files exist and parse, each client
has examples after partitioning, the split fits the model the config states, the output
directory is writable: a bad input exits 2 in about a second, not after every rank imported
torch and built its model. The full checks still run later (the handshake)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import JobConfig
from ..data import Example, check_tokenizer_path, read_split, rows_of
from ..errors import ConfigError
from ..fsutil import check_writable
from ..layout import blocks_of, check_model_path, check_positions, stated_size
from ..modes import Mode
from ..wire import PREFLIGHT, SERVER, Transport
from .handshake import client_handshake, server_handshake


@dataclass
class Checked:
    """This rank's verdict on its input, and the examples it read on the way (the run encodes
    these instead of reading the files again)."""

    error: str | None = None
    examples: dict[str, list[Example]] = field(default_factory=dict)  # "train" / "val"


def check(cfg: JobConfig, mode: Mode, rank: int, size: int) -> Checked:
    """This rank's checks, in the order the run would meet them (rank 0 alone writes outputs;
    a rank reads only the data its role reads: in splitlora and sl rank 0 opens no data file)."""
    checked = Checked()
    clients = size - 1
    try:
        if rank == SERVER:
            check_writable(cfg.out_dir)
        check_tokenizer_path(cfg.model.tokenizer)
        check_model_path(cfg)
        mode.check_clients(cfg, clients)
        for which in mode.lead_reads if rank == SERVER else mode.client_reads:
            checked.examples[which] = read_split(cfg, which, rank or None)
        blocks, positions = stated_size(cfg)
        if blocks is not None:
            blocks_of(cfg, blocks, "server")  # (raises for a cut point that leaves a side no block)
        check_positions(cfg, positions)
        if "train" in checked.examples:
            rows_of(cfg, [ex.group for ex in checked.examples["train"]], clients, rank)
    except ConfigError as e:
        checked.error = str(e)
    return checked


def agree(transport: Transport, cfg: JobConfig, checked: Checked) -> None:
    """Every rank's verdict to rank 0 and the first error (rank 0's own, else the lowest client's,
    else a config that differs between ranks) back to every rank: all raise it alike."""
    if transport.rank == SERVER:
        clients = list(range(1, transport.size))
        server_handshake(transport, clients, cfg.fingerprint(), checked.error, lambda hellos: {}, False, PREFLIGHT)
    else:
        client_handshake(transport, cfg.fingerprint(), {}, checked.error, PREFLIGHT)
