"""Which blocks each side of the split holds, and the limits the model's size puts on the config:
plain numbers, no torch. A rank checks them before its heavy imports with the sizes the config
states (run/preflight.py); the model build checks them again with the Hugging Face config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from .config import JobConfig
from .errors import ConfigError
from .fsutil import local_or_hub

Role = Literal["client", "server", "full"]


def blocks_of(cfg: JobConfig, n: int, role: Role, client: int = 0) -> list[int]:
    """The (global) indices of the blocks a side holds. A client: its first `client_layers`
    blocks, plus the last `tail_layers` with label privacy; the server: the blocks from the
    lowest cut point up to the tail. Raises ConfigError when a side would hold none."""
    s = cfg.split
    cuts = s.cuts()
    tail = s.tail_layers if s.label_private else 0
    if role == "full":
        return list(range(n))
    for k in cuts:
        if not 1 <= k <= n - tail - 1:
            expected = f"1..{n - tail - 1} (the model has {n} blocks" + (f", {tail} in the tail)" if tail else ")")
            raise ConfigError(f"config key 'split.client_layers': expected {expected}, got {k}")
    if role == "server":
        return list(range(min(cuts), n - tail))
    return list(range(s.cut_of(client))) + list(range(n - tail, n))


def check_positions(cfg: JobConfig, positions: int | None) -> None:
    """Rows of data.max_seq_len tokens must fit the model's position embeddings."""
    if positions is not None and cfg.data.max_seq_len > positions:
        raise ConfigError(
            f"config key 'data.max_seq_len': expected ≤ {positions} (the model's positions), got {cfg.data.max_seq_len}"
        )


def stated_size(cfg: JobConfig) -> tuple[int | None, int | None]:
    """(blocks, positions) of the model as the config states them: model.config's keys, or the
    config.json of a local model directory. None where only transformers' defaults (or the hub)
    would tell; the model build checks those."""
    facts: Any = cfg.model.config
    if cfg.model.name_or_path is not None:
        try:
            facts = json.loads((Path(cfg.model.name_or_path).expanduser() / "config.json").read_text())
        except (OSError, ValueError):
            return None, None  # a hub id, or no readable config.json here
    if not isinstance(facts, dict):
        return None, None
    blocks = _first_int(facts, "num_hidden_layers", "n_layer")
    return blocks, _first_int(facts, "max_position_embeddings", "n_positions")


def check_model_path(cfg: JobConfig) -> None:
    """model.name_or_path, when it is a path, must be a directory (a hub id is checked when loaded)."""
    if cfg.model.name_or_path is not None:
        try:
            local_or_hub(cfg.model.name_or_path)
        except FileNotFoundError as e:
            raise cannot_load_model(cfg.model.name_or_path, e) from None


def cannot_load_model(name: str, e: Exception) -> ConfigError:
    return ConfigError(
        f"config key 'model.name_or_path': cannot load '{name}': {e}; expected a hub id or a model directory"
    )


def _first_int(facts: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = facts.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
