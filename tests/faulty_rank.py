"""`python tests/faulty_rank.py RANK STEP ARGS...`: the CLI, with rank RANK raising an
uncaught error in its training step STEP, to test the abort path with no hook in the package."""

from __future__ import annotations

import sys

from splitlora_mpi import cli
from splitlora_mpi.roles import client, server

rank, bad_step = int(sys.argv[1]), int(sys.argv[2])
if cli.launcher_rank() == rank:
    role = server.Server if rank == 0 else client.Client
    train_step = role.train_step

    def failing_train_step(self, step, *args, **kwargs):
        if step == bad_step:
            raise RuntimeError(f"injected failure at step {step}")
        return train_step(self, step, *args, **kwargs)

    role.train_step = failing_train_step
sys.exit(cli.main(sys.argv[3:]))
