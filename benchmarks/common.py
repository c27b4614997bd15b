"""What the benchmark scripts share: the mpirun beside this Python, and the facts of the machine
that every results JSON records (times are only comparable within one machine and run)."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or "mpirun"


def machine() -> dict[str, object]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
