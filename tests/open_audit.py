"""`python tests/open_audit.py DIR ARGS...`: the CLI, with every open of a file under DIR
checked: a client rank r may open only files named *-r.* (its own), rank 0 none. Any other
open raises PermissionError, which fails the job: a finished job shows that no rank read
data that is not its own."""

from __future__ import annotations

import builtins
import io
import os
import sys
from pathlib import Path

from splitlora_mpi import cli

watched = Path(sys.argv[1]).resolve()
rank = cli.launcher_rank()
real_open = io.open


def audited_open(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - open's own signature
    if isinstance(file, (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(file)).resolve()
        if watched in path.parents and not (rank > 0 and path.stem.endswith(f"-{rank}")):
            raise PermissionError(f"rank {rank} may not read {path}")
    return real_open(file, *args, **kwargs)


builtins.open = io.open = audited_open
sys.exit(cli.main(sys.argv[2:]))
