"""Rules across config keys: which values go together, and what each `run.mode` accepts.

Checked once when the config loads (config.load_config), before anything heavy is imported;
each broken rule raises `ConfigError` naming the key and what was expected. Kept apart from the
modes so that loading a config imports no mode, role or model code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import JobConfig

CLIENT = "{client}"  # in data paths: each client's own file (1..N)


def check(cfg: JobConfig) -> None:
    _check_partition(cfg)
    _check_keys(cfg)
    rules = MODE_RULES.get(cfg.run.mode)
    if rules is None:
        raise ConfigError(
            f"config key 'run.mode': expected one of {', '.join(map(repr, MODE_RULES))}, got {cfg.run.mode!r}"
        )
    check_partial_participation(cfg)
    rules(cfg)


def _check_keys(cfg: JobConfig) -> None:
    if cfg.model.name_or_path is None:
        model_type = cfg.model.config.get("model_type")
        if not isinstance(model_type, str) or not model_type:  # which ones exist: checked when the model is built
            raise ConfigError(
                f"config key 'model.config.model_type': expected a transformers model type (e.g. llama), "
                f"got {model_type!r}"
            )
    t = cfg.train
    if cfg.privacy.noise_multiplier and not cfg.privacy.clip:
        raise ConfigError(
            "config key 'privacy.noise_multiplier': the noise is in units of privacy.clip; expected privacy.clip > 0"
        )
    s = cfg.split
    if isinstance(s.client_layers, list) and (not s.client_layers or min(s.client_layers) < 1):
        raise ConfigError(f"config key 'split.client_layers': expected integers ≥ 1, got {s.client_layers}")
    if cfg.comm.micro_batches > 1 and s.label_private:
        raise ConfigError(
            "config key 'comm.micro_batches': micro-batches pipeline the plain split; expected 1 with "
            f"split.label_private or run.mode {cfg.run.mode}"
        )
    if cfg.comm.micro_batches > t.batch_size:
        raise ConfigError(
            f"config key 'comm.micro_batches': expected ≤ train.batch_size ({t.batch_size}), "
            f"got {cfg.comm.micro_batches}"
        )
    if s.tail_layers and not s.label_private:
        raise ConfigError("config key 'split.tail_layers': the tail is held by clients; expected split.label_private")
    if t.eval_every and t.eval_every % t.aggregate_every:
        raise ConfigError(
            f"config key 'train.eval_every': expected a multiple of train.aggregate_every ({t.aggregate_every}) "
            f"so validation sees averaged adapters, got {t.eval_every}"
        )


def _check_partition(cfg: JobConfig) -> None:
    """local with a plain path: each client reads all of the file at that path on its own host."""
    d = cfg.data
    own = CLIENT in (d.train_path or "")
    if own and d.scheme != "local":
        raise ConfigError(
            f"config key 'data.partition': {d.partition} splits one shared file, but data.train_path "
            f"{d.train_path!r} names each client's own; expected local (or null)"
        )
    if CLIENT in (d.val_path or "") and not own:
        raise ConfigError(
            f"config key 'data.val_path': {CLIENT} in the validation path needs it in data.train_path too; "
            "expected both or neither"
        )
    if d.scheme == "local" and (d.train_path is None or d.val_path is None):
        raise ConfigError(
            "config key 'data.train_path': data.partition local reads each client's own files; expected "
            "data.train_path and data.val_path to be set"
        )


# ---------------------------------------------------------------- the rules of each mode


def _splitlora(cfg: JobConfig) -> None:
    if cfg.split.server_update == "sequential":
        if cfg.comm.micro_batches > 1:
            refuse_option(cfg, "split.server_update", "sequential",
                          "steps the server on each client's whole batch; expected joint with "
                          "comm.micro_batches > 1 (or comm.micro_batches 1)")  # fmt: skip
        if cfg.split.label_private:
            refuse_option(cfg, "split.server_update", "sequential",
                          "is not built for split.label_private (the loss on the clients' tails); expected "
                          "joint")  # fmt: skip
    if len(cfg.split.cuts()) > 1:
        refuse_option(cfg, "train.fedavg_weights", "uniform",
                      "is not built for per-client cut points (the server's copies of client blocks join "
                      "their FedAvg by tokens); expected tokens")  # fmt: skip


def _sl(cfg: JobConfig) -> None:
    _refuse_per_client_cuts(cfg)
    refuse_option(cfg, "split.server_update", "sequential",
                  "is what sl's server does anyway (one client per step); expected joint")  # fmt: skip
    refuse_option(cfg, "train.fedavg_weights", "uniform",
                  "weights a FedAvg, which sl does not run (its model travels); expected tokens")  # fmt: skip


def _fedlora(cfg: JobConfig) -> None:
    _refuse_cut_options(cfg)
    if CLIENT in (cfg.data.val_path or ""):
        raise ConfigError(
            "config key 'data.val_path': fedlora's rank 0 evaluates the averaged model on one shared "
            f"validation file; expected a path without {CLIENT} (or run.mode splitlora / sl)"
        )
    every, t = cfg.checkpoint.every, cfg.train
    if every and every % t.aggregate_every:
        raise ConfigError(
            f"config key 'checkpoint.every': fedlora checkpoints at the end of a round; expected a multiple of "
            f"train.aggregate_every ({t.aggregate_every}), got {every}"
        )


def _central(cfg: JobConfig) -> None:
    _refuse_cut_options(cfg)
    refuse_option(cfg, "train.fedavg_weights", "uniform",
                  "weights a FedAvg, which central does not run; expected tokens")  # fmt: skip
    if CLIENT in (cfg.data.train_path or "") and cfg.data.clients < 1:
        raise ConfigError(
            "config key 'data.clients': run.mode central with {client} paths trains on the union of the "
            "files of clients 1..N; expected N ≥ 1"
        )


MODE_RULES: dict[str, Callable[[JobConfig], None]] = {
    "splitlora": _splitlora,
    "sl": _sl,
    "fedlora": _fedlora,
    "central": _central,
}


def check_partial_participation(cfg: JobConfig) -> None:
    """train.clients_per_round: FedAvg rounds of a sample of the clients (splitlora, fedlora)."""
    t, every, mode = cfg.train, cfg.checkpoint.every, cfg.run.mode
    if not t.clients_per_round:
        return
    if mode not in ("splitlora", "fedlora"):
        raise ConfigError(f"config key 'train.clients_per_round': run.mode {mode} has no FedAvg rounds to sample "
                          "clients for; expected 0 (or run.mode splitlora / fedlora)")  # fmt: skip
    if len(cfg.split.cuts()) > 1:
        raise ConfigError("config key 'train.clients_per_round': not built for per-client split.client_layers; "
                          "expected 0 or one cut point")  # fmt: skip
    if every and every % t.aggregate_every:
        raise ConfigError(f"config key 'checkpoint.every': with train.clients_per_round clients checkpoint at the "
                          f"end of a round; expected a multiple of train.aggregate_every ({t.aggregate_every}), "
                          f"got {every}")  # fmt: skip


def _refuse_per_client_cuts(cfg: JobConfig) -> None:
    """One cut point per client: a splitlora rule (its server runs the blocks in between)."""
    if isinstance(cfg.split.client_layers, list):
        raise ConfigError(
            f"config key 'split.client_layers': one cut point per client needs run.mode splitlora (got "
            f"{cfg.run.mode}); expected one integer"
        )


def refuse_option(cfg: JobConfig, key: str, value: str, why: str) -> None:
    """Refuse `key: value` (a dotted config key), saying why and what to use instead."""
    section, name = key.split(".")
    if getattr(getattr(cfg, section), name) == value:
        raise ConfigError(f"config key '{key}': {value} {why}")


def _refuse_cut_options(cfg: JobConfig) -> None:
    """The rules of a mode that sends no activations (every rank holds the whole model)."""
    mode, s = cfg.run.mode, cfg.split
    if cfg.privacy.clip:
        raise ConfigError(
            f"config key 'privacy.clip': privacy protects cut-layer activations, which run.mode {mode} "
            "does not send; expected 0 or run.mode splitlora / sl"
        )
    _refuse_per_client_cuts(cfg)
    if s.label_private or s.tail_layers:
        raise ConfigError(
            f"config key 'split.label_private': run.mode {mode} sends no activations; expected false "
            "or run.mode splitlora / sl"
        )
    if cfg.comm.micro_batches > 1:
        raise ConfigError(
            "config key 'comm.micro_batches': micro-batches pipeline the plain split; expected 1 with "
            f"split.label_private or run.mode {mode}"
        )
    refuse_option(cfg, "split.server_update", "sequential",
                  f"steps the server once per client's activations, which run.mode {mode} does not send; "
                  "expected joint or run.mode splitlora")  # fmt: skip
