"""Run-level outputs, written by rank 0 alone: config.yaml, metrics.jsonl, summary.json,
and the progress lines on the terminal. Files are replaced atomically (temp + rename),
so an interrupted run never leaves a half-written file behind."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..fsutil import write_atomic


class RunLog:
    """Progress of one run: a metrics.jsonl row and a terminal line every `log_every` steps."""

    def __init__(self, out_dir: Path, config_yaml: str, steps: int, log_every: int, resume: dict | None = None):
        """`resume`: the `state()` saved in a checkpoint; metrics.jsonl then keeps its rows up to
        that step (an interrupted run may have logged a few more) and goes on from there."""
        self.out_dir = out_dir
        self.steps = steps
        self.log_every = log_every
        write_atomic(out_dir / "config.yaml", config_yaml)
        resume = resume or {"step": 0, "tokens": 0, "losses": [], "train": float("nan"), "val": None, "wall_s": 0.0}
        jsonl = out_dir / "metrics.jsonl"
        kept = [row for row in _rows(jsonl) if row["step"] <= resume["step"]] if resume["step"] else []
        write_atomic(jsonl, "".join(json.dumps(row) + "\n" for row in kept))
        self._jsonl = open(jsonl, "a")
        self._losses: list[float] = list(resume["losses"])
        self.tokens = resume["tokens"]
        self.last_train_loss = resume["train"]
        self.last_val_loss: float | None = resume["val"]
        self.t0 = time.perf_counter() - resume["wall_s"]
        self.last_step = resume["step"]

    def state(self) -> dict:
        return {"step": self.last_step, "tokens": self.tokens, "losses": list(self._losses),
                "train": self.last_train_loss, "val": self.last_val_loss, "wall_s": self.wall_s}  # fmt: skip

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.t0

    def step(self, step: int, loss: float, tokens: int, lr: float, val_loss: float | None, sent_bytes: int,
             clients: list[int] | None = None) -> None:  # fmt: skip
        """`clients`: the ids of the clients the step trained on (elastic runs, partial participation)."""
        self.last_step = step
        self._losses.append(loss)
        self.tokens += tokens
        if val_loss is not None:
            self.last_val_loss = val_loss
        if step % self.log_every and step != self.steps and step != 1 and val_loss is None:
            return
        # train_loss: mean over the steps since the previous row
        self.last_train_loss = sum(self._losses) / len(self._losses)
        self._losses.clear()
        wall = self.wall_s
        row: dict[str, Any] = {
            "step": step,
            "train_loss": self.last_train_loss,
            "lr": lr,
            "tokens": self.tokens,
            "wall_s": round(wall, 3),
            "sent_bytes": sent_bytes,
        }
        if val_loss is not None:
            row["val_loss"] = val_loss
        if clients is not None:
            row["clients"] = clients
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        val = f" | val {val_loss:.4f}" if val_loss is not None else ""
        print(
            f"step {step:>5}/{self.steps} | loss {self.last_train_loss:.4f}{val} | lr {lr:.2e} | "
            f"{self.tokens / max(wall, 1e-9):,.0f} tok/s | {sent_bytes / 1e6:,.1f} MB sent | {wall:.1f} s",
            flush=True,
        )

    def close(self, summary: dict[str, Any]) -> None:
        self._jsonl.close()
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
