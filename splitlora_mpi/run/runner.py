"""Wires one rank, alike for every mode: its transport, its mode's role, the handshake, the
step loop, and on rank 0 the checkpoints and the outputs of DESIGN §4. Imported once the
input is known good (launch.py: the preflight runs before torch is imported)."""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ElasticConfig, JobConfig
from ..data import EncodedData, Example, encode_examples, load_tokenizer, read_split, rows_of
from ..errors import ConfigError, JobFailed, Stopped
from ..fsutil import say
from ..metrics import Metrics
from ..model import hf_config
from ..modes import Mode, mode_of
from ..modes.base import ClientRole, Lead, Setup, by_rank
from ..roles.roster import Roster
from ..structure import unchecked
from ..wire import CHECKPOINT, EXPORT, FINISH, SERVER, STATS, Transport
from ..wire.local import LocalWorld
from ..wire.messages import Channel
from . import checkpoint, preflight, secret
from .handshake import client_handshake, server_handshake
from .join import JoinDesk
from .outputs import done_line, holdings, summary, write_model_outputs
from .runlog import RunLog
from .startup import Startup, elastic_launch


def start(
    cfg: JobConfig,
    transport: Transport | None,
    metrics: Metrics,
    stop_requested: Callable[[], bool],
    checked: preflight.Checked,
    startup: Startup,
    joined: dict[str, Any] | None = None,
) -> None:
    """This rank after its preflight (launch.run), on `transport` (None: a one-rank mode's
    in-process transport). `joined`: rank 0's word to a client that joined the running job
    (launch.run_joining: its id, the step, the secret's challenge)."""
    if transport is None:
        transport = LocalWorld(1).transport(0, cfg.comm.timeout_s, metrics)
    _set_threads(transport.local_size)
    if joined is not None:
        _run_client(Rank(cfg, mode_of(cfg.run.mode), transport, stop_requested, checked, startup), cfg.elastic, joined)
        return
    run_rank(cfg, transport, stop_requested, checked, startup, elastic_launch())


def run_in_process(
    cfg: JobConfig, num_clients: int, stop_requested: Callable[[], bool] = lambda: False, elastic: bool = False
) -> None:
    """Every rank of the job as a thread of this process, on the local transport: the same
    roles, handshake, checkpoints and outputs as under mpirun (for tests and debugging).
    `elastic`: as under an elastic launch (a rank may vanish, see wire.local.Vanish)."""
    mode = mode_of(cfg.run.mode)
    world = LocalWorld(1 if mode.one_rank else num_clients + 1)
    world.run(lambda t: run_rank(cfg, t, stop_requested, elastic=elastic), cfg.comm.timeout_s,
              lambda r: Metrics(r, mode.lead_role if r == SERVER else "client"))  # fmt: skip


def run_rank(
    cfg: JobConfig,
    transport: Transport,
    stop_requested: Callable[[], bool],
    checked: preflight.Checked | None = None,
    startup: Startup | None = None,
    elastic: bool = False,
) -> None:
    """One rank of the job. Without `checked` (in-process runs) the rank runs its preflight
    checks here and an error travels with the handshake. `elastic`: an elastic launch."""
    mode = mode_of(cfg.run.mode)
    startup = startup or Startup()
    if checked is None:
        checked = preflight.check(cfg, mode, transport.rank, transport.size)
        startup.lap("preflight")
    why_not = "a plain launch" if not elastic else mode.not_elastic(cfg)
    rank = Rank(cfg, mode, transport, stop_requested, checked, startup)
    if transport.rank == SERVER:
        _run_lead(rank, why_not)
    else:
        _run_client(rank, None if why_not else cfg.elastic)


# ---------------------------------------------------------------- the two kinds of rank


@dataclass
class Rank:
    """What every rank brings to its role: its config, mode and transport, the stop flag, its
    preflight result and its start-up clock."""

    cfg: JobConfig
    mode: Mode
    transport: Transport
    stop_requested: Callable[[], bool]
    checked: preflight.Checked
    startup: Startup


def _run_lead(r: Rank, not_elastic: str | None) -> None:
    """`not_elastic`: why a lost client ends the job (None: an elastic run)."""
    cfg, mode, transport = r.cfg, r.mode, r.transport
    clients = list(range(1, transport.size))
    m = transport.metrics
    elastic = None if not_elastic else cfg.elastic
    roster = Roster(clients, transport, elastic)
    error, found, fingerprint = r.checked.error, None, cfg.fingerprint()
    if error is None:
        try:
            s = _setup(cfg, transport, r.checked.examples, elastic, roster)
            fingerprint["tokenizer"] = s.tokenizer.fingerprint()
            lead = mode.lead(s)
            _serve_metrics(cfg, m, transport.local_rank)
            found = _find_checkpoint(cfg, mode, transport.size)
        except ConfigError as e:
            error = str(e)
    r.startup.lap("build")

    def share(hellos: dict[int, Any]) -> dict[str, Any]:
        return {"resume": found.step if found else None, **mode.share(cfg, hellos)}

    shared_val = cfg.data.scheme != "local"
    hellos = server_handshake(transport, clients, fingerprint, error, share, shared_val)  # (raises any error)
    r.startup.lap("handshake")
    transport.open_clients_group()
    lead.meet(hellos)
    reports = hellos or {SERVER: _hello(s, lead)}  # (alone, rank 0 is its own client)
    _announce(cfg, mode, reports)
    hosts = {socket.gethostname()} | {h["host"] for h in hellos.values()}
    if len(hosts) > 1 and r.checked.secret is None:
        say(f"warning: the ranks run on {len(hosts)} hosts and no comm.secret_file is set: any process "
            "that reaches rank 0's MPI ports with this config is taken as a client (README: Running across "
            "networks)")  # fmt: skip
    if clients and not_elastic:
        print(f"{mode.lead_role}: not elastic ({not_elastic}): a client that fails ends the job (resumable); "
              "python -m splitlora_mpi.elastic keeps going over the clients that answer", flush=True)  # fmt: skip
    saved = checkpoint.from_bytes(found.files[SERVER].read_bytes()) if found else None
    if found:  # (sent before the counters are restored: uncounted on both sides, like the client's receive)
        _announce_resize(found, clients)
        lead.load_state(saved["role"])  # (first: it refuses a checkpoint this launch cannot go on from)
        for c in mode.savers(cfg, found.step + 1, clients, roster.elastic):
            # a rank with no file (more clients now, or lost before the checkpoint) adopts another's:
            # sl's next turn takes over the travelling state, a FedAvg client the averaged adapter
            source = c if c in found.files else max(found.files)
            transport.send_object(c, CHECKPOINT, (source == c, found.files[source].read_bytes()))
        roster.load_state(saved.get("roster"))
        m.load_state(saved["metrics"])
        torch.set_rng_state(saved["torch_rng"])
        print(f"{mode.lead_role}: resuming from {checkpoint.step_dir(cfg.out_dir, saved['step'])}", flush=True)
    log = RunLog(cfg.out_dir, cfg.to_yaml(), cfg.train.steps, cfg.train.log_every, saved["log"] if saved else None)

    changing = roster.elastic or 0 < cfg.train.clients_per_round < len(clients)  # (who trains may change)

    def on_step(step: int, loss: float, tokens: int, lr: float, val: float | None) -> None:
        sent = m.total_sent() + m.received_from_ranks() + lead.client_peer_bytes(step)
        log.step(step, loss, tokens, lr, val, sent, roster.last_ids if changing else None)

    def on_checkpoint(step: int) -> None:
        state = {"step": step, "role": lead.state(), "log": log.state(), "metrics": m.state(),
                 "torch_rng": torch.get_rng_state(), "roster": roster.state()}  # fmt: skip
        savers = mode.savers(cfg, step, roster.live, roster.elastic)
        states = {
            SERVER: checkpoint.to_bytes(state),
            **roster.keep(savers, transport.recv_objects(savers, CHECKPOINT, give_up_s=roster.give_up_s), step),
        }
        _save_checkpoint(cfg, step, transport.size, states)

    desk = None
    if roster.elastic and mode.takes_joins(cfg):
        share = lambda hellos: {"resume": None, **mode.share(cfg, hellos)}  # noqa: E731
        desk = JoinDesk(cfg, transport, fingerprint, transport.size, share, r.checked.secret)
        roster.admit = desk.admit
    examples = by_rank(reports, lambda h: {"examples": h["train_rows"], "tokens": h["train_tokens"]})
    try:
        lead.run(on_step, found.step if found else 0, on_checkpoint, r.stop_requested)
    except (Stopped, JobFailed) as e:  # (a known cause: the summary says how far it got; bad input writes none)
        status = "stopped" if isinstance(e, Stopped) else "failed"
        log.close(summary(cfg, log, transport.size, **_membership(roster, status), steps=log.last_step,
                          num_clients=len(clients) + len(roster.joined) or 1, examples_by_client=examples,
                          peak_rss_mb={"server": _peak_rss_mb()}))  # fmt: skip
        raise
    finally:
        if desk is not None:
            desk.close()
    state = lead.adapter_state()
    adapter = _client_adapter(cfg, mode, transport, roster)
    if adapter is not None:
        state = {**{k: torch.from_numpy(v) for k, v in adapter.items()}, **state}
    before = m.received_from_ranks()
    stats = roster.keep(roster.live, transport.recv_objects(roster.live, STATS, give_up_s=roster.give_up_s),
                        cfg.train.steps)  # fmt: skip
    write_model_outputs(cfg, s.config, lead.parts[-1], state)
    by_kind = m.sent_by_kind()  # summary: every rank's sends, by kind
    for st in stats.values():
        by_kind = {k: by_kind[k] + st["sent"][k] for k in by_kind}
    by_kind["control"] += m.received_from_ranks() - before  # the statistics messages themselves
    parts = {"0": holdings(mode.lead_role, lead.parts), **by_rank(stats, lambda st: st["holdings"])}
    startup_s = {"0": r.startup.report(), **by_rank(stats, lambda st: st["startup_s"])}
    facts = {**mode.summary(lead, stats, _peak_rss_mb()), "num_clients": len(clients) + len(roster.joined) or 1}
    log.close(summary(cfg, log, transport.size, bytes=by_kind, **facts, examples_by_client=examples,
                      model_parts=parts, startup_s=startup_s, **_membership(roster, "complete")))  # fmt: skip
    if roster.lost or roster.joined:
        print(f"finished {cfg.train.steps} steps with {len(roster.live)} of {len(clients) + len(roster.joined)} "
              f"clients ({_changes(roster)})", flush=True)  # fmt: skip
    if roster.elastic:  # (a barrier of every rank would wait for the lost ones)
        for c in roster.live:
            transport.send_object(c, FINISH, None)
    else:
        transport.barrier("finishing")
    _finish_metrics(cfg, m)
    print(done_line(cfg), flush=True)


def _run_client(r: Rank, elastic: ElasticConfig | None, joined: dict[str, Any] | None = None) -> None:
    """`joined`: rank 0's word to a client that joined the running job (run/join.py)."""
    cfg, mode, transport = r.cfg, r.mode, r.transport
    clients = list(range(1, transport.size))
    metrics = transport.metrics
    hello: dict[str, Any] = {}
    error, fingerprint = r.checked.error, cfg.fingerprint()
    joined_at = joined["step"] if joined else None
    challenge = joined.get("challenge") if joined else None  # (a joiner's proof; at start-up: the preflight's)
    proof = {"proof": secret.answer(r.checked.secret, challenge, transport.rank, fingerprint)} if joined else {}
    if error is None:
        try:
            s = _setup(cfg, transport, r.checked.examples, elastic)
            fingerprint["tokenizer"] = s.tokenizer.fingerprint()
            role = mode.client(s)
            _serve_metrics(cfg, metrics, transport.local_rank)
            hello = _hello(s, role)
        except ConfigError as e:
            error = str(e)
    r.startup.lap("build")
    verdict = client_handshake(transport, fingerprint, {**hello, **proof}, error)
    if joined:
        print(f"client {transport.rank}: joined at step {joined_at}; training from the next round", flush=True)
    r.startup.lap("handshake")
    role.accept(verdict)
    if joined_at is None:
        transport.open_clients_group()
    if elastic:
        transport.watch_eviction()
    resume = verdict["resume"]
    if resume is not None and transport.rank in mode.savers(cfg, resume + 1, clients, elastic is not None):
        # rank 0 holds the checkpoint and sends this client its state (or another client's)
        own, data = transport.recv_objects([SERVER], CHECKPOINT)[SERVER]
        saved = checkpoint.from_bytes(data)
        if own:
            role.load_state(saved["role"])
            metrics.load_state(saved["metrics"])
            torch.set_rng_state(saved["torch_rng"])
        else:
            role.adopt(saved, resume)

    def on_checkpoint(step: int) -> None:
        state = {"step": step, "role": role.state(), "metrics": metrics.state(), "torch_rng": torch.get_rng_state()}
        transport.send_object(SERVER, CHECKPOINT, checkpoint.to_bytes(state))

    if joined_at is not None:  # the rest of the round idle, then its average: training from the next one
        resume = role.join(joined_at, on_checkpoint)
    role.run(resume or 0, on_checkpoint, r.stop_requested)
    exporter = mode.exporter(cfg, clients, elastic is not None)
    if exporter is not None and (elastic or transport.rank == exporter):  # (elastic: every live client sends it)
        adapter = {k: v.detach().cpu().numpy() for k, v in role.parts[0].adapter_state().items()}
        transport.send_object(SERVER, EXPORT, adapter, kind="adapters")
    stats = {
        "tokens": role.tokens,
        "peak_rss_mb": _peak_rss_mb(),
        "trainable_params": sum(p.trainable_numel() for p in role.parts),
        "sent": metrics.sent_by_kind(),
        "holdings": holdings("client", role.parts),
        "startup_s": r.startup.report(),
    }
    transport.send_object(SERVER, STATS, stats)
    if elastic:  # rank 0 has written every output
        transport.recv_objects([SERVER], FINISH)
    else:
        transport.barrier("finishing")  # every rank's endpoint lingers over the same window
    _finish_metrics(cfg, metrics)


# ---------------------------------------------------------------- set-up


def _setup(
    cfg: JobConfig,
    transport: Transport,
    read: dict[str, list[Example]],
    elastic: ElasticConfig | None,
    roster: Roster | None = None,
) -> Setup:
    """Tokenizer, model config, device and channel of this rank; its data on demand (cached;
    `read`: the examples the preflight read, encoded instead of reading the files again)."""
    tok = load_tokenizer(cfg.model.tokenizer)
    config = hf_config(cfg, tok.vocab_size, tok.eos_token_id, tok.pad_token_id)
    if transport.rank == SERVER and (warning := unchecked(config)):
        say(f"warning: {warning}")
    device = _device(transport.local_rank)
    dtype, _ = cfg.model.precision("server" if transport.rank == SERVER else "client")
    channel = Channel(transport, cfg.comm.activation_dtype, getattr(torch, dtype), device)
    clients = list(range(1, transport.size))
    loaded: dict[str, EncodedData] = {}

    def data(which: str) -> EncodedData:
        if which not in loaded:  # (a client reads its own {client} file; rank 0 alone, central, all of them)
            examples = read.pop(which) if which in read else read_split(cfg, which, transport.rank or None)
            loaded[which] = encode_examples(examples, tok, cfg.data.max_seq_len, cfg.data.format)
        return loaded[which]

    def rows(train: EncodedData) -> list[int]:
        return rows_of(cfg, train.groups, len(clients), transport.rank)

    return Setup(cfg, config, tok, transport, channel, device, clients, data, rows, elastic, roster)


def _hello(s: Setup, role: ClientRole | Lead) -> dict[str, Any]:
    """What rank 0 learns of a client (or, alone, of itself) before step 1."""
    train, val = s.data("train"), s.data("val")
    part, rows = role.parts[0], s.rows(train)
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "train_rows": len(rows),
        "train_tokens": int(train.attention_mask[rows].sum()),
        "truncated": train.truncated,
        "val_rows": len(val),
        "eval_rows": role.eval_rows,
        "adapter_numel": part.trainable_numel(),
        "adapter_shapes": {k: list(v.shape) for k, v in part.adapter_state().items()},
    }


def _announce(cfg: JobConfig, mode: Mode, hellos: dict[int, Any]) -> None:
    pids = " ".join(f"{r}={h['pid']}" for r, h in sorted({SERVER: {"pid": os.getpid()}, **hellos}.items()))
    print(f"{mode.lead_role}: process ids by rank {pids} (mpirun names a failed rank by its pid)", flush=True)
    cut = [x["truncated"] for x in hellos.values()]  # (each client's own file, or each the whole shared one)
    truncated = sum(cut) if cfg.data.scheme == "local" else cut[0]
    print(
        f"{mode.lead_role}: run.mode {mode.name}, {len(hellos)} client{'s' * (len(hellos) != 1)}, "
        f"{sum(x['train_rows'] for x in hellos.values())} training rows ({truncated} truncated to "
        f"{cfg.data.max_seq_len} tokens), {cfg.train.steps} steps",
        flush=True,
    )
    by_client = ", ".join(f"{r}={x['train_rows']} ({x['train_tokens']:,} tokens, {x['val_rows']} validation)"
                          for r, x in sorted(hellos.items()))  # fmt: skip
    print(f"{mode.lead_role}: examples by client {by_client}", flush=True)
    if cfg.data.val_limit:
        what = "meaning representations" if cfg.data.format == "e2e" else "rows"
        print(f"{mode.lead_role}: validation on the first {cfg.data.val_limit} {what} of the validation file "
              "(data.val_limit)", flush=True)  # fmt: skip
    if cfg.privacy.clip:
        p = cfg.privacy
        print(f"{mode.lead_role}: clients clip each example's activations to L2 norm {p.clip:g} and add Gaussian "
              f"noise of std {p.clip * p.noise_multiplier:g} per coordinate", flush=True)  # fmt: skip


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


def _client_adapter(cfg: JobConfig, mode: Mode, transport: Transport, roster: Roster) -> dict[str, Any] | None:
    """The client-side adapter if a client holds it: from the mode's exporter, or (elastic) from
    the first live client, as every live one sends it (the exporter may be lost meanwhile)."""
    exporter = mode.exporter(cfg, roster.live, roster.elastic)
    if exporter is None:
        return None
    senders = list(roster.live) if roster.elastic else [exporter]
    got = roster.keep(senders, transport.recv_objects(senders, EXPORT, "adapters", roster.give_up_s), cfg.train.steps)
    return got[min(got)] if got else None


def _changes(roster: Roster) -> str:
    """The end line's account of the clients: 'lost: 3 at step 41, killed; joined: 9 at step 50'."""
    lost = "; ".join(f"{x['rank']} at step {x['step']}, {x['reason']}" for x in roster.lost)
    joined = "; ".join(f"{x['rank']} at step {x['step']}" for x in roster.joined)
    return ", ".join(f"{what}: {text}" for what, text in (("lost", lost), ("joined", joined)) if text)


def _membership(roster: Roster, status: str) -> dict[str, Any]:
    """summary.json: how the job ended (complete / stopped / failed) and who took part (DESIGN §4)."""
    return {"status": status, "clients_lost": roster.lost, "clients_joined": roster.joined,
            "participants": roster.participants}  # fmt: skip


# ---------------------------------------------------------------- checkpoints (rank 0 writes them all)


def _find_checkpoint(cfg: JobConfig, mode: Mode, world_size: int) -> checkpoint.Found | None:
    if cfg.checkpoint.resume != "auto":
        return None
    found, warnings = checkpoint.newest_complete(cfg.out_dir, world_size, cfg.fingerprint(), mode.resizable)
    for warning in warnings:
        say(f"warning: {warning}")
    return found


def _announce_resize(found: checkpoint.Found, clients: list[int]) -> None:
    if found.world_size == len(clients) + 1:
        return
    kept = sorted(c for c in found.files if c in clients)
    print(f"server: resuming a checkpoint of {found.world_size - 1} clients with {len(clients)}: clients {kept} keep "
          "their state, the others start from the last averaged client adapter with a fresh optimizer and "
          "sampler; shared training data is partitioned anew over the clients (examples by client above)",
          flush=True)  # fmt: skip


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


# ---------------------------------------------------------------- metrics


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
            metrics.push(cfg.metrics.pushgateway, job=cfg.run_name)
        except OSError as e:
            say(f"rank {metrics.rank}: warning: push to {cfg.metrics.pushgateway} failed: {e}")
    if cfg.metrics.enabled and cfg.metrics.linger_s > 0:
        time.sleep(cfg.metrics.linger_s)
    metrics.stop()
