"""Before the heavy imports: every check of this rank's input that needs no torch, and the
exchange that stops every rank alike on the first error. Files exist and parse, each client
has examples after partitioning, the split fits the model the config states, the output
directory is writable: a bad input exits 2 in about a second, not after every rank imported
torch and built its model. The full checks still run later (the handshake)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import JobConfig, load_config
from ..data import Example, check_tokenizer_path, read_split, rows_of
from ..errors import ConfigError
from ..fsutil import check_writable
from ..layout import blocks_of, check_model_path, check_positions, stated_size
from ..modes import Mode
from ..wire import PREFLIGHT, SERVER, Transport
from . import secret
from .handshake import client_handshake, server_handshake


@dataclass
class Checked:
    """This rank's verdict on its input, and the examples it read on the way (the run encodes
    these instead of reading the files again)."""

    error: str | None = None
    examples: dict[str, list[Example]] = field(default_factory=dict)  # "train" / "val"
    secret: bytes | None = field(default=None, repr=False)  # comm.secret_file's (run/secret.py)


def check(cfg: JobConfig, mode: Mode, rank: int, size: int, overwrite: bool = False) -> Checked:
    """This rank's checks, in the order the run would meet them (rank 0 alone writes outputs;
    a rank reads only the data its role reads: in splitlora and sl rank 0 opens no data file)."""
    checked = Checked()
    clients = size - 1
    try:
        checked.secret = secret.read_secret(cfg.comm.secret_file)
        if rank == SERVER:
            if not overwrite:
                check_previous_run(cfg)
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


# what a run (and `evaluate` on it) writes into run.out_dir: what --overwrite removes
RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "config.yaml", "adapter", "base", "checkpoints", "join",
               "scores.json", "references.txt")  # fmt: skip


def check_previous_run(cfg: JobConfig) -> None:
    """A finished run in out_dir is resumed (a no-op) only by the same config: another config
    would write over it, so it is refused before anything is touched."""
    out = cfg.out_dir
    if not (out / "config.yaml").is_file() or _status(out / "summary.json") != "complete":
        return  # (a stopped or failed run is resumed from its checkpoint, or started again)
    try:
        before = load_config(out / "config.yaml").fingerprint()
    except ConfigError:
        before = {}
    now = cfg.fingerprint()
    differs = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if differs:
        shown = ", ".join(f"{k}={before.get(k)!r} -> {now.get(k)!r}" for k in differs[:3])
        more = f" and {len(differs) - 3} more" if len(differs) > 3 else ""
        raise ConfigError(
            f"config key 'run.out_dir': {out} holds a finished run of another config ({shown}{more}); "
            "expected a new directory (--set run.name=NAME) or --overwrite to replace that run"
        )


def _status(summary: Path) -> str | None:
    try:
        return json.loads(summary.read_text()).get("status", "complete")  # (no status: an older complete run)
    except (OSError, ValueError, AttributeError):
        return None


def clear_previous_run(cfg: JobConfig) -> None:
    """--overwrite, once every rank's input is good: the previous run's outputs go."""
    for name in RUN_OUTPUTS:
        path = cfg.out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def agree(transport: Transport, cfg: JobConfig, checked: Checked) -> None:
    """Every rank's verdict to rank 0 and the first error (rank 0's own, else the lowest client's,
    else a config that differs between ranks) back to every rank: all raise it alike."""
    fingerprint = cfg.fingerprint()
    if transport.rank == SERVER:  # a challenge to each client first (None: no secret here)
        clients = list(range(1, transport.size))
        challenges = {c: secret.nonce(checked.secret) for c in clients}
        for c in clients:
            transport.send_object(c, PREFLIGHT, challenges[c])

        def refuse(hellos: dict[int, Any]) -> str | None:
            proofs = {c: h.get("proof") for c, h in hellos.items()}
            return secret.refusal(checked.secret, challenges, fingerprint, proofs)

        server_handshake(transport, clients, fingerprint, checked.error, lambda hellos: {}, False, PREFLIGHT, refuse)
    else:
        challenge = transport.recv_objects([SERVER], PREFLIGHT)[SERVER]
        proof = {"proof": secret.answer(checked.secret, challenge, transport.rank, fingerprint)}
        client_handshake(transport, fingerprint, proof, checked.error, PREFLIGHT)
