from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from splitlora_mpi.config import JobConfig, default_config_path, load_config
from splitlora_mpi.errors import ConfigError


def test_packaged_default_equals_dataclass_defaults():
    assert load_config() == JobConfig()
    assert yaml.safe_load(default_config_path().read_text()) == JobConfig().to_dict()


def test_repo_default_is_the_packaged_one():
    repo_default = Path(__file__).parent.parent / "configs" / "default.yaml"
    assert yaml.safe_load(repo_default.read_text()) == JobConfig().to_dict()


def test_overrides_parse_yaml_scalars(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nlora:\n  r: 2\n")
    cfg = load_config(
        f,
        [
            "lora.r=8",
            "train.lr=1e-3",
            "model.config.n_layer=6",
            "lora.target_modules=[c_attn, c_proj]",
            "run.out_dir=null",
        ],
    )
    assert cfg.train.steps == 7 and cfg.lora.r == 8 and cfg.train.lr == 1e-3
    assert cfg.model.config["n_layer"] == 6 and cfg.model.config["n_embd"] == 64  # merged into the default dict
    assert cfg.lora.target_modules == ["c_attn", "c_proj"] and cfg.run.out_dir is None


def test_model_config_with_model_type_replaces_default(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  config: {model_type: llama, hidden_size: 32}\n")
    assert load_config(f).model.config == {"model_type": "llama", "hidden_size": 32}


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.lr=-1", "train.lr", "> 0"),
        ("train.batch_size=0", "train.batch_size", "≥ 1"),
        ("train.nope=1", "train.nope", "unknown key"),
        ("nope.x=1", "nope", "unknown key"),
        ("lora.r=abc", "lora.r", "an integer"),
        ("lora.r=2.5", "lora.r", "an integer"),
        ("run.mode=magic", "run.mode", "one of"),
        ("metrics.enabled=maybe", "metrics.enabled", "true or false"),
        ("checkpoint.every=-1", "checkpoint.every", "≥ 0"),
        ("data.max_seq_len=4", "data.max_seq_len", "≥ 8"),
        ("metrics.port=70000", "metrics.port", "≤ 65535"),
        ("train.eval_every=7", "train.eval_every", "multiple of train.aggregate_every"),
        ("model.config.model_type=3", "model.config.model_type", "a transformers model type"),
        ("lora.dropout=1", "lora.dropout", "< 1"),
        ("split.client_layers=[1, 0]", "split.client_layers", "integers ≥ 1"),
        ("split.client_layers=[1, 2] ; run.mode=sl", "split.client_layers", "run.mode splitlora"),
        ("split.label_private=true ; run.mode=fedlora", "split.label_private", "splitlora / sl"),
        ("split.tail_layers=1", "split.tail_layers", "split.label_private"),
        ("comm.micro_batches=2 ; split.label_private=true", "comm.micro_batches", "expected 1"),
        ("comm.micro_batches=5", "comm.micro_batches", "≤ train.batch_size"),
        ("data.train_path=/d/c-{client}.txt ; data.partition=iid", "data.partition", "expected local (or null)"),
        ("data.partition=local", "data.train_path", "expected data.train_path and data.val_path"),
        ("data.val_path=/d/v-{client}.txt", "data.val_path", "needs it in data.train_path too"),
        ("data.train_path=/d/c-{client}.txt ; data.val_path=/d/v.txt ; run.mode=central", "data.clients", "N ≥ 1"),
        (
            "data.train_path=/d/c-{client}.txt ; data.val_path=/d/v-{client}.txt ; run.mode=fedlora",
            "data.val_path",
            "one shared validation file",
        ),
    ],
)
def test_bad_values_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=override.split(" ; "))
    assert f"'{key}'" in str(e.value) and expected in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_set_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(overrides=["train.steps"])
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("train:\n  steps: 3\n  lr: 0.1\n  steps: 4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml:4: not valid YAML \(key 'steps' given twice"):
        load_config(f)


def test_the_shipped_yaml_files_give_no_key_twice():
    from splitlora_mpi.config import UniqueKeyLoader

    root = Path(__file__).parent.parent
    files = [default_config_path(), *root.glob("configs/*.yaml"), *root.glob("k8s/**/*.yaml")]
    assert len(files) > 20
    for f in files:
        docs = list(yaml.load_all(f.read_text(), Loader=UniqueKeyLoader))  # raises on a key given twice
        assert docs, f


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitlora_mpi", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    r = _cli("--set", "train.lr=-1", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_print_config_round_trips(tmp_path):
    r = _cli("--print-config", "--set", "lora.r=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "printed.yaml").write_text(r.stdout)
    assert load_config(tmp_path / "printed.yaml").lora.r == 8


def test_cli_unknown_argument_exit_2(tmp_path):
    r = _cli("--bogus", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0


def test_cli_help_says_how_to_launch_and_where_the_keys_are(capsys):
    from splitlora_mpi.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "mpirun -n N+1 python -m splitlora_mpi" in out and "run.mode=central" in out and "no mpirun" in out
    assert "Configuration" in out and "configs/default.yaml" in out
    for command in ("elastic", "evaluate", "generate", "plot", "prepare_model"):
        assert f"python -m splitlora_mpi.{command} " in out, command


def test_configuration_reference_documents_every_key():
    """docs/configuration.md names every key as `section.key`, and the README links to it."""
    root = Path(__file__).parent.parent
    reference = (root / "docs" / "configuration.md").read_text()
    flat = [f"`{section}.{key}`" for section, keys in JobConfig().to_dict().items() for key in keys]
    missing = [k for k in flat if k not in reference]
    assert not missing, missing
    assert "(docs/configuration.md)" in (root / "README.md").read_text()


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    """Each preset loads, and every key it sets is what the loaded config holds."""
    path = Path(__file__).parents[1] / "configs" / preset
    loaded, written = load_config(path).to_dict(), yaml.safe_load(path.read_text()) or {}
    for section, values in written.items():
        for key, value in values.items():
            held = loaded[section][key]
            assert held == value or (isinstance(value, dict) and value.items() <= held.items()), (section, key)


def test_client_paths_default_to_the_local_partition():
    assert load_config(overrides=["data.train_path=/d/c-{client}.txt", "data.val_path=/d/v.txt"]).data.scheme == "local"
    assert load_config().data.scheme == "iid"


def test_every_mode_has_its_config_rules():
    from splitlora_mpi.modes import MODES
    from splitlora_mpi.rules import MODE_RULES

    assert sorted(MODE_RULES) == sorted(MODES)
