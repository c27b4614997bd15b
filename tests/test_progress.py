"""The progress line of long passes (validation during training, decoding): on a fake clock."""

from __future__ import annotations

from splitlora_mpi.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_most_every_10_s_with_the_time_left():
    clock, lines = Clock(), []
    p = Progress("eval", 400, clock=clock, write=lines.append)
    for _ in range(40):  # 10 rows every 3 s: 120 s in all
        clock.now += 3
        p.add(10)
    assert lines[0] == "eval: 40/400 rows, 108 s left"  # after 12 s: 0.3 s a row, 360 rows to go
    assert len(lines) == 9  # at 12, 24, ..., 108 s; none at 400/400
    assert all("rows," in line and line.endswith(" s left") for line in lines)
    assert p.finish() == 120.0
    assert lines[-1] == "eval: 400/400 rows (100%), 120.0 s"


def test_a_short_pass_prints_nothing_unless_asked():
    clock, lines = Clock(), []
    p = Progress("eval", 8, clock=clock, write=lines.append)
    for _ in range(4):
        clock.now += 2.4
        p.add(2)
    p.finish()
    assert lines == []
    q = Progress("greedy", 5, "MRs", clock=clock, write=lines.append)
    clock.now += 0.3
    q.add(5)
    q.finish(always=True)
    assert lines == ["greedy: 5/5 MRs (100%), 0.3 s"]


def test_prints_to_stdout(capsys):
    clock = Clock()
    p = Progress("beam", 3, "MRs", every_s=1.0, clock=clock)
    clock.now += 1.5
    p.add(1)
    assert capsys.readouterr().out == "beam: 1/3 MRs, 3 s left\n"
