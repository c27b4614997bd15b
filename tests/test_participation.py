"""train.clients_per_round: K of the live clients train in each FedAvg round (in-process runs)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_adapter, run_local, run_rows, run_summary

from splitlora_mpi.config import load_config
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.roles.participation import draw

SETS = ["train.steps=12", "train.aggregate_every=3", "train.eval_every=6", "train.warmup_steps=2"]


def same_adapter(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_draw_is_reproducible_and_of_k_live_clients():
    assert draw([1, 2, 3, 4], 2, 0, 7) == draw([4, 3, 2, 1], 2, 0, 7)
    assert len(draw([1, 2, 3, 4], 2, 0, 7)) == 2 and set(draw([1, 2, 3, 4], 2, 0, 7)) <= {1, 2, 3, 4}
    assert len({tuple(draw([1, 2, 3, 4], 2, 0, s)) for s in range(1, 40, 3)}) > 1  # rounds differ
    assert draw([2, 5], 3, 0, 1) == [2, 5]  # fewer live than K: all of them


@pytest.mark.parametrize("mode", ["splitlora", "fedlora"])
def test_k_of_n_is_reproducible_and_idle_clients_do_no_work(tmp_path, mode):
    sets = [*SETS, f"run.mode={mode}"]
    a = run_local(tmp_path / "a", 4, *sets, "train.clients_per_round=2")
    b = run_local(tmp_path / "b", 4, *sets, "train.clients_per_round=2")
    full = run_local(tmp_path / "full", 4, *sets)
    assert same_adapter(run_adapter(a), run_adapter(b))
    assert [r["train_loss"] for r in run_rows(a)] == [r["train_loss"] for r in run_rows(b)]
    assert not same_adapter(run_adapter(a), run_adapter(full))
    s, s_full = run_summary(a), run_summary(full)
    assert s["participants"] == [[1, 12, 2]]
    assert all(len(r["clients"]) == 2 for r in run_rows(a)) and "clients" not in run_rows(full)[0]
    # 4 rounds x 2 of 4 clients: half the tokens of the full run, some clients idle in some rounds
    tokens, tokens_full = s["tokens_by_client"].values(), s_full["tokens_by_client"].values()
    assert sum(tokens) < 0.6 * sum(tokens_full) and min(tokens) < min(tokens_full)
    assert s["final_val_loss"] == s["final_val_loss"]  # every live client evaluated the latest average


def test_k_equal_to_n_is_the_full_run_bit_for_bit(tmp_path):
    k = run_local(tmp_path / "k", 3, *SETS, "train.clients_per_round=3")
    full = run_local(tmp_path / "full", 3, *SETS)
    assert same_adapter(run_adapter(k), run_adapter(full))
    assert [r["train_loss"] for r in run_rows(k)] == [r["train_loss"] for r in run_rows(full)]


@pytest.mark.parametrize(
    ("sets", "key"),
    [
        (["run.mode=sl", "train.clients_per_round=2"], "train.clients_per_round"),
        (["run.mode=central", "train.clients_per_round=2"], "train.clients_per_round"),
        (["train.clients_per_round=2", "checkpoint.every=5"], "checkpoint.every"),
    ],
)
def test_partial_participation_refusals(sets, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(None, sets)
