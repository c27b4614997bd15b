"""The job configuration: one dataclass tree, loaded from YAML plus `--set` overrides.

Every field has a default (so an empty config runs), a one-line help text and, where it
matters, bounds. Validation happens once, at load time; a bad value raises `ConfigError`
with one line naming the key and what was expected, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from . import rules
from .errors import ConfigError
from .rules import CLIENT


def _f(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with help text and optional bounds (`min`, `max`, `gt`, `lt`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: typing.cast(Any, default).copy(), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass
class RunConfig:
    name: str | None = _f(None, "run name (null = run.mode); the default out_dir is runs/<name>")
    out_dir: str | None = _f(None, "directory for config.yaml, metrics.jsonl, summary.json, adapter/, base/")
    seed: int = _f(0, "seed for weights, data partition and sampling", min=0)
    mode: str = _f(
        "splitlora",
        "one of the modes of splitlora_mpi/modes: splitlora: server + clients in parallel; sl: clients take "
        "turns; fedlora: each client trains the whole model, FedAvg; central: one rank, all data",
    )


@dataclass
class ModelConfig:
    name_or_path: str | None = _f(None, "hub id or local directory; null = build from model.config")
    config: dict[str, Any] = _f(
        {
            "model_type": "gpt2",
            "n_embd": 64,
            "n_layer": 4,
            "n_head": 4,
            "n_positions": 128,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        },
        "kwargs for AutoConfig.for_model(model_type, ...); vocab_size defaults to the tokenizer's",
    )
    tokenizer: str = _f("byte", "'byte' (built in) or a hub id / directory of a Hugging Face tokenizer")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the frozen base weights")
    quantize: Literal["none", "int8", "nf4"] = _f(
        "none", "the blocks' frozen linear weights in 8 (LLM.int8) or 4 bits (NF4), by bitsandbytes"
    )
    client_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(None, "the clients' model.dtype; null = same")
    client_quantize: Literal["none", "int8", "nf4"] | None = _f(None, "the clients' model.quantize; null = same")
    server_dtype: Literal["float32", "bfloat16", "float16"] | None = _f(None, "the server's model.dtype; null = same")
    server_quantize: Literal["none", "int8", "nf4"] | None = _f(None, "the server's model.quantize; null = same")
    client_embedding_8bit: bool = _f(False, "clients hold the token embedding table in 8 bits (one scale per row)")

    def precision(self, role: str) -> tuple[str, str]:
        """(dtype, quantize) of a side's frozen base: "client" / "server" may override the
        model's; "full" (central, fedlora, evaluation) takes the model's."""
        dtype, quantize = {
            "client": (self.client_dtype, self.client_quantize),
            "server": (self.server_dtype, self.server_quantize),
        }.get(role, (None, None))
        return dtype or self.dtype, quantize or self.quantize


@dataclass
class SplitConfig:
    client_layers: int | list[int] = _f(
        1, "transformer blocks held by each client (the cut layer); a list: one value per client", min=1
    )
    label_private: bool = _f(
        False, "U-shaped split: each client also holds the final norm and LM head; labels and logits never leave it"
    )
    tail_layers: int = _f(0, "with label_private: the last blocks, also held by each client", min=0)
    server_update: Literal["joint", "sequential"] = _f(
        "joint",
        "joint: one server step per step on every client's batch at once; sequential (the official SplitLoRA "
        "code): one server step per client's batch, in rank order",
    )

    def cuts(self) -> list[int]:
        """The cut point of every client (one value: the same for all)."""
        return self.client_layers if isinstance(self.client_layers, list) else [self.client_layers]

    def cut_of(self, client: int) -> int:
        cuts = self.cuts()
        return cuts[client] if len(cuts) > 1 else cuts[0]


@dataclass
class LoraConfig:
    r: int = _f(4, "LoRA rank", min=1)
    alpha: float = _f(32.0, "LoRA scaling alpha", gt=0)
    dropout: float = _f(0.0, "dropout on the LoRA input", min=0, lt=1)
    target_modules: list[str] | None = _f(None, "module names to adapt; null = PEFT's default for the family")


@dataclass
class DataConfig:
    train_path: str | None = _f(
        None, "training file; null = the packaged E2E sample; {client} in it (1..N): each client's own file"
    )
    val_path: str | None = _f(
        None, "validation file; null = the packaged held-out E2E sample; may contain {client} like train_path"
    )
    val_limit: int | None = _f(
        None, "validate on the first N MRs (e2e, all their references) or rows of each validation file", min=1
    )
    format: Literal["e2e", "jsonl", "chat"] = _f(
        "e2e",
        "e2e: 'meaning representation||text' lines, or a .csv file with columns mr and ref (the official "
        "E2E release); jsonl: prompt/completion objects; chat: "
        '{"messages": [{"role", "content"}, ...]} objects, rendered with the tokenizer\'s chat template',
    )
    max_seq_len: int = _f(128, "tokens per row (rows are padded or truncated to this)", min=8)
    partition: Literal["iid", "dirichlet", "local"] | None = _f(
        None,
        "how training examples are split among clients: iid, dirichlet (one shared file), local (each client "
        "reads all of its own file: a {client} path, or one path on every host); null = local with {client} "
        "paths, else iid",
    )
    clients: int = _f(0, "run.mode central with {client} paths: train on the union of clients 1..N's files", min=0)
    dirichlet_alpha: float = _f(0.5, "concentration of the dirichlet partition (small = skewed)", gt=0)

    @property
    def scheme(self) -> str:
        """The partition in effect: data.partition, or if null, local with {client} paths, else iid."""
        return self.partition or ("local" if CLIENT in (self.train_path or "") else "iid")


@dataclass
class TrainConfig:
    steps: int = _f(100, "optimizer steps", min=1)
    batch_size: int = _f(4, "rows per client per step (central: rows per step)", min=1)
    lr: float = _f(1e-2, "peak learning rate of AdamW", gt=0)
    warmup_steps: int = _f(10, "linear warm-up steps, then linear decay to 0 at train.steps", min=0)
    weight_decay: float = _f(0.01, "AdamW weight decay", min=0)
    label_smoothing: float = _f(0.1, "label smoothing of the training loss", min=0, lt=1)
    grad_clip: float = _f(1.0, "max gradient norm per model part (0 = no clipping)", min=0)
    aggregate_every: int = _f(10, "steps between FedAvg rounds of the client adapters", min=1)
    fedavg_weights: Literal["tokens", "uniform"] = _f(
        "tokens", "FedAvg weights: tokens each client trained on since the last average; uniform: the plain mean"
    )
    eval_every: int = _f(50, "steps between validation passes (0 = only at the end)", min=0)
    clients_per_round: int = _f(
        0, "K of the live clients train in each FedAvg round, drawn from run.seed and the round (0 = all)", min=0
    )
    log_every: int = _f(10, "steps between progress lines and metrics.jsonl rows", min=1)


@dataclass
class CommConfig:
    activation_dtype: Literal["float32", "bfloat16", "float16", "int8"] = _f(
        "float32", "wire format of activations and gradients (int8: per-token absmax scaling)"
    )
    timeout_s: float = _f(300.0, "longest wait for any peer before the job is aborted", gt=0)
    micro_batches: int = _f(
        1, "split each client batch so sending one part overlaps computing the next (1 = off)", min=1
    )
    secret_file: str | None = _f(
        None,
        "file with the job secret: clients prove they hold it at the handshake; null: no check. Owned by the reading "
        "user: no group or other bits (0600 / 0400); owned by another (a Kubernetes Secret mount, root:<fsGroup> "
        "0440): no bits for others, no group write",
    )


@dataclass
class ElasticConfig:
    min_clients: int = _f(
        1, "under an elastic launch: fewer live clients than this writes a checkpoint and stops (exit 1)", min=1
    )
    client_timeout_s: float = _f(
        60.0,
        "under an elastic launch: a client silent this long within a step or round is dropped and the "
        "others go on (a plain mpirun ends the job after comm.timeout_s instead)",
        gt=0,
    )


@dataclass
class MetricsConfig:
    enabled: bool = _f(False, "serve Prometheus metrics on every rank")
    port: int = _f(9400, "base port; a rank serves on port + its local rank", min=1, max=65535)
    addr: str = _f("127.0.0.1", "address the metrics endpoint binds to")
    linger_s: float = _f(0.0, "keep the endpoint up this long after training (a last scrape for short jobs)", min=0)
    pushgateway: str | None = _f(None, "host:port of a Prometheus Pushgateway for final values; null = off")


@dataclass
class PrivacyConfig:
    clip: float = _f(0.0, "bound on each example's cut-layer activation L2 norm (0 = off)", min=0)
    noise_multiplier: float = _f(0.0, "Gaussian noise std per coordinate, in units of clip", min=0)


@dataclass
class CheckpointConfig:
    every: int = _f(0, "steps between checkpoints (0 = none)", min=0)
    keep: int = _f(2, "newest checkpoints to keep", min=1)
    resume: Literal["auto", "never"] = _f("auto", "auto: continue from the newest complete checkpoint")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out_dir or f"runs/{self.run_name}")

    @property
    def run_name(self) -> str:
        """run.name, else the mode: runs of different modes never share an out_dir by default."""
        return self.run.name or self.run.mode

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self) -> dict[str, Any]:
        """What must be equal on every rank (and in a checkpoint resumed from) for the job to
        be one model and one schedule."""
        from . import __version__

        keep = ("model.", "split.", "lora.", "comm.activation_dtype", "comm.micro_batches", "train.",
                "data.max_seq_len", "run.seed", "run.mode", "privacy.")  # fmt: skip
        return {"version": __version__, **{k: v for k, v in _flatten(self.to_dict()).items() if k.startswith(keep)}}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "config":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# ---------------------------------------------------------------- loading


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of a key given twice, silently; a config refuses it."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (the last would silently win)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def default_config_path() -> Path:
    return Path(str(resources.files("splitlora_mpi") / "default.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Defaults <- YAML file (packaged default.yaml when None) <- `key.path=value` overrides."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"--config {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = _build(JobConfig, raw, "")
    rules.check(cfg)
    return cfg


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {text!r} is not a YAML scalar") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"config key '{prefix}{unknown[0]}': unknown key (expected one of: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, value, key + ".")
        elif name == "config" and cls is ModelConfig and isinstance(value, dict):
            values[name] = _merge_model_config(value)
        else:
            values[name] = _check_value(value, tp, key, fields[name].metadata)
    return cls(**values)


def _merge_model_config(value: dict[str, Any]) -> dict[str, Any]:
    """`--set model.config.n_layer=6` edits the default dict; a YAML dict with model_type replaces it."""
    if "model_type" in value:
        return dict(value)
    return {**ModelConfig().config, **value}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_BOUNDS = {"min": ("≥", operator.ge), "max": ("≤", operator.le), "gt": (">", operator.gt), "lt": ("<", operator.lt)}


def _check_value(value: Any, tp: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    ok, coerced = _matches(value, tp)
    if not ok:
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if isinstance(coerced, (int, float)) and not isinstance(coerced, bool):
        for name, (sign, holds) in _BOUNDS.items():
            if name in meta and not holds(coerced, meta[name]):
                raise ConfigError(f"config key '{key}': expected a value {sign} {meta[name]}, got {value!r}")
    return coerced


def _matches(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, coerced = _matches(value, arg)
            if ok:
                return True, coerced
        return False, None
    if tp is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        if not isinstance(value, list):
            return False, None
        items = [_matches(v, typing.get_args(tp)[0]) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    return False, None
