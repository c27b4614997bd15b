"""Where a Hugging Face decoder-only LM keeps its parts, found by structure rather than by a list
of family names, and what its own forward does around the blocks: learned positions, one mask
per attention type (full or sliding window), rotary embeddings per layer type, logit
soft-capping. The split runs these itself, so a side can run any range of blocks. No MPI here.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .errors import ConfigError

MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
# what a block is given; a block needing anything else (ALiBi biases, ...) cannot be run alone
BLOCK_INPUTS = {"hidden_states", "attention_mask", "position_ids", "position_embeddings"}
# scalings some families apply outside their blocks, which the split does not reproduce
OUTSIDE_SCALES = ("embedding_multiplier", "logits_scaling", "logit_scale", "scale_emb")
CHECKED = Path(__file__).parent / "assets" / "families.json"  # written by benchmarks/families.py


@cache
def checked() -> dict[str, list[str]]:
    """Model types whose split logits were compared with transformers' own forward: "exact"
    (bit-identical) and "differs" (its forward does more around the blocks than a layout shows)."""
    return json.loads(CHECKED.read_text())


def unchecked(config: PretrainedConfig) -> str | None:
    """A warning for a model type split by structure but never compared with its own forward."""
    if config.model_type in checked()["exact"]:
        return None
    return (f"model_type '{config.model_type}' is split by its structure but was not compared with "
            f"transformers' own forward (checked with transformers {checked()['transformers']}; "
            "python benchmarks/families.py checks every model type)")  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Names of the parts under `model.base_model`."""

    blocks: str  # the list of decoder blocks
    final_norm: str  # the norm after the last block
    positions: str | None  # learned absolute positions, added to the token embeddings (GPT-2)
    embedding_side: tuple[str, ...]  # applied to the embeddings in order (dropout, embedding norm)
    rotary: str | None  # rotary embeddings, computed once and given to every block
    rotary_per_type: bool  # rotary(x, positions, layer_type): one per attention type (Gemma 3)

    def client_only(self) -> tuple[str, ...]:
        """Modules that only the side holding the token embeddings needs."""
        return ((self.positions,) if self.positions else ()) + self.embedding_side


def layout_of(lm: PreTrainedModel) -> Layout:
    """The parts of an unpruned model; ConfigError naming what is missing when it has no
    standard decoder layout."""
    config = lm.config
    base = lm.base_model
    where = f"model_type '{config.model_type}' ({type(base).__name__})"

    def cannot(what: str) -> ConfigError:
        return ConfigError(f"model: cannot split {where}: {what}")

    if config.model_type in checked()["differs"]:
        raise cannot(f"its forward does more around its blocks than the split runs (logits differ with "
                     f"transformers {checked()['transformers']}: benchmarks/families.py)")  # fmt: skip
    n = int(config.num_hidden_layers)
    children = list(base.named_children())
    names = [name for name, _ in children]
    lists = [name for name, m in children if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise cannot(f"expected one list of its {n} decoder blocks, found {lists or 'none'}")
    blocks = lists[0]
    after = names[names.index(blocks) + 1 :]
    norms = [name for name in after if is_norm(getattr(base, name))]
    if not norms:
        raise cannot("no final norm after its blocks")
    embedding = lm.get_input_embeddings()
    rotary = [name for name, m in children if "Rotary" in type(m).__name__]
    positions, side = None, []
    for name, m in children:
        if m is embedding or name in (blocks, norms[-1], *rotary[:1]):
            continue
        if isinstance(m, nn.Embedding) and name not in after and positions is None:
            positions = name
        elif isinstance(m, nn.Dropout) or (is_norm(m) and name not in after):
            side.append(name)
        else:
            raise cannot(f"{name} ({type(m).__name__}) is not an embedding, block, norm or rotary embedding")
    types = set(getattr(config, "layer_types", None) or ()) - set(MASKS)
    if types:
        raise cannot(f"attention types {sorted(types)}; expected {' / '.join(MASKS)}")
    for key in OUTSIDE_SCALES:
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise cannot(f"it scales by {key}={getattr(config, key)} outside its blocks")
    block = getattr(base, blocks)[0]
    needs = [
        p.name
        for p in list(inspect.signature(block.forward).parameters.values())[1:]
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if set(needs) - BLOCK_INPUTS:
        raise cannot(f"its blocks ({type(block).__name__}) need {needs}, which only its own forward computes")
    per_type = bool(rotary) and "layer_type" in inspect.signature(getattr(base, rotary[0]).forward).parameters
    return Layout(blocks, norms[-1], positions, tuple(side), rotary[0] if rotary else None, per_type)


def is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__


def attention_type(config: PretrainedConfig, block: int) -> str:
    """'full_attention' or 'sliding_attention' for one block: per layer where the family says
    (`layer_types`), else sliding for all when it has a window (Mistral, Phi-3)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[block]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def run_blocks(
    base: nn.Module,
    layout: Layout,
    blocks: list[tuple[int, nn.Module]],
    h: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """(global index, block) pairs in order, as the model's own forward runs them."""
    config = base.config
    pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    masks: dict[str, torch.Tensor | None] = {}
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in blocks:
        kind = attention_type(config, i)
        if kind not in masks:
            masks[kind] = MASKS[kind](
                config=config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=pos
            )
        extra = {}
        if layout.rotary:
            key = kind if layout.rotary_per_type else ""
            if key not in rotary:
                rope = getattr(base, layout.rotary)
                rotary[key] = rope(h, pos, kind) if layout.rotary_per_type else rope(h, position_ids=pos)
            extra["position_embeddings"] = rotary[key]
        h = block(h, attention_mask=masks[kind], position_ids=pos, **extra)
        h = h[0] if isinstance(h, tuple) else h
    return h


def soft_cap(config: PretrainedConfig, logits: torch.Tensor) -> torch.Tensor:
    """Gemma 2's final logit soft-capping (as its forward computes it); identity elsewhere."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap
