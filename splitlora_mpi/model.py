"""The model split: a Hugging Face causal LM cut after `split.client_layers` blocks.

Each side keeps the *same* HF model object with the other side's modules removed, so
parameter names (and PEFT adapter keys) are exactly those of the whole model: the client
and server adapters are disjoint subsets of one standard PEFT adapter. A side materialises
only its own modules: the model is built on the meta device, pruned, then filled either by
a per-module seeded init (identical to the whole model built the same way) or from only
its tensors in the safetensors files. No MPI here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .config import JobConfig
from .errors import ConfigError
from .fsutil import local_or_hub
from .layout import Role, blocks_of, cannot_load_model, check_positions
from .quantize import QUANTIZED, embedding_8bit, quantize_linears, release_freed_memory
from .structure import Layout, layout_of, run_blocks, soft_cap

log = logging.getLogger(__name__)


_RNG_LOCK = threading.Lock()


def hf_config(cfg: JobConfig, vocab_size: int, eos_id: int, pad_id: int) -> PretrainedConfig:
    """The HF config of the base model: from `model.name_or_path`, else from `model.config`."""
    if cfg.model.name_or_path is not None:
        try:
            return AutoConfig.from_pretrained(local_or_hub(cfg.model.name_or_path))
        except (OSError, ValueError) as e:
            raise cannot_load_model(cfg.model.name_or_path, e) from None
    kwargs = dict(cfg.model.config)
    model_type = kwargs.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"config key 'model.config.model_type': '{model_type}' is no model type of transformers "
            f"{transformers.__version__}; expected e.g. llama, qwen3, gemma3_text, phi3"
        )
    kwargs.setdefault("vocab_size", vocab_size)
    kwargs.setdefault("eos_token_id", eos_id)
    kwargs.setdefault("bos_token_id", eos_id)
    kwargs.setdefault("pad_token_id", pad_id)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'model.config': {e}") from None


def num_blocks(config: PretrainedConfig) -> int:
    return int(config.num_hidden_layers)


# ---------------------------------------------------------------- building a side


def build_base(
    cfg: JobConfig,
    config: PretrainedConfig,
    role: Role,
    device: torch.device,
    client: int = 0,
    tensors_read: list[str] | None = None,
) -> tuple[PreTrainedModel, Layout]:
    """The HF model holding only `role`'s modules (all of them for "full"), weights filled,
    and where its parts are; `client`: which client (split points may differ per client).
    With pretrained weights the checkpoint keys read are appended to `tensors_read`."""
    n = num_blocks(config)
    keep = blocks_of(cfg, n, role, client)
    check_positions(cfg, getattr(config, "max_position_embeddings", None))
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    heads = role == "full" or (role == "client") == cfg.split.label_private
    layout = layout_of(lm)
    _prune(lm, layout, role, keep, heads, tied)
    dtype, quantize = cfg.model.precision(role)
    table_8bit = role == "client" and cfg.model.client_embedding_8bit
    if table_8bit and tied and heads:
        raise ConfigError("config key 'model.client_embedding_8bit': this client's LM head is its embedding table")
    lm.to(getattr(torch, dtype))  # still on meta: a bfloat16 side never holds a float32 copy
    # The blocks (and an 8-bit table) are filled one at a time and quantized at once: the base
    # is never whole at a wider precision than it is kept in.
    names = {id(m): name for name, m in lm.named_modules()}
    blocks = getattr(lm.base_model, layout.blocks)
    units = [names[id(b)] for b in (blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks)]
    if table_8bit:  # filled in float16, what LLM.int8 quantizes from: the same bytes, half the transient
        units.append(names[id(lm.get_input_embeddings().to(torch.float16))])
    checkpoint = Checkpoint(cfg.model.name_or_path) if cfg.model.name_or_path is not None else None
    for name, module in lm.named_modules():
        if not _inside(name, units):
            module.to_empty(device=device, recurse=False)
    if tied and heads:
        lm.tie_weights()  # to_empty gave the head its own storage
    _fill(lm, "", lm, cfg.run.seed, checkpoint, skip=units)
    for unit in units:
        module = lm.get_submodule(unit)
        module.to_empty(device=device)
        _fill(module, unit + ".", lm, cfg.run.seed, checkpoint)
        if module is lm.get_input_embeddings():
            lm.set_input_embeddings(embedding_8bit(module, getattr(torch, dtype), device))
        elif quantize in QUANTIZED:
            quantize_linears(module, quantize, getattr(torch, dtype), device)
        del module
        release_freed_memory()  # (the unit's float weights; else RSS keeps them)
    if quantize in QUANTIZED:  # PEFT then wraps the bitsandbytes layers
        setattr(lm, f"is_loaded_in_{'8' if quantize == 'int8' else '4'}bit", True)
    if checkpoint is not None and tensors_read is not None:
        tensors_read.extend(checkpoint.read)
    _check_filled(lm)
    return lm, layout


def _inside(name: str, units: list[str]) -> bool:
    return any(name == u or name.startswith(u + ".") for u in units)


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _fill(
    module: nn.Module,
    prefix: str,
    lm: PreTrainedModel,
    seed: int,
    checkpoint: Checkpoint | None,
    skip: list[str] | None = None,
) -> None:
    """NaN first (a tensor that neither init nor checkpoint fills is then found), then HF's own
    init module by module (children first, as HF does) with a seed per module name, so a
    side's weights equal the same modules of the whole model; then the module's tensors from
    the checkpoint. `skip`: modules (by name) filled later."""
    skip = skip or []
    with torch.no_grad():
        for _, t in _tensors(module):
            if t.is_floating_point() and not t.is_meta:
                t.fill_(float("nan"))
    head, table = lm.get_output_embeddings(), lm.get_input_embeddings()
    tied_head = head if head is not None and table is not None and head.weight is table.weight else None
    for name, child in _post_order(module, prefix):
        if child is tied_head or _inside(name, skip):
            continue  # a tied head's weight is the input embedding's
        with _seeded(_module_seed(seed, name)):
            lm._init_weights(child)
    if checkpoint is not None:
        checkpoint.fill(module, prefix, lm, skip)


def _check_filled(lm: PreTrainedModel) -> None:
    empty = [name for name, t in _tensors(lm) if t.is_floating_point() and t.isnan().any()]
    if empty:
        raise ConfigError(
            f"model: cannot build model_type '{lm.config.model_type}': {', '.join(empty[:3])} "
            "filled neither by transformers' init nor by the checkpoint"
        )


def _prune(lm: PreTrainedModel, layout: Layout, role: Role, keep: list[int], heads: bool, tied: bool) -> None:
    """Drop the other side's modules; blocks become a ModuleDict keyed by their global index.
    "full" stays a plain HF model (usable with its own forward, generate, save_pretrained)."""
    if role == "full":
        return
    base = lm.base_model
    blocks = getattr(base, layout.blocks)
    setattr(base, layout.blocks, nn.ModuleDict({str(i): blocks[i] for i in keep}))
    if not heads:
        setattr(base, layout.final_norm, None)
        lm.lm_head = None
    if role == "server":
        for name in layout.client_only():
            setattr(base, name, None)
        if not (tied and heads):  # a tied head shares the embedding weight: keeping the module costs nothing
            lm.set_input_embeddings(None)
            if not heads:
                lm._tied_weights_keys = None  # no part of a tied pair is here (PEFT looks for one)


def _module_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % (2**63)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global generator seeded with `seed`, and restore it after. One
    thread at a time: ranks may be threads of one process (the in-process transport)."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


class Checkpoint:
    """The (possibly sharded) safetensors files of `model.name_or_path`; a side reads only its tensors."""

    def __init__(self, name_or_path: str):
        self.name_or_path = name_or_path
        self.file_of: dict[str, Path] = {}
        for f in _safetensors_files(name_or_path):
            with safe_open(str(f), "pt") as sf:
                self.file_of.update({key: f for key in sf.keys()})
        self.read: list[str] = []  # the keys read so far

    def fill(self, module: nn.Module, prefix: str, lm: PreTrainedModel, skip: list[str]) -> None:
        """Copy `module`'s tensors (its parameters and persistent buffers, not those in `skip`)."""
        head = lm.get_output_embeddings()
        persistent = module.state_dict(keep_vars=True)
        for name, tensor in _tensors(module):
            full = prefix + name
            if name not in persistent or _inside(full, skip):
                continue
            key = full if full in self.file_of else full.removeprefix(lm.base_model_prefix + ".")
            if key not in self.file_of:
                if head is not None and tensor is head.weight:
                    continue  # tied: the embedding's
                raise ConfigError(f"config key 'model.name_or_path': tensor '{full}' not found in {self.name_or_path}")
            with safe_open(str(self.file_of[key]), "pt", device=str(tensor.device)) as sf, torch.no_grad():
                stored = sf.get_slice(key)
                if list(stored.get_shape()) != list(tensor.shape):
                    raise ConfigError(
                        f"config key 'model.name_or_path': tensor '{key}' has shape {stored.get_shape()} in "
                        f"{self.name_or_path}, expected {list(tensor.shape)} by its config.json"
                    )
                tensor.copy_(sf.get_tensor(key))
            self.read.append(key)


def _safetensors_files(name_or_path: str) -> list[Path]:
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download  # only for hub ids

        try:
            path = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # noqa: BLE001 - any hub failure is a bad model argument here
            raise ConfigError(f"config key 'model.name_or_path': cannot fetch '{name_or_path}': {e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise ConfigError(f"config key 'model.name_or_path': no model.safetensors in {path}")


# ---------------------------------------------------------------- one side with LoRA


def peft_lora_config(cfg: JobConfig, model_type: str) -> PeftLoraConfig:
    """`lora.target_modules`, else PEFT's default for the family, else every linear layer of the
    blocks (families PEFT has no default for, e.g. Phi-3's fused projections)."""
    targets: list[str] | str | None = cfg.lora.target_modules
    if targets is None and model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        targets = "all-linear"
    return PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        task_type="CAUSAL_LM",
    )  # fmt: skip


class SplitPart(nn.Module):
    """One side of the cut with its LoRA adapter: client (embeddings + first blocks; with
    label privacy also the last blocks and the LM head), server (the blocks in between, and
    the final norm and LM head without label privacy) or full (everything, for evaluation)."""

    def __init__(self, cfg: JobConfig, config: PretrainedConfig, role: Role, device: torch.device, client: int = 0):
        super().__init__()
        self.role = role
        self.num_blocks = num_blocks(config)
        self.tail_start = self.num_blocks - (cfg.split.tail_layers if cfg.split.label_private else 0)
        self.tensors_read: list[str] = []  # checkpoint keys this part read (pretrained weights)
        lm, self.layout = build_base(cfg, config, role, device, client, self.tensors_read)
        self.has_head = lm.get_output_embeddings() is not None
        self.cut = cfg.split.cut_of(client)  # (client: the blocks before the cut)
        with _seeded(_module_seed(cfg.run.seed, f"lora:{role}")):  # same LoRA init on every client and in central
            try:
                self.peft: PeftModel = get_peft_model(lm, peft_lora_config(cfg, config.model_type))
            except ValueError as e:
                raise ConfigError(f"config key 'lora.target_modules': {e}") from None

    @property
    def lm(self) -> PreTrainedModel:
        return self.peft.base_model.model

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """client: token ids -> cut-layer activations; server: activations -> logits (label
        privacy: -> the activations before the client's tail); full: token ids -> logits."""
        if self.role == "server":
            return self.forward_joined([(self.first_block, x, attention_mask)])
        h = self._embed(x)
        if self.role == "client":
            return self._blocks(h, attention_mask, 0, self.cut)
        return self._head(self._blocks(h, attention_mask, 0, self.num_blocks))

    def forward_joined(self, inputs: list[tuple[int, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Server: (first block, activations, mask) per group of rows, sorted by first block.
        Rows join the batch when their block is reached, so groups that share a cut point are
        one batch throughout. Output rows are in input order."""
        h, mask = inputs[0][1], inputs[0][2]
        for i, (start, _, _) in enumerate(inputs):
            if i > 0:
                h, mask = torch.cat([h, inputs[i][1]]), torch.cat([mask, inputs[i][2]])
            stop = inputs[i + 1][0] if i + 1 < len(inputs) else self.tail_start
            h = self._blocks(h, mask, start, stop)
        return self._head(h) if self.has_head else h

    def tail(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Client with label privacy: the server's output -> logits (the last blocks and the head)."""
        return self._head(self._blocks(h, attention_mask, self.tail_start, self.num_blocks))

    @property
    def first_block(self) -> int:
        return self.blocks_held()[0]

    def blocks_held(self) -> list[int]:
        blocks = getattr(self.lm.base_model, self.layout.blocks)
        return [int(i) for i in blocks] if isinstance(blocks, nn.ModuleDict) else list(range(len(blocks)))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.lm.base_model
        h = base.get_input_embeddings()(ids)
        if self.layout.positions:
            h = h + getattr(base, self.layout.positions)(torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        for name in self.layout.embedding_side:
            h = getattr(base, name)(h)
        return h

    def _blocks(self, h: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run the blocks with global index in [start, stop)."""
        blocks = getattr(self.lm.base_model, self.layout.blocks)
        held = isinstance(blocks, nn.ModuleDict)
        run = [(i, blocks[str(i)] if held else blocks[i]) for i in range(start, stop)]
        return run_blocks(self.lm.base_model, self.layout, run, h, attention_mask) if run else h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(getattr(self.lm.base_model, self.layout.final_norm)(h))
        return soft_cap(self.lm.config, logits)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_numel(self) -> int:
        """How many values its LoRA adapter trains."""
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter in PEFT's saved-key format: the one definition of "the adapter"."""
        return get_peft_model_state_dict(self.peft)

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.peft, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter keys not in this model part: {unexpected[:3]}")


def joined_adapter_state(parts: list[SplitPart]) -> dict[str, torch.Tensor]:
    """The adapter of the parts of one model under their PEFT keys (disjoint: block indices are global)."""
    return {k: v for part in parts for k, v in part.adapter_state().items()}


def load_joined_adapter_state(parts: list[SplitPart], state: dict[str, torch.Tensor]) -> None:
    """Each part takes its own keys of `state`."""
    for part in parts:
        part.load_adapter_state({k: state[k] for k in part.adapter_state()})


def export_adapter(out: Path, part: SplitPart, state: dict[str, torch.Tensor], base_path: str) -> None:
    """Write ONE standard PEFT adapter directory (client + server tensors)."""
    out.mkdir(parents=True, exist_ok=True)
    peft_cfg = copy.deepcopy(part.peft.peft_config["default"])
    peft_cfg.base_model_name_or_path = base_path
    peft_cfg.save_pretrained(str(out))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
