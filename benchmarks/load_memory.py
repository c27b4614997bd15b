"""Memory of loading a side of the real model at each precision of its frozen base: does a
quantized or bf16 side ever hold a float32 copy of its base while it loads?

    python benchmarks/load_memory.py [--cut 2] [--only server:nf4 ...] [--out benchmarks/results/load_memory.json]

Each case builds one side (`SplitPart`: client = embeddings + the first --cut blocks, server =
the rest with the tied LM head) of SmolLM2-135M-Instruct from its safetensors in a fresh
process, after the imports: `peak` is the growth of the peak RSS (VmHWM, reset just before the
build) over the RSS before it, `after` the RSS growth once built, `anon_after` the anonymous
(non-file) part of it; `base_mb` the bytes of its frozen base as held (summary.json
`model_parts`). The peak includes the checkpoint's pages mapped while they are read
(file-backed, the page cache's). Reference: the whole model in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import PRECISIONS, machine

ROOT = Path(__file__).resolve().parents[1]
SETS = {**PRECISIONS, "int8+table": ["model.quantize=int8", "model.client_embedding_8bit=true"]}
CASES = [f"{role}:{p}" for role in ("client", "server") for p in SETS if role == "client" or "table" not in p]
MEASURE = r"""
import json, sys, torch
from splitlora_mpi.config import load_config
from splitlora_mpi.model import SplitPart, hf_config
from splitlora_mpi.quantize import bitsandbytes, footprint

def status(field):
    return next(int(l.split()[1]) / 1e3 for l in open("/proc/self/status") if l.startswith(field + ":"))

role, cut, model, sets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
cfg = load_config(None, [f"model.name_or_path={model}", f"split.client_layers={cut}", *sets])
config = hf_config(cfg, 0, 0, 0)
bitsandbytes("model.quantize")  # (imported before the measurement, as torch is)
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
rss, anon = status("VmRSS"), status("RssAnon")
part = SplitPart(cfg, config, role, torch.device("cpu"))
print(json.dumps({"peak": status("VmHWM") - rss, "after": status("VmRSS") - rss,
                  "anon_after": status("RssAnon") - anon, "base_mb": footprint(part.lm)[1] / 1e6}))
"""


def measure(case: str, cut: int, model: Path) -> dict[str, float]:
    role, precision = case.split(":")
    cmd = [sys.executable, "-c", MEASURE, role, str(cut), str(model), *SETS[precision]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        sys.exit(f"{case} failed:\n{r.stderr[-2000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: round(v, 1) for k, v in row.items()}


def main() -> None:
    from splitlora_mpi.prepare_model import reference_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cut", type=int, default=2, help="blocks on the client (split.client_layers)")
    p.add_argument("--only", nargs="*", default=CASES, help=f"cases, of: {' '.join(CASES)}")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load_memory.json")
    args = p.parse_args()
    model = reference_model()
    whole_mb = (model / "model.safetensors").stat().st_size / 1e6  # (stored in float32)
    rows = {}
    for case in args.only:
        rows[case] = measure(case, args.cut, model)
        print(case, rows[case], flush=True)
    result = {
        "benchmark": "load_memory",
        "machine": machine(),
        "model": model.name,
        "cut": args.cut,
        "float32_model_mb": round(whole_mb, 1),
        "units": "MB (1e6 bytes); peak / after / anon_after: growth over the RSS before the build",
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
