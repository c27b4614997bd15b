"""Start-up: where a rank's seconds go before step 1, and how fast bad input fails.

    python benchmarks/startup.py [--only startup fast_failure] [--out benchmarks/results/startup.json]

- startup: the default 9-rank run (`mpirun -n 9 python -m splitlora_mpi`); summary.json
  `startup_s` by rank (launch, preflight, import, build, handshake), median and max over ranks.
- fast_failure: wall time of `mpirun -n 3 python -m splitlora_mpi ...` for every bad-input case
  of tests/test_failures.py (exit code, seconds, the error line); target <= 3 s each, except a
  failure only training shows (a diverging loss).
Writes startup.json (sections not run are kept from the previous file).
"""

from __future__ import annotations

import argparse
import json
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


def startup(work: Path) -> dict:
    """The default 9-rank run's start-up by rank and phase, with the median and max over ranks."""
    out = work / "startup-run"
    cmd = [MPIRUN, "-n", "9", sys.executable, "-m", "splitlora_mpi", "--set", f"run.out_dir={out}"]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    job_s = time.monotonic() - start
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    by_rank = s["startup_s"]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=("startup", "fast_failure"), default=("startup", "fast_failure"))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "startup.json")
    args = p.parse_args()
    result = json.loads(args.out.read_text()) if args.out.exists() else {"benchmark": "startup"}
    result["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            result[name] = {"startup": startup, "fast_failure": fast_failure}[name](Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if "startup" in args.only:
        for phase, v in result["startup"]["over_ranks"].items():
            print(f"start-up {phase:>9}: median {v['median']:6.2f} s, max {v['max']:6.2f} s")
    if "fast_failure" in args.only:
        f = result["fast_failure"]
        print(f"bad input: slowest {f['max_s']:.2f} s; all within {FAST_S:g} s: {f['all_within_target']}")
    print(args.out)


if __name__ == "__main__":
    main()
