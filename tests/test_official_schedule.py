"""`split.server_update: sequential` + `train.fedavg_weights: uniform` reproduce the official
SplitLoRA code's training loop (FDU-INC/Split_LoRA, SplitLoRA/examples/src/gpt2_ft_sfl.py):
a single-process reference of that loop, written here from the package's model parts, against
a real mpirun run; plus the option's rules and its one-client equality with joint and central."""

from __future__ import annotations

import pytest
import torch
from conftest import run_adapter, run_cmd, run_local, run_rows, splitlora

from splitlora_mpi.aggregate import weighted_mean
from splitlora_mpi.config import load_config
from splitlora_mpi.data import Sampler, encode_examples, load_tokenizer, make_batch, read_split, rows_of
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.model import SplitPart, hf_config, joined_adapter_state
from splitlora_mpi.training import PartTrainer, lm_loss_sum

OFFICIAL = ("split.server_update=sequential", "train.fedavg_weights=uniform")
STEPS, AGGREGATE_EVERY = 6, 2


def official_loop(sets: list[str], clients: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The official loop on the package's parts; returns (the loss of each round, its clients'
    losses weighted by target tokens; the adapter: client 1's blocks and the server's, under
    their PEFT keys). Line numbers: gpt2_ft_sfl.py.

    Deviations from the official code, on purpose (docs/design.md, "The official schedule"): it counts
    `aggregate_step` in client steps (train_step += 1 per client, l. 362), here rounds
    (train.aggregate_every); it averages copies taken at the forward of the last N+1 client
    steps (l. 364-365: pre-update weights, one client twice), here each client's adapter after
    its update, once; its client optimizers have no schedule (l. 643, only scheduler_Server,
    l. 654), here every optimizer follows train's warm-up/decay (the server's over N x the
    updates)."""
    cfg = load_config(None, sets)
    tok = load_tokenizer(cfg.model.tokenizer)
    config = hf_config(cfg, tok.vocab_size, tok.eos_token_id, tok.pad_token_id)
    train = encode_examples(read_split(cfg, "train", None), tok, cfg.data.max_seq_len, cfg.data.format)
    cpu = torch.device("cpu")
    server = SplitPart(cfg, config, "server", cpu)
    client_models = [SplitPart(cfg, config, "client", cpu, i) for i in range(clients)]  # l. 640-645
    optimizer_server = PartTrainer(server, cfg.train, updates_per_step=clients)  # l. 629, 654: stepped per client
    optimizers = [PartTrainer(m, cfg.train) for m in client_models]  # l. 643
    loaders = [Sampler(rows_of(cfg, train.groups, clients, i + 1), cfg.train.batch_size, cfg.run.seed, i)
               for i in range(clients)]  # fmt: skip
    losses = []
    for idx in range(1, cfg.train.steps + 1):  # l. 348: one batch of every client per round
        loss_sum, targets = 0.0, 0
        for i in range(clients):  # l. 350: the clients in turn, fixed order
            data = make_batch(train, loaders[i].next_indices())
            hidden_states = client_models[i](data.input_ids, data.attention_mask)  # l. 361
            client_hidden_states = hidden_states.clone().detach().requires_grad_(True)  # l. 367
            lm_sum, n = lm_loss_sum(server(client_hidden_states, data.attention_mask), data.labels,
                                    cfg.train.label_smoothing)  # l. 369-378  # fmt: skip
            (lm_sum / n).backward()  # optimizer_step l. 230
            dfx_client = client_hidden_states.grad.clone().detach()  # l. 233
            optimizer_server.step()  # l. 235-246: clip, server step, zero_grad, scheduler step
            hidden_states.backward(dfx_client)  # l. 248
            optimizers[i].step()  # l. 249-250
            loss_sum, targets = loss_sum + float(lm_sum.detach()), targets + n
        losses.append(loss_sum / targets)
        if idx % cfg.train.aggregate_every == 0:  # l. 396
            states = [m.adapter_state() for m in client_models]
            mean = weighted_mean(states, [1.0] * clients)  # fed_avg, l. 190-196 (in float64, as the Allreduce)
            for m in client_models:  # l. 422-424
                m.load_adapter_state(mean)
    return losses, joined_adapter_state([client_models[0], server])


def _sets(out, *extra: str) -> list[str]:
    return [f"run.out_dir={out}", f"train.steps={STEPS}", f"train.aggregate_every={AGGREGATE_EVERY}",
            "train.batch_size=2", "train.eval_every=0", "train.log_every=1", "train.warmup_steps=2",
            *extra]  # fmt: skip


def test_sequential_uniform_under_mpirun_equals_the_official_loop(tmp_path):
    sets = _sets(tmp_path / "run", *OFFICIAL)
    r = run_cmd(splitlora(*(a for s in sets for a in ("--set", s)), ranks=4), tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    torch.set_num_threads(1)  # (as each rank: the same float sums)
    losses, adapter = official_loop(sets, clients=3)
    assert [row["train_loss"] for row in run_rows(tmp_path / "run")] == pytest.approx(losses, rel=1e-5)
    exported = run_adapter(tmp_path / "run")
    assert exported.keys() == adapter.keys() and len(adapter) == 4 * 2  # 4 blocks x c_attn x (A, B)
    for k, v in adapter.items():
        assert torch.allclose(exported[k], v, rtol=1e-5, atol=1e-6), (k, (exported[k] - v).abs().max())


def test_the_reference_tells_a_server_that_steps_once_per_round(tmp_path):
    """The check above can fail: the joint schedule (one server step on every client's batch)
    is not the official loop."""
    sets = _sets(tmp_path / "run", "train.fedavg_weights=uniform")
    run_local(tmp_path / "run", 3, *sets)
    losses, _ = official_loop([*sets, "split.server_update=sequential"], clients=3)
    joint = [row["train_loss"] for row in run_rows(tmp_path / "run")]
    # (from round 1 on: there the official loop's clients 2 and 3 already meet a server that stepped)
    assert len(joint) == len(losses) and all(abs(a - b) > 1e-4 * b for a, b in zip(joint, losses))


@pytest.mark.parametrize(
    "sets, key",
    [
        (["split.server_update=sequential", "comm.micro_batches=2"], "split.server_update"),
        (["split.server_update=sequential", "split.label_private=true"], "split.server_update"),
        (["split.server_update=sequential", "run.mode=sl"], "split.server_update"),
        (["split.server_update=sequential", "run.mode=fedlora"], "split.server_update"),
        (["split.server_update=sequential", "run.mode=central"], "split.server_update"),
        (["train.fedavg_weights=uniform", "run.mode=sl"], "train.fedavg_weights"),
        (["train.fedavg_weights=uniform", "run.mode=central"], "train.fedavg_weights"),
        (["train.fedavg_weights=uniform", "split.client_layers=[1, 2]"], "train.fedavg_weights"),
        (["split.server_update=alternate"], "split.server_update"),
    ],
)
def test_options_that_make_no_sense_with_it_are_refused_naming_the_key(sets, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, sets)


def test_a_divergence_in_the_middle_of_a_round_ends_every_rank_with_exit_2(tmp_path):
    """The clients answered before the diverging one already went on: rank 0 aborts them
    (exit 2, the error once) instead of leaving them to the deadline."""
    sets = _sets(tmp_path / "run", "split.server_update=sequential", "train.lr=1e30", "train.warmup_steps=0",
                 "comm.timeout_s=120")  # fmt: skip
    r = run_cmd(splitlora(*(a for s in sets for a in ("--set", s)), ranks=4), tmp_path, timeout=100)
    assert r.returncode == 2 and r.stderr.count("error: training diverged: the loss is nan at step 1") == 1, r.stderr
