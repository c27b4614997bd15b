"""What rank 0 writes at the end (DESIGN §4): the adapter (and base) directories and summary.json."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import CLIENT, JobConfig
from ..fsutil import atomic_dir
from ..model import SplitPart, build_base, export_adapter
from ..quantize import footprint
from .runlog import RunLog


def write_model_outputs(cfg: JobConfig, config: Any, part: SplitPart, state: dict[str, torch.Tensor]) -> None:
    """adapter/ (one PEFT adapter, client + server layers) and base/ when built from config."""
    out = cfg.out_dir
    base_ref = cfg.model.name_or_path
    if base_ref is not None and base_ref.startswith("~"):
        base_ref = str(Path(base_ref).expanduser())  # loaders other than ours do not expand it
    if base_ref is None:
        base_ref = str((out / "base").resolve())
        with atomic_dir(out / "base") as tmp:  # (unquantized: the adapter is for the base, not its 8/4-bit copy)
            whole = replace(cfg, model=replace(cfg.model, quantize="none"))
            build_base(whole, config, "full", torch.device("cpu"))[0].save_pretrained(tmp)
    with atomic_dir(out / "adapter") as tmp:
        export_adapter(tmp, part, state, base_ref)


def holdings(role: str, parts: list[SplitPart]) -> dict[str, Any]:
    """What one rank holds, for summary.json `model_parts`: its blocks, its frozen base (values
    and bytes as held: 8/4-bit weights with their scales) and the checkpoint keys it read."""
    values, nbytes = footprint(*(part.peft for part in parts))
    return {
        "role": role,
        "blocks": sorted({b for part in parts for b in part.blocks_held()}),
        "base_params": values,
        "base_bytes": nbytes,
        "tensors_read": sorted({k for part in parts for k in part.tensors_read}),
    }


def summary(cfg: JobConfig, log: RunLog, world_size: int, **facts: Any) -> dict[str, Any]:
    """summary.json: the run's totals plus the facts only the caller knows (DESIGN §4 keys)."""
    wall = log.wall_s
    facts["peak_rss_mb"] = {k: round(v, 1) for k, v in facts["peak_rss_mb"].items()}
    return {
        "mode": cfg.run.mode,
        "world_size": world_size,
        "num_clients": facts.pop("num_clients"),
        "steps": facts.pop("steps", cfg.train.steps),  # (a run that ended early: the steps it did)
        "tokens": log.tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": log.tokens / wall,
        "final_train_loss": log.last_train_loss,
        "final_val_loss": log.last_val_loss,
        "privacy": {"clip": cfg.privacy.clip, "noise_std": cfg.privacy.clip * cfg.privacy.noise_multiplier},
        **facts,
    }


def done_line(cfg: JobConfig) -> str:
    """Rank 0's last line: where the adapter and summary.json are and the commands that use them
    (paths as the user gave run.out_dir: relative stays relative)."""
    out = cfg.out_dir
    run = shlex.quote(str(out))
    where = f"done: adapter {out / 'adapter'}, summary {out / 'summary.json'}"
    example = {"e2e": "name : The Punter | food : Indian | area : riverside", "chat": "Hello!"}.get(cfg.data.format)
    generate = f"python -m splitlora_mpi.generate {run} --prompt {shlex.quote(example) if example else 'TEXT'}"
    if cfg.data.format == "chat":  # (evaluate scores prompt / completion data only)
        return f"{where}; next: {generate}"
    val = cfg.data.val_path
    if val is None:  # (evaluate's default then is the packaged E2E sample)
        data = None if cfg.data.format == "e2e" else "FILE"
    else:  # (evaluate cannot choose among the clients' own files)
        data = "FILE" if CLIENT in val else val
    evaluate = f"python -m splitlora_mpi.evaluate {run}" + (f" --data {shlex.quote(data)}" if data else "")
    return f"{where}; next: {evaluate} or {generate}"
