"""Wires one rank together: threads, data and model for its role, the handshake, the
training loop, and (rank 0) the outputs of DESIGN §4."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import checkpoint
from .config import ConfigError, JobConfig
from .data import (
    EncodedData,
    Tokenizer,
    encode_examples,
    load_tokenizer,
    packaged_data_paths,
    partition,
    read_examples,
)
from .metrics import Metrics
from .model import SplitPart, build_base, export_adapter, hf_config
from .protocol import CHECKPOINT, EXPORT, SERVER, STATS, Transport, world_rank, world_size
from .runlog import RunLog, atomic_dir, check_writable, say
from .training import aggregations_until, sl_owner


def run(cfg: JobConfig) -> None:
    """Run this rank's part of the job (raises ConfigError for bad input)."""
    _quiet_libraries()
    if cfg.run.mode == "central":
        if world_size() > 1:
            raise ConfigError(
                f"config key 'run.mode': 'central' runs on one rank, got {world_size()} ranks; "
                "start it without mpirun: python -m splitlora_mpi --set run.mode=central"
            )
        _catch_stop_signals(0)
        _set_threads(1)
        return _run_central(cfg, Metrics(0, "central", export=_exported(cfg)))
    if world_size() < 2:
        raise ConfigError(
            f"config key 'run.mode': '{cfg.run.mode}' needs 1 server + at least 1 client rank, got 1 rank. "
            "Launch with `mpirun -n 9 python -m splitlora_mpi` using the mpirun of the MPI that mpi4py loaded "
            "(pip's mpich wheel puts it next to python); another launcher starts N separate 1-rank jobs"
        )
    rank = world_rank()
    _catch_stop_signals(rank)
    metrics = Metrics(rank, "server" if rank == SERVER else "client", export=_exported(cfg))
    transport = Transport(cfg.comm.timeout_s, metrics)
    _set_threads(transport.local_size)
    if rank == SERVER:
        _run_server(cfg, transport)
    else:
        _run_client(cfg, transport)


# ---------------------------------------------------------------- set-up

_STOP = threading.Event()


def _catch_stop_signals(rank: int) -> None:
    """SIGTERM / SIGINT (pre-emption, Ctrl-C): stop after the current step with a checkpoint
    (exit code 143); a second signal exits at once. mpirun forwards a signal to every rank;
    rank 0 says what happens (os.write: print is not safe inside a signal handler)."""

    def handler(signum: int, frame: Any) -> None:
        if _STOP.is_set():
            if rank == 0:
                os.write(2, f"second signal ({signum}): exiting at once, without a checkpoint\n".encode())
            os._exit(128 + signum)
        _STOP.set()
        if rank == 0:
            os.write(
                2,
                f"signal {signum}: stopping after this step with a checkpoint; signal again to exit at once\n".encode(),
            )

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _quiet_libraries() -> None:
    """Hugging Face progress bars and notices on every rank drown the progress lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _set_threads(local_ranks: int) -> None:
    """Oversubscribed torch threads are 10-25x slower: share the cores among local ranks."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokenizer_and_config(cfg: JobConfig) -> tuple[Tokenizer, Any]:
    tok = load_tokenizer(cfg.model.tokenizer)
    return tok, hf_config(cfg, tok.vocab_size, tok.eos_token_id, tok.pad_token_id)


def _data_paths(cfg: JobConfig) -> tuple[Path, Path]:
    train, val = packaged_data_paths()
    if (cfg.data.train_path is None or cfg.data.val_path is None) and cfg.data.format != "e2e":
        raise ConfigError(
            "config key 'data.val_path': the packaged sample is e2e; set data.train_path and "
            "data.val_path for data.format=jsonl"
        )
    return Path(cfg.data.train_path or train), Path(cfg.data.val_path or val)


def _load_data(cfg: JobConfig, tok: Tokenizer) -> tuple[EncodedData, EncodedData]:
    train_path, val_path = _data_paths(cfg)
    fmt, t = cfg.data.format, cfg.data.max_seq_len
    train = encode_examples(read_examples(train_path, fmt), tok, t, fmt)
    val = encode_examples(read_examples(val_path, fmt), tok, t, fmt)
    return train, val


def _param_count(part: SplitPart) -> int:
    return sum(p.numel() for p in part.trainable_parameters())


def _holdings(role: str, parts: list[SplitPart]) -> dict[str, Any]:
    """What one rank holds, for summary.json `model_parts`: its blocks, its base (non-LoRA)
    parameters counted once by name, and the checkpoint keys it read."""
    base = {n: p.numel() for part in parts for n, p in part.peft.named_parameters() if "lora_" not in n}
    return {
        "role": role,
        "blocks": sorted({b for part in parts for b in part.blocks_held()}),
        "base_params": sum(base.values()),
        "tensors_read": sorted({k for part in parts for k in part.tensors_read}),
    }


# ---------------------------------------------------------------- central


def _run_central(cfg: JobConfig, metrics: Metrics) -> None:
    from .central import Central

    check_writable(cfg.out_dir)
    tok, config = _tokenizer_and_config(cfg)
    train, val = _load_data(cfg, tok)
    found = _find_checkpoint(cfg, 1)
    _serve_metrics(cfg, metrics, 0)
    rows = partition(train.groups, 1, cfg.data.partition, cfg.data.dirichlet_alpha, cfg.run.seed)[0]
    device = _device(0)
    client_part = SplitPart(cfg, config, "client", device)
    server_part = SplitPart(cfg, config, "server", device)
    job = Central(cfg, client_part, server_part, train, rows, val, metrics)
    saved = checkpoint.from_bytes(found.files[0].read_bytes()) if found else None
    if saved:
        job.load_state(saved["central"])
        metrics.load_state(saved["metrics"])
        print(f"central: resuming from {checkpoint.step_dir(cfg.out_dir, saved['step'])}", flush=True)
    log = RunLog(cfg.out_dir, cfg.to_yaml(), cfg.train.steps, cfg.train.log_every, saved["log"] if saved else None)
    print(f"central: {len(rows)} training rows, {len(val)} validation rows, {cfg.train.steps} steps", flush=True)

    def on_checkpoint(step: int) -> None:
        state = {"step": step, "central": job.state(), "log": log.state(), "metrics": metrics.state()}
        _save_checkpoint(cfg, step, 1, {0: checkpoint.to_bytes(state)})

    job.run(
        lambda step, loss, tokens, lr, val_loss: log.step(step, loss, tokens, lr, val_loss, 0),
        saved["step"] if saved else 0,
        on_checkpoint,
        _STOP.is_set,
    )
    _write_model_outputs(cfg, config, server_part, {**client_part.adapter_state(), **server_part.adapter_state()})
    rss = _peak_rss_mb()
    log.close(_summary(
        cfg, log, world_size=1, num_clients=1, bytes=metrics.sent_by_kind(),
        tokens_by_client=[job.tokens],
        client_trainable_params=_param_count(client_part), server_trainable_params=_param_count(server_part),
        peak_rss_mb={"server": rss, "client_max": rss},
        model_parts={"0": _holdings("central", [client_part, server_part])},
    ))  # fmt: skip
    _finish_metrics(cfg, metrics)


# ---------------------------------------------------------------- checkpoints (rank 0 writes them all)


def _find_checkpoint(cfg: JobConfig, world_size: int) -> checkpoint.Found | None:
    if cfg.checkpoint.resume != "auto":
        return None
    found, warnings = checkpoint.newest_complete(cfg.out_dir, world_size, cfg.fingerprint())
    for warning in warnings:
        say(f"warning: {warning}")
    return found


def _save_checkpoint(cfg: JobConfig, step: int, world_size: int, states: dict[int, bytes]) -> None:
    """Every rank's file, then the manifest, then prune; one progress line with size and time."""
    start = time.perf_counter()
    hashes = {rank: checkpoint.save_rank(cfg.out_dir, step, rank, data) for rank, data in states.items()}
    checkpoint.write_manifest(cfg.out_dir, step, world_size, cfg.fingerprint(), hashes)
    checkpoint.prune(cfg.out_dir, cfg.checkpoint.keep)
    size = sum(len(data) for data in states.values())
    print(
        f"checkpoint {checkpoint.step_dir(cfg.out_dir, step)}: {len(states)} rank files, {size / 1e3:,.1f} kB, "
        f"written in {(time.perf_counter() - start) * 1e3:.0f} ms",
        flush=True,
    )


# ---------------------------------------------------------------- split roles


def _exporter(cfg: JobConfig, num_clients: int) -> int | None:
    """The client rank that sends rank 0 the final client adapter (fedlora: rank 0 has it)."""
    if cfg.run.mode == "fedlora":
        return None
    if cfg.run.mode == "sl":  # the client that trained last holds the travelling client model
        return sl_owner(cfg.train.steps, cfg.train, num_clients) + 1
    cuts = cfg.split.cuts()  # after the final average every client holds the same values of its blocks:
    return cuts.index(max(cuts)) + 1  # the one with the most blocks has them all


def _check_cut_points(cfg: JobConfig, num_clients: int) -> None:
    cuts = cfg.split.cuts()
    if len(cuts) > 1 and len(cuts) != num_clients:
        raise ConfigError(
            f"config key 'split.client_layers': {len(cuts)} cut points for {num_clients} clients; expected one "
            "value per client (or a single value for all)"
        )


def _savers(cfg: JobConfig, step: int, clients: list[int]) -> list[int]:
    """The clients whose state a checkpoint of `step` holds (sl: only the one whose turn it is)."""
    if cfg.run.mode == "sl":
        return [clients[sl_owner(step, cfg.train, len(clients))]]
    return clients


def _run_client(cfg: JobConfig, transport: Transport) -> None:
    from .client import Client
    from .fedlora import FedClient

    num_clients = transport.size - 1
    index = transport.rank - 1
    hello: dict[str, Any] = {}
    error = None
    try:
        tok, config = _tokenizer_and_config(cfg)
        train, val = _load_data(cfg, tok)
        rows = partition(train.groups, num_clients, cfg.data.partition, cfg.data.dirichlet_alpha, cfg.run.seed)[index]
        device = _device(transport.local_rank)
        _check_cut_points(cfg, num_clients)
        parts = [SplitPart(cfg, config, "client", device, index)]
        if cfg.run.mode == "fedlora":  # the whole model, as two parts (exactly as central)
            from .central import Central

            parts.append(SplitPart(cfg, config, "server", device))
            role: Any = FedClient(Central(cfg, *parts, train, rows, val, transport.metrics, index), transport)
        else:
            role = Client(cfg, parts[0], train, rows, val, transport, index, num_clients)
        _serve_metrics(cfg, transport.metrics, transport.local_rank)
        hello = {
            "pid": os.getpid(),
            "val_rows": len(val),
            "adapter_numel": _param_count(parts[0]),
            "adapter_shapes": {k: list(v.shape) for k, v in parts[0].adapter_state().items()},
            "train_rows": len(rows),
            "truncated": train.truncated,
        }
    except ConfigError as e:
        error = str(e)
    verdict = transport.client_handshake(cfg.fingerprint(), hello, error)
    resume = verdict["resume"]
    if cfg.run.mode == "splitlora":
        role.layout = verdict["layout"]
    transport.open_clients_group()
    if resume is not None and transport.rank in _savers(cfg, resume + 1, list(range(1, num_clients + 1))):
        # rank 0 holds the checkpoint and sends this client its state
        saved = checkpoint.from_bytes(transport.recv_objects([SERVER], CHECKPOINT)[SERVER])
        role.load_state(saved["client"])
        transport.metrics.load_state(saved["metrics"])

    def on_checkpoint(step: int) -> None:
        state = {"step": step, "client": role.state(), "metrics": transport.metrics.state()}
        transport.send_object(SERVER, CHECKPOINT, checkpoint.to_bytes(state))

    role.run(resume or 0, on_checkpoint, _STOP.is_set)
    if transport.rank == _exporter(cfg, num_clients):
        adapter = {k: v.detach().cpu().numpy() for k, v in parts[0].adapter_state().items()}
        transport.send_object(SERVER, EXPORT, adapter, kind="adapters")
    stats = {
        "tokens": role.tokens,
        "peak_rss_mb": _peak_rss_mb(),
        "trainable_params": sum(_param_count(p) for p in parts),
        "sent": transport.metrics.sent_by_kind(),
        "holdings": _holdings("client", parts),
    }
    transport.send_object(SERVER, STATS, stats)
    transport.barrier("finishing")  # every rank's endpoint lingers over the same window
    _finish_metrics(cfg, transport.metrics)


def _run_server(cfg: JobConfig, transport: Transport) -> None:
    from .fedlora import FedServer
    from .server import Server

    clients = list(range(1, transport.size))
    error, found = None, None
    try:
        check_writable(cfg.out_dir)
        tok, config = _tokenizer_and_config(cfg)
        device = _device(transport.local_rank)
        _check_cut_points(cfg, len(clients))
        part = SplitPart(cfg, config, "server", device)
        held = [part]
        if cfg.run.mode == "fedlora":  # rank 0 evaluates the averaged whole model
            client_part = SplitPart(cfg, config, "client", device)
            held.append(client_part)
            val = encode_examples(read_examples(_data_paths(cfg)[1], cfg.data.format), tok, cfg.data.max_seq_len,
                                  cfg.data.format)  # fmt: skip
        _serve_metrics(cfg, transport.metrics, transport.local_rank)
        found = _find_checkpoint(cfg, transport.size)
    except ConfigError as e:
        error = str(e)
    hetero = len(cfg.split.cuts()) > 1

    def share(hellos: dict[int, Any]) -> dict[str, Any]:
        """The resume step, and with per-client cut points every client-side adapter tensor."""
        layout = {k: v for c in clients for k, v in hellos[c]["adapter_shapes"].items()} if hetero else None
        return {"resume": found.step if found else None, "layout": layout}

    hellos = transport.server_handshake(clients, cfg.fingerprint(), error, share)
    transport.open_clients_group()
    h = hellos[1]
    pids = " ".join(f"{r}={p}" for r, p in [(SERVER, os.getpid())] + [(c, hellos[c]["pid"]) for c in clients])
    print(f"server: process ids by rank {pids} (mpirun names a failed rank by its pid)", flush=True)
    print(
        f"server: {cfg.run.mode}, {len(clients)} clients, {sum(x['train_rows'] for x in hellos.values())} training "
        f"rows ({h['truncated']} truncated to {cfg.data.max_seq_len} tokens), {h['val_rows']} validation rows, "
        f"{cfg.train.steps} steps",
        flush=True,
    )
    if cfg.privacy.clip:
        p = cfg.privacy
        print(f"server: clients clip each example's activations to L2 norm {p.clip:g} and add Gaussian noise "
              f"of std {p.clip * p.noise_multiplier:g} per coordinate", flush=True)  # fmt: skip
    if cfg.run.mode == "fedlora":
        role: Any = FedServer(cfg, client_part, part, val, transport)
    else:
        adapters = {c: hellos[c]["adapter_shapes"] for c in clients} if hetero else None
        role = Server(cfg, part, transport, clients, h["val_rows"], adapters)
    m = transport.metrics
    saved = checkpoint.from_bytes(found.files[SERVER].read_bytes()) if found else None
    if found:  # (sent before the counters are restored: uncounted on both sides, like the client's receive)
        for c in _savers(cfg, found.step + 1, clients):
            source = c if c in found.files else max(found.files)  # sl: the next turn takes over the state
            transport.send_object(c, CHECKPOINT, found.files[source].read_bytes())
        role.load_state(saved["server"])
        m.load_state(saved["metrics"])
        print(f"server: resuming from {checkpoint.step_dir(cfg.out_dir, saved['step'])}", flush=True)
    log = RunLog(cfg.out_dir, cfg.to_yaml(), cfg.train.steps, cfg.train.log_every, saved["log"] if saved else None)

    def client_peer_bytes(step: int) -> int:
        """What clients sent each other so far (rank 0 sees everything else)."""
        if cfg.run.mode == "sl":
            return role.handoff_bytes
        if cfg.run.mode == "fedlora":  # every rank's Allreduce buffer is the size of rank 0's
            return len(clients) * m.sent_bytes[("all", "adapters")]
        if hetero:  # every rank's Allreduce buffer is the size of rank 0's
            return len(clients) * m.sent_bytes[("all", "adapters")]
        return aggregations_until(step, cfg.train) * len(clients) * (h["adapter_numel"] + 1) * 8

    def on_step(step: int, loss: float, tokens: int, lr: float, val: float | None) -> None:
        log.step(step, loss, tokens, lr, val, m.total_sent() + m.received_from_ranks() + client_peer_bytes(step))

    def on_checkpoint(step: int) -> None:
        state = {"step": step, "server": role.state(), "log": log.state(), "metrics": m.state()}
        states = {SERVER: checkpoint.to_bytes(state), **transport.recv_objects(_savers(cfg, step, clients), CHECKPOINT)}
        _save_checkpoint(cfg, step, transport.size, states)

    role.run(on_step, found.step if found else 0, on_checkpoint, _STOP.is_set)
    exporter = _exporter(cfg, len(clients))
    if exporter is None:
        state = role.adapter_state()
    else:
        adapter = transport.recv_objects([exporter], EXPORT, kind="adapters")[exporter]
        state = {**{k: torch.from_numpy(v) for k, v in adapter.items()}, **part.adapter_state()}
    before = m.received_from_ranks()
    stats = transport.recv_objects(clients, STATS)
    _write_model_outputs(cfg, config, part, state)
    by_kind = m.sent_by_kind()  # summary: every rank's sends, by kind
    for s in stats.values():
        by_kind = {k: by_kind[k] + s["sent"][k] for k in by_kind}
    by_kind["control"] += m.received_from_ranks() - before  # the statistics messages themselves
    log.close(_summary(
        cfg, log, world_size=transport.size, num_clients=len(clients), bytes=by_kind,
        tokens_by_client=[stats[c]["tokens"] for c in clients],
        client_trainable_params=max(s["trainable_params"] for s in stats.values()),
        server_trainable_params=0 if cfg.run.mode == "fedlora" else _param_count(part),
        peak_rss_mb={"server": _peak_rss_mb(), "client_max": max(s["peak_rss_mb"] for s in stats.values())},
        peak_rss_mb_by_client=[round(stats[c]["peak_rss_mb"], 1) for c in clients],
        model_parts={"0": _holdings("server", held),
                     **{str(c): stats[c]["holdings"] for c in clients}},
    ))  # fmt: skip
    transport.barrier("finishing")
    _finish_metrics(cfg, m)


# ---------------------------------------------------------------- outputs


def _write_model_outputs(cfg: JobConfig, config: Any, part: SplitPart, state: dict[str, torch.Tensor]) -> None:
    """adapter/ (one PEFT adapter, client + server layers) and base/ when built from config."""
    out = cfg.out_dir
    base_ref = cfg.model.name_or_path
    if base_ref is not None and base_ref.startswith("~"):
        base_ref = str(Path(base_ref).expanduser())  # loaders other than ours do not expand it
    if base_ref is None:
        base_ref = str((out / "base").resolve())
        with atomic_dir(out / "base") as tmp:
            build_base(cfg, config, "full", torch.device("cpu")).save_pretrained(tmp)
    with atomic_dir(out / "adapter") as tmp:
        export_adapter(tmp, part, state, base_ref)


def _summary(cfg: JobConfig, log: RunLog, **facts: Any) -> dict[str, Any]:
    """summary.json: the run's totals plus the facts only the caller knows (DESIGN §4 keys)."""
    wall = log.wall_s
    facts["peak_rss_mb"] = {k: round(v, 1) for k, v in facts["peak_rss_mb"].items()}
    return {
        "mode": cfg.run.mode,
        "world_size": facts.pop("world_size"),
        "num_clients": facts.pop("num_clients"),
        "steps": cfg.train.steps,
        "tokens": log.tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": log.tokens / wall,
        "final_train_loss": log.last_train_loss,
        "final_val_loss": log.last_val_loss,
        "privacy": {"clip": cfg.privacy.clip, "noise_std": cfg.privacy.clip * cfg.privacy.noise_multiplier},
        **facts,
    }


# ---------------------------------------------------------------- metrics


def _exported(cfg: JobConfig) -> bool:
    return cfg.metrics.enabled or cfg.metrics.pushgateway is not None


def _serve_metrics(cfg: JobConfig, metrics: Metrics, local_rank: int) -> None:
    if not cfg.metrics.enabled:
        return
    port = cfg.metrics.port + local_rank
    try:
        metrics.serve(cfg.metrics.addr, port)
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            f"config key 'metrics.port': cannot serve metrics of rank {metrics.rank} on {cfg.metrics.addr}:{port} "
            f"({reason}); expected a free port (each rank uses metrics.port + its local rank)"
        ) from None


def _finish_metrics(cfg: JobConfig, metrics: Metrics) -> None:
    """Final values for short jobs: push them, and/or keep /metrics up for a last scrape."""
    if cfg.metrics.pushgateway:
        try:
            metrics.push(cfg.metrics.pushgateway, job=cfg.run.name)
        except OSError as e:
            say(f"rank {metrics.rank}: warning: push to {cfg.metrics.pushgateway} failed: {e}")
    if cfg.metrics.enabled and cfg.metrics.linger_s > 0:
        time.sleep(cfg.metrics.linger_s)
    metrics.stop()
