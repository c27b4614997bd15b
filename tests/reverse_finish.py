"""`python tests/reverse_finish.py ARGS...`: the CLI, with each client holding back its end-of-run
statistics (size - rank) x 0.5 s, so rank 0 receives them in reverse rank order."""

from __future__ import annotations

import sys
import time

from splitlora_mpi import cli
from splitlora_mpi.wire import STATS
from splitlora_mpi.wire.mpi import MpiTransport

real_send = MpiTransport.send_object


def send_late(self: MpiTransport, dest: int, phase: int, obj: object, kind: str = "control") -> int:
    if phase == STATS:
        time.sleep((self.size - self.rank) * 0.5)
    return real_send(self, dest, phase, obj, kind)


MpiTransport.send_object = send_late
sys.exit(cli.main(sys.argv[1:]))
