"""Which model types of the installed transformers the split runs exactly, and which it refuses.

    python benchmarks/families.py      # -> benchmarks/results/families.json (~10 min, all 200 types)

For every causal-LM model type transformers knows: a tiny random config (Llama-sized defaults,
3 blocks, hidden 32), client (1 block) + server vs the whole model through transformers' own
forward, in eval mode, with random LoRA B so the adapters matter. "exact": the logits are
bit-identical; "differs": the family's forward does more than its layout shows (refused by the
split from then on: the list goes to splitlora_mpi/assets/families.json, and a run warns about a
model type in neither list); "refused": the one line the split gives; "not built": the tiny
config or transformers itself failed before the split ran (not a verdict on the family).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from common import machine
from transformers import AutoModelForCausalLM
from transformers import logging as hf_logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

ROOT = Path(__file__).resolve().parents[1]
MAX_PARAMETERS = 20_000_000
sys.path.insert(0, str(ROOT / "tests"))
from test_model import CPU, FAMILIES, LLAMA, _batch, _cfg, _randomise_lora_b  # noqa: E402

from splitlora_mpi.errors import ConfigError  # noqa: E402
from splitlora_mpi.model import SplitPart  # noqa: E402


def verdict(model_config: dict) -> dict[str, object]:
    try:
        cfg, config = _cfg(model_config)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:  # a family whose other defaults stay large (vision towers, codebooks)
            return {"result": "not built", "why": f"{size / 1e6:.0f} M parameters from the tiny config"}
        client, server, full = (SplitPart(cfg, config, role, CPU).eval() for role in ("client", "server", "full"))
    except ConfigError as e:
        return {"result": "refused", "why": str(e)}
    except Exception as e:  # noqa: BLE001 - a tiny config transformers cannot build
        return {"result": "not built", "why": f"{type(e).__name__}: {str(e)[:160]}"}
    _randomise_lora_b(full)
    state = full.adapter_state()
    for part in (client, server):
        part.load_adapter_state({k: state[k] for k in part.adapter_state()})
    ids, mask, _ = _batch()
    try:
        with torch.no_grad():
            split = server(client(ids, mask), mask)
            whole = full.peft(input_ids=ids, attention_mask=mask).logits
    except Exception as e:  # noqa: BLE001
        return {"result": "not built", "why": f"{type(e).__name__}: {str(e)[:160]}"}
    diff = (split - whole).abs().max().item()
    return {"result": "exact" if diff == 0 else "differs", "max_abs_diff": diff}


def main() -> None:
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    results = {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        results[model_type] = verdict(FAMILIES.get(model_type, {**LLAMA, "model_type": model_type}))
        print(f"{model_type:24s} {results[model_type]['result']:9s} {results[model_type].get('why', '')[:110]}")
    counts = {r: sum(v["result"] == r for v in results.values()) for r in ("exact", "differs", "refused", "not built")}
    out = ROOT / "benchmarks" / "results" / "families.json"
    out.write_text(json.dumps({"benchmark": "families", "machine": machine(), "counts": counts,
                               "model_types": results}, indent=1) + "\n")  # fmt: skip
    import transformers

    (ROOT / "splitlora_mpi" / "assets" / "families.json").write_text(json.dumps({
        "transformers": transformers.__version__, "source": "python benchmarks/families.py",
        "exact": sorted(k for k, v in results.items() if v["result"] == "exact"),
        "differs": sorted(k for k, v in results.items() if v["result"] == "differs"),
    }, indent=1) + "\n")  # fmt: skip
    print(counts, "->", out, "and splitlora_mpi/assets/families.json (what a run warns about)")


if __name__ == "__main__":
    main()
