"""The training schemes, by `run.mode`. A new mode: one module implementing `base.Mode`,
and one line here."""

from __future__ import annotations

from .base import Mode
from .central import Central
from .fedlora import FedLoRA
from .sl import SL
from .splitlora import SplitLoRA

MODES: dict[str, Mode] = {m.name: m for m in (SplitLoRA(), SL(), FedLoRA(), Central())}


def mode_of(name: str) -> Mode:
    return MODES[name]
