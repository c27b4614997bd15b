"""Data stays on the client: `{client}` paths, each client reading only its own file and the
server none (audited under a real mpirun), unequal clients, and the central baseline over
the union of the same files."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import MPIRUN, run_cmd, run_local, run_rows, run_summary
from test_roles import EQUIV, assert_same_training

from splitlora_mpi.data import ByteTokenizer, encode_examples, packaged_data_paths, read_examples
from splitlora_mpi.errors import ConfigError

LINES = packaged_data_paths()[0].read_text().splitlines()
VAL = packaged_data_paths()[1].read_text().splitlines()


@pytest.fixture
def client_files(tmp_path) -> Path:
    """Two clients of unequal size (60 % / 40 % of the packaged sample), a validation file each."""
    data = tmp_path / "data"
    data.mkdir()
    cut, vcut = len(LINES) * 3 // 5, len(VAL) // 2
    for c, (train, val) in enumerate([(LINES[:cut], VAL[:vcut]), (LINES[cut:], VAL[vcut:])], 1):
        (data / f"train-{c}.txt").write_text("\n".join(train) + "\n")
        (data / f"val-{c}.txt").write_text("\n".join(val) + "\n")
    return data


def _paths(data: Path) -> list[str]:
    return [f"data.train_path={data}/train-{{client}}.txt", f"data.val_path={data}/val-{{client}}.txt"]


def _tokens(path: Path) -> int:
    return int(encode_examples(read_examples(path, "e2e"), ByteTokenizer(), 128).attention_mask.sum())


def test_one_client_on_its_own_file_equals_central_on_the_union(tmp_path, client_files):
    split = run_local(tmp_path / "split", 1, *EQUIV, *_paths(client_files))
    central = run_local(tmp_path / "central", 1, *EQUIV, *_paths(client_files), "run.mode=central", "data.clients=1")
    assert_same_training(split, central)
    assert run_summary(split)["examples_by_client"]["1"] == run_summary(central)["examples_by_client"]["0"]


def test_unequal_clients_are_counted_by_examples_and_tokens(tmp_path, client_files):
    out = run_local(tmp_path / "run", 2, *EQUIV, *_paths(client_files))
    s = run_summary(out)
    expected = {str(c): {"examples": len(read_examples(client_files / f"train-{c}.txt", "e2e")),
                         "tokens": _tokens(client_files / f"train-{c}.txt")} for c in (1, 2)}  # fmt: skip
    assert s["examples_by_client"] == expected and expected["1"]["examples"] > expected["2"]["examples"]
    vals = [r["val_loss"] for r in run_rows(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    central = run_local(tmp_path / "central", 1, *EQUIV, *_paths(client_files), "run.mode=central", "data.clients=2")
    assert run_summary(central)["examples_by_client"] == {
        "0": {key: sum(e[key] for e in expected.values()) for key in ("examples", "tokens")}
    }


def test_a_missing_client_file_names_the_client_and_the_key(tmp_path, client_files):
    (client_files / "train-2.txt").unlink()
    with pytest.raises(ConfigError) as e:
        run_local(tmp_path / "run", 2, *_paths(client_files))
    assert str(e.value) == f"client 2: config key 'data.train_path': {client_files}/train-2.txt: not found"


def test_the_server_reads_no_client_data_and_each_client_only_its_own(tmp_path, client_files):
    """Under a real mpirun every open() is audited (tests/open_audit.py): the job finishes, so
    rank 0 opened no file under the data directory and each client only its own two; what
    reached rank 0 is activations, labels and control, plus the final client adapter."""
    audit = [sys.executable, str(Path(__file__).with_name("open_audit.py")), str(client_files)]
    sets = [a for s in [*EQUIV, *_paths(client_files), f"run.out_dir={tmp_path}/run"] for a in ("--set", s)]
    r = run_cmd([MPIRUN, "-n", "3", *audit, *sets], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = run_summary(tmp_path / "run")
    assert {r: e["examples"] for r, e in s["examples_by_client"].items()} == {
        str(c): len(read_examples(client_files / f"train-{c}.txt", "e2e")) for c in (1, 2)
    }
    assert set(k for k, v in s["bytes"].items() if v) == {"activations", "gradients", "labels", "adapters", "control"}
    # the audit can fail: central reads every client's file on rank 0
    central = ["--set", "run.mode=central", "--set", "data.clients=2", "--set", f"run.out_dir={tmp_path}/central"]
    r = run_cmd([*audit, *sets, *central], cwd=tmp_path, timeout=300)  # (its own out_dir: the split run's is finished)
    assert r.returncode != 0 and "rank 0 may not read" in r.stderr


def test_val_limit_validates_on_the_first_mrs_of_each_clients_file(tmp_path, client_files):
    """data.val_limit=3 on per-client files is a run whose validation files hold only the first
    3 MRs of each (same validation losses, exactly), and differs from validating on all of them."""
    limited = run_local(tmp_path / "limited", 2, *EQUIV, *_paths(client_files), "data.val_limit=3")
    cut = tmp_path / "cut"
    shutil.copytree(client_files, cut)
    for c in (1, 2):
        lines = (client_files / f"val-{c}.txt").read_text().splitlines()
        first = list(dict.fromkeys(ln.split("||", 1)[0] for ln in lines))[:3]
        (cut / f"val-{c}.txt").write_text("".join(ln + "\n" for ln in lines if ln.split("||", 1)[0] in first))
    by_hand = run_local(tmp_path / "by_hand", 2, *EQUIV, *_paths(cut))
    whole = run_local(tmp_path / "whole", 2, *EQUIV, *_paths(client_files))
    vals = {name: [r["val_loss"] for r in run_rows(out) if "val_loss" in r]
            for name, out in (("limited", limited), ("by_hand", by_hand), ("whole", whole))}  # fmt: skip
    assert len(vals["limited"]) == 2 and vals["limited"] == vals["by_hand"] != vals["whole"]
    assert [r["train_loss"] for r in run_rows(limited)] == [r["train_loss"] for r in run_rows(whole)]
