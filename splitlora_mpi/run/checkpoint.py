"""Checkpoints: every rank's resumable state in its own file, written atomically (temp +
fsync + rename); the manifest (each file's hash) is written last, so a checkpoint without
a manifest, or whose files do not match it, is incomplete and never resumed from.

Layout: <out_dir>/checkpoints/step-00000012/{rank-0.pt, rank-1.pt, ..., manifest.json}.
Rank 0 writes all of it (clients send their state as bytes) and hands each client its
file on resume, so only rank 0 needs out_dir: clients on other hosts need no shared
volume. A leaf module: no MPI here.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..fsutil import write_atomic

MANIFEST = "manifest.json"


def root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def step_dir(out_dir: Path, step: int) -> Path:
    return root(out_dir) / f"step-{step:08d}"


def rank_file(out_dir: Path, step: int, rank: int) -> Path:
    return step_dir(out_dir, step) / f"rank-{rank}.pt"


def to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def save_rank(out_dir: Path, step: int, rank: int, data: bytes) -> str:
    """Write one rank's serialized state; returns its sha256 (for the manifest)."""
    write_atomic(rank_file(out_dir, step, rank), data)
    return hashlib.sha256(data).hexdigest()


def write_manifest(
    out_dir: Path, step: int, world_size: int, fingerprint: dict[str, Any], hashes: dict[int, str]
) -> None:
    """Written last: the checkpoint exists from this moment on."""
    manifest = {
        "step": step,
        "world_size": world_size,
        "fingerprint": fingerprint,
        "files": {str(r): {"file": rank_file(out_dir, step, r).name, "sha256": h} for r, h in sorted(hashes.items())},
    }
    write_atomic(step_dir(out_dir, step) / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def prune(out_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (and anything newer being written)."""
    complete = sorted(d for d in root(out_dir).glob("step-*") if (d / MANIFEST).is_file())
    for d in complete[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Found:
    step: int
    files: dict[int, Path]
    world_size: int


def newest_complete(
    out_dir: Path, world_size: int, fingerprint: dict[str, Any], resizable: bool = False
) -> tuple[Found | None, list[str]]:
    """The newest checkpoint with every rank's file matching its manifest hash, and one warning
    per newer checkpoint skipped as incomplete or corrupt. A checkpoint from another config is
    a ConfigError (resuming it would silently train something else), and so is one from another
    world size unless the mode is `resizable` (a FedAvg of clients that may come and go)."""
    warnings = []
    for d in sorted(root(out_dir).glob("step-*"), reverse=True):
        manifest_path = d / MANIFEST
        if not manifest_path.is_file():
            warnings.append(f"skipping checkpoint {d}: incomplete (no {MANIFEST})")
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            warnings.append(f"skipping checkpoint {d}: unreadable {MANIFEST} ({e})")
            continue
        if manifest["world_size"] != world_size and not resizable:
            raise ConfigError(
                f"config key 'checkpoint.resume': {d} was written by {manifest['world_size']} ranks, this job has "
                f"{world_size}; expected the same number of ranks (or checkpoint.resume: never, or another run.out_dir)"
            )
        differs = sorted(k for k in set(manifest["fingerprint"]) | set(fingerprint)
                         if manifest["fingerprint"].get(k) != fingerprint.get(k))  # fmt: skip
        if differs:
            k = differs[0]
            raise ConfigError(
                f"config key '{k}': {d} was written with {k}={manifest['fingerprint'].get(k)!r}, this job has "
                f"{fingerprint.get(k)!r}; expected the same config to resume (or checkpoint.resume: never)"
            )
        files = {int(r): d / f["file"] for r, f in manifest["files"].items()}
        bad = [r for r, f in manifest["files"].items() if not _matches(d / f["file"], f["sha256"])]
        if bad or 0 not in files:  # (sl: only rank 0 and the client whose turn it was have state)
            warnings.append(f"skipping checkpoint {d}: rank file(s) {bad or 'missing'} do not match the manifest")
            continue
        return Found(int(manifest["step"]), files, manifest["world_size"]), warnings
    return None, warnings


def _matches(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False
