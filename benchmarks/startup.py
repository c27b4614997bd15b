"""Start-up: where a rank's seconds go before step 1, and how fast bad input fails (sections of
`python benchmarks/systems.py --only startup fast_failure`); run alone, the default job of this
tree against another revision's, alternating in one run:

    python benchmarks/startup.py --baseline REV [--repeats 3]   # writes benchmarks/results/startup.json

- startup: the default 9-rank run (`mpirun -n 9 python -m splitlora_mpi`); summary.json
  `startup_s` by rank (launch, preflight, import, build, handshake), median and max over ranks.
- fast_failure: wall time of `mpirun -n 3 python -m splitlora_mpi ...` for every bad-input case
  of tests/test_failures.py (exit code, seconds, the error line); target <= 3 s each, except a
  failure only training shows (a diverging loss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from common import MPIRUN, machine

ROOT = Path(__file__).resolve().parents[1]
FAST_S = 3.0
TRAINING_TIME = {"diverging loss (NaN)"}  # found by training, not by a start-up check
PHASES = ("launch", "preflight", "import", "build", "handshake", "total")


def startup(work: Path, tree: Path = ROOT) -> dict:
    """The default 9-rank run's start-up by rank and phase, with the median and max over ranks;
    `tree`: the source tree whose package runs (another checkout's, for a before/after)."""
    out = work / "startup-run"
    cmd = [MPIRUN, "-n", "9", sys.executable, "-m", "splitlora_mpi", "--set", f"run.out_dir={out}"]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=work, env=env)
    job_s = time.monotonic() - start
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    by_rank = s["startup_s"]
    by_rank = by_rank if isinstance(by_rank, dict) else dict(enumerate(by_rank))  # (older summaries: a list)
    over_ranks = {
        phase: {"median": round(median(v[phase] for v in by_rank.values()), 3),
                "max": round(max(v[phase] for v in by_rank.values()), 3)}
        for phase in PHASES
    }  # fmt: skip
    return {"command": "mpirun -n 9 python -m splitlora_mpi --set run.out_dir=...", "job_s": round(job_s, 2),
            "train_wall_s": s["wall_s"], "by_rank": by_rank, "over_ranks": over_ranks}  # fmt: skip


def fast_failure(work: Path) -> dict:
    """Every bad-input case of the failures table under `mpirun -n 3`: exit code, seconds, error line."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_failures import EXPECTED, bad_input_cases

    cases = {}
    for case in sorted(EXPECTED):
        tmp = work / f"case-{len(cases)}"
        tmp.mkdir()
        cmd = [MPIRUN, "-n", "3", sys.executable, "-m", "splitlora_mpi", *bad_input_cases(tmp)[case]]
        start = time.monotonic()
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
        expected = EXPECTED[case] if isinstance(EXPECTED[case], tuple) else (EXPECTED[case],)
        line = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        cases[case] = {"rc": r.returncode, "s": round(seconds, 2), "error": line,
                       "expected_error": all(part in r.stderr for part in expected),
                       "start_up_check": case not in TRAINING_TIME}  # fmt: skip
        print(f"{case}: exit {r.returncode} in {seconds:.2f} s", flush=True)
    checked = [c for c in cases.values() if c["start_up_check"]]
    return {"ranks": 3, "target_s": FAST_S, "cases": cases,
            "max_s": max(c["s"] for c in checked),
            "all_within_target": all(c["s"] <= FAST_S and c["rc"] == 2 for c in checked)}  # fmt: skip


def before_after(baseline: str, repeats: int) -> dict:
    """The default job of `baseline` (a git revision) and of this tree, alternating `repeats` times."""
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), baseline], check=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "this": []}
            for i in range(repeats):
                for name, tree in (("baseline", old), ("this", ROOT)):
                    work = Path(tmp) / f"{name}-{i}"
                    work.mkdir()
                    runs[name].append(startup(work, tree))
                    print(f"{name} {i}: job {runs[name][-1]['job_s']} s", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    best = {name: min(r, key=lambda x: x["job_s"]) for name, r in runs.items()}
    summary = {
        name: {"job_s": [r["job_s"] for r in rs], "best_job_s": best[name]["job_s"],
               "import_s_median": median(r["over_ranks"]["import"]["median"] for r in rs),
               "startup_total_s_max": median(r["over_ranks"]["total"]["max"] for r in rs),
               "train_wall_s": median(r["train_wall_s"] for r in rs)}
        for name, rs in runs.items()
    }  # fmt: skip
    return {"baseline": baseline, "repeats": repeats, "machine": machine(), "summary": summary,
            "ratio_best_job_s": round(best["this"]["job_s"] / best["baseline"]["job_s"], 3), "runs": runs}  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="git revision to compare with (e.g. main)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = p.parse_args()
    result = before_after(args.baseline, args.repeats)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    print(f"ratio (best job s, this / baseline): {result['ratio_best_job_s']}")
