"""Compute time of one training step of a side of the real model at each precision of its frozen
base, on this machine's CPU: is a bf16 or quantized base faster here, or slower?

    python benchmarks/precision_step.py [--repeats 3] [--out benchmarks/results/precision_step.json]

One client side of SmolLM2-135M-Instruct (embeddings + 2 blocks, LoRA r 8 on every linear layer
PEFT adapts by default) runs forward and backward on 2 x 96 tokens, the real-model benchmark's
per-client batch; the best of --repeats after one warm-up step, all torch threads. The server
(28 blocks and the LM head on 8 x 96 rows) is timed for the precisions whose client step is
under a second. Also one matrix product of the LM head's backward (768 x 49152 @ 49152 x 576)
in float32 and bf16, and whether the CPU has bf16 units (AVX512-BF16, AMX): without them
PyTorch emulates bf16 products.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import PRECISIONS, machine

from splitlora_mpi.config import load_config
from splitlora_mpi.model import SplitPart, hf_config
from splitlora_mpi.prepare_model import reference_model

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"client": 2, "server": 8}
SEQ = 96


def step_seconds(role: str, sets: list[str], model: Path, repeats: int) -> float:
    cfg = load_config(None, [f"model.name_or_path={model}", "split.client_layers=2", "lora.r=8", *sets])
    part = SplitPart(cfg, hf_config(cfg, 0, 0, 0), role, torch.device("cpu"))
    dtype = getattr(torch, cfg.model.precision(role)[0])
    mask = torch.ones(ROWS[role], SEQ, dtype=torch.long)
    if role == "client":
        inputs = torch.randint(0, 49152, (ROWS[role], SEQ))
    else:
        inputs = torch.randn(ROWS[role], SEQ, 576, dtype=dtype, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = part(inputs, mask)
        out.float().square().mean().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def matmul_seconds(dtype: torch.dtype) -> float:
    g, w = torch.randn(768, 49152, dtype=dtype), torch.randn(49152, 576, dtype=dtype)
    start = time.perf_counter()
    g @ w
    return time.perf_counter() - start


def bf16_units() -> dict[str, bool]:
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    return {flag: flag in flags for flag in ("avx512_bf16", "amx_bf16", "avx2")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision_step.json")
    args = p.parse_args()
    model = reference_model()
    steps: dict[str, dict[str, float]] = {}
    for name, sets in PRECISIONS.items():
        steps[name] = {"client_s": round(step_seconds("client", sets, model, args.repeats), 3)}
        if steps[name]["client_s"] < 1:
            steps[name]["server_s"] = round(step_seconds("server", sets, model, args.repeats), 3)
        print(name, steps[name], flush=True)
    base = steps["float32"]
    ratios = {
        name: {f"{side}_vs_float32": round(v / base[side], 2) for side, v in row.items()} for name, row in steps.items()
    }
    head = {
        "float32_s": round(matmul_seconds(torch.float32), 3),
        "bfloat16_s": round(matmul_seconds(torch.bfloat16), 3),
    }
    result = {
        "benchmark": "precision_step",
        "machine": {**machine(), "cpu_flags": bf16_units(), "torch_threads": torch.get_num_threads()},
        "model": model.name,
        "shapes": {"client": f"{ROWS['client']} x {SEQ} tokens, 2 blocks", "server": f"{ROWS['server']} x {SEQ}"},
        "steps": steps,
        "ratios": ratios,
        "lm_head_backward_matmul": head,
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
