"""A progress line for a long pass (validation, decoding): `eval: 120/400 rows, 35 s left`.

At most one line every `every_s` seconds, and none at all for a pass shorter than that, so
short runs print nothing new. Callers print on rank 0 only. No heavy imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def _print(line: str) -> None:
    print(line, flush=True)


class Progress:
    def __init__(
        self,
        label: str,
        total: int,
        unit: str = "rows",
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] = _print,
    ):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.clock, self.write = clock, write
        self.start = self.last = clock()
        self.done = 0
        self.shown = False  # a line was printed

    def add(self, rows: int) -> None:
        """`rows` more done; a line when every_s passed since the start or the last line."""
        self.done += rows
        now = self.clock()
        if now - self.last < self.every_s or not 0 < self.done < self.total:
            return
        left = (now - self.start) / self.done * (self.total - self.done)
        self.write(f"{self.label}: {self.done}/{self.total} {self.unit}, {left:.0f} s left")
        self.last, self.shown = now, True

    def finish(self, always: bool = False) -> float:
        """The closing line (`eval: 400/400 rows (100%), 81.2 s`) when a progress line came
        before it or `always`; returns the seconds the pass took."""
        seconds = self.clock() - self.start
        if always or self.shown:
            share = 100 * self.done // max(1, self.total)
            self.write(f"{self.label}: {self.done}/{self.total} {self.unit} ({share}%), {seconds:.1f} s")
        return seconds
