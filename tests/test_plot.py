"""The convergence figure (`python -m splitlora_mpi.plot`): plotted data, files written, errors.

Synthetic run directories only: no training, no MPI, a few seconds in all."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from matplotlib.figure import Figure

from splitlora_mpi import plot
from splitlora_mpi.errors import ConfigError
from splitlora_mpi.plot import MB_LABEL, TIME_LABEL, plot_runs, time_to_target

# (step, wall_s, sent_bytes, val_loss): the eval rows of a run; train-only rows go in between
SPLIT_EVALS = [(10, 1.5, 2_000_000, 3.0), (20, 3.0, 4_000_000, 2.5), (30, 4.5, 6_000_000, 2.2)]
TOKENS_PER_STEP = 512


def write_run(
    root: Path,
    dirname: str,
    mode: str,
    evals: list[tuple[int, float, int, float]],
    *,
    name: str | None = None,
    finished: bool = True,
) -> Path:
    """A run directory as training writes it: config.yaml, metrics.jsonl, and summary.json once finished."""
    run = root / dirname
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"run:\n  name: {name or dirname}\n  mode: {mode}\n")
    rows = []
    for step, wall, sent, loss in evals:
        train = {
            "step": step - 1,
            "train_loss": loss + 0.1,
            "lr": 1e-3,
            "tokens": (step - 1) * TOKENS_PER_STEP,
            "wall_s": wall - 0.1,
            "sent_bytes": max(sent - 1000, 0),
        }
        rows += [
            train,
            {
                **train,
                "step": step,
                "tokens": step * TOKENS_PER_STEP,
                "wall_s": wall,
                "sent_bytes": sent,
                "train_loss": loss + 0.05,
                "val_loss": loss,
            },
        ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        summary = {
            "mode": mode,
            "num_clients": 2,
            "wall_s": evals[-1][1],
            "final_val_loss": evals[-1][3],
            "bytes": {"activations": evals[-1][2], "gradients": 0, "labels": 0, "adapters": 0, "control": 0},
        }
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def panel(fig: Figure, xlabel: str):
    (ax,) = [ax for ax in fig.axes if ax.get_xlabel() == xlabel]
    return ax


def run_lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    """label -> (x, y) of the lines that are runs (not the target line)."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for line in ax.lines
        if not line.get_label().startswith("target")
    }


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splitlora_mpi.plot", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------- the figure


def test_png_written_and_lines_are_the_val_rows(tmp_path: Path) -> None:
    split = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    sl_evals = [(10, 2.0, 5_000_000, 3.1), (20, 4.0, 10_000_000, 2.7)]
    sl = write_run(tmp_path, "b", "sl", sl_evals)
    out = tmp_path / "fig.png"

    fig = plot_runs([split, sl], out)

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = (round(v * plot.DPI) for v in reversed(plot.FIGSIZE))
    assert matplotlib.image.imread(out).shape == (height, width, 4)
    time_lines = run_lines(panel(fig, TIME_LABEL))
    mb_lines = run_lines(panel(fig, MB_LABEL))
    assert time_lines == {
        "SplitLoRA": ([e[1] for e in SPLIT_EVALS], [e[3] for e in SPLIT_EVALS]),
        "SL": ([e[1] for e in sl_evals], [e[3] for e in sl_evals]),
    }
    assert mb_lines == {"SplitLoRA": ([2.0, 4.0, 6.0], [3.0, 2.5, 2.2]), "SL": ([5.0, 10.0], [3.1, 2.7])}
    assert panel(fig, MB_LABEL).get_xscale() == "linear"  # totals 6 MB vs 10 MB: no need for log
    assert all(not line.get_label().startswith("target") for ax in fig.axes for line in ax.lines)


def test_target_line_in_both_panels(tmp_path: Path) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    fig = plot_runs([run], tmp_path / "fig.png", target_loss=2.4, title="GPT-2 on E2E")

    for ax in fig.axes:
        (target,) = [line for line in ax.lines if line.get_label() == "target loss 2.4"]
        assert list(target.get_ydata()) == [2.4, 2.4]
        assert target.get_linestyle() == "--"
        assert "target loss 2.4" in legend_texts(ax)
    assert fig.get_suptitle() == "GPT-2 on E2E"


def test_paper_names_colors_per_mode_and_run_names_for_shared_modes(tmp_path: Path) -> None:
    dirs = [
        write_run(tmp_path, "r1", "splitlora", SPLIT_EVALS, name="cut1"),
        write_run(tmp_path, "r2", "splitlora", SPLIT_EVALS, name="cut2"),
        write_run(tmp_path, "r3", "fedlora", [(10, 1.0, 50_000, 3.0)]),
        write_run(tmp_path, "r4", "sl", [(10, 1.0, 3_000_000, 3.0)]),
        write_run(tmp_path, "r5", "central", [(10, 1.0, 0, 3.0)]),
    ]
    fig = plot_runs(dirs, tmp_path / "fig.png")

    lines = {line.get_label(): line for line in panel(fig, TIME_LABEL).lines}
    assert list(lines) == ["SplitLoRA (cut1)", "SplitLoRA (cut2)", "FedLoRA", "SL", "CenLoRA"]
    colors = {label: line.get_color() for label, line in lines.items()}
    assert colors["SplitLoRA (cut1)"] == colors["SplitLoRA (cut2)"]
    assert len({colors["SplitLoRA (cut1)"], colors["FedLoRA"], colors["SL"], colors["CenLoRA"]}) == 4
    assert lines["SplitLoRA (cut1)"].get_linestyle() != lines["SplitLoRA (cut2)"].get_linestyle()
    for line in panel(fig, MB_LABEL).lines:  # same look in both panels
        assert line.get_color() == colors[line.get_label()]


def test_labels_argument_overrides_names(tmp_path: Path) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    fig = plot_runs([run], tmp_path / "fig.png", labels=["mine"])
    assert list(run_lines(panel(fig, TIME_LABEL))) == ["mine"]
    with pytest.raises(ConfigError, match="2 labels for 1 runs"):
        plot_runs([run], tmp_path / "fig.png", labels=["a", "b"])


def test_zero_byte_run_is_a_legend_note_and_wide_span_goes_log(tmp_path: Path) -> None:
    split = write_run(tmp_path, "split", "splitlora", SPLIT_EVALS)
    fed = write_run(tmp_path, "fed", "fedlora", [(10, 1.0, 10_000, 3.0), (20, 2.0, 20_000, 2.6)])
    central = write_run(tmp_path, "cen", "central", [(10, 1.0, 0, 2.9), (20, 2.0, 0, 2.4)])

    fig = plot_runs([split, fed, central], tmp_path / "fig.png")

    assert list(run_lines(panel(fig, TIME_LABEL))) == ["SplitLoRA", "FedLoRA", "CenLoRA"]
    mb = panel(fig, MB_LABEL)
    assert run_lines(mb) == {"SplitLoRA": ([2.0, 4.0, 6.0], [3.0, 2.5, 2.2]), "FedLoRA": ([0.01, 0.02], [3.0, 2.6])}
    assert "CenLoRA: 0 MB sent (not shown)" in legend_texts(mb)
    assert mb.get_xscale() == "log"  # 6 MB vs 0.02 MB


def test_only_zero_byte_runs_still_plot(tmp_path: Path) -> None:
    central = write_run(tmp_path, "cen", "central", [(10, 1.0, 0, 2.9)])
    out = tmp_path / "fig.png"
    fig = plot_runs([central], out)
    assert run_lines(panel(fig, MB_LABEL)) == {}
    assert legend_texts(panel(fig, MB_LABEL)) == ["CenLoRA: 0 MB sent (not shown)"]
    assert out.is_file()


def test_perplexity_axis_is_exp_of_loss(tmp_path: Path) -> None:
    fig = plot_runs([write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)], tmp_path / "fig.png")
    (ppl,) = panel(fig, MB_LABEL).child_axes
    assert ppl.get_ylabel() == "validation perplexity"
    lo, hi = panel(fig, MB_LABEL).get_ylim()
    assert ppl.get_ylim() == pytest.approx((math.exp(lo), math.exp(hi)))


def test_running_run_uses_config_mode_and_skips_a_half_written_line(tmp_path: Path) -> None:
    run = write_run(tmp_path, "cen", "central", [(10, 1.0, 0, 2.9), (20, 2.0, 0, 2.4)], finished=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train_lo')  # the run is writing this row right now
    fig = plot_runs([run], tmp_path / "fig.png")
    assert run_lines(panel(fig, TIME_LABEL)) == {"CenLoRA": ([1.0, 2.0], [2.9, 2.4])}


def test_png_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    out = tmp_path / "figs" / "fig.png"
    plot_runs([run], out)
    before = out.read_bytes()

    def broken_savefig(self: Figure, fname: object, **kwargs: object) -> None:
        Path(str(fname)).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(ConfigError, match="No space left on device"):
        plot_runs([run], out, target_loss=2.0)
    assert out.read_bytes() == before  # the previous figure survives a failed save
    assert sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]  # and no temp file is left


# ---------------------------------------------------------------- time to target


def test_time_to_target_first_eval_row_reaching_it(tmp_path: Path) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    assert time_to_target(run, 2.55) == {"step": 20, "wall_s": 3.0, "sent_bytes": 4_000_000, "tokens": 20 * 512}
    assert time_to_target(run, 2.45)["step"] == 30  # step 29's train_loss 2.3 is no evaluation
    assert time_to_target(run, 2.5)["step"] == 20  # reaching means <=
    assert time_to_target(run, 3.5)["step"] == 10
    assert time_to_target(run, 2.0) is None


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_dir", r"nope: no such run directory"),
        ("no_metrics", r"metrics\.jsonl: not found"),
        ("no_val", r"metrics\.jsonl: no rows with val_loss"),
        ("bad_json", r"metrics\.jsonl:2: not valid JSON"),
        ("bad_value", r"metrics\.jsonl:2: key 'wall_s': expected a number"),
        ("bad_summary", r"summary\.json:1: not valid JSON"),
    ],
)
def test_bad_input_names_the_file(tmp_path: Path, breakage: str, message: str) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    if breakage == "no_dir":
        run = tmp_path / "nope"
    elif breakage == "no_metrics":
        metrics.unlink()
    elif breakage == "no_val":
        metrics.write_text("".join(line for line in lines if "val_loss" not in line))
    elif breakage == "bad_json":
        metrics.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    elif breakage == "bad_value":
        metrics.write_text(lines[0] + lines[1].replace('"wall_s": 1.5', '"wall_s": null') + "".join(lines[2:]))
    elif breakage == "bad_summary":
        (run / "summary.json").write_text("{")
    with pytest.raises(ConfigError, match=message):
        plot_runs([run], tmp_path / "fig.png")
    with pytest.raises(ConfigError, match=message):
        time_to_target(run, 1.0)
    assert not (tmp_path / "fig.png").exists()


# ---------------------------------------------------------------- command line


def test_cli_writes_default_png_and_target_table(tmp_path: Path) -> None:
    split = write_run(tmp_path, "split", "splitlora", SPLIT_EVALS)
    central = write_run(tmp_path, "cen", "central", [(10, 1.0, 0, 2.9)])

    res = cli(str(split), str(central), "--target-loss", "2.5", "--title", "t", cwd=tmp_path)

    assert res.returncode == 0, res.stderr
    out_lines = res.stdout.splitlines()
    assert out_lines[0] == "convergence.png"
    assert matplotlib.image.imread(tmp_path / "convergence.png").ndim == 3
    table = {line.split()[0]: line.split()[1:] for line in out_lines[2:]}
    assert table["SplitLoRA"] == ["20", "3.0", "4.0", str(20 * 512)]
    assert table["CenLoRA"] == ["-", "-", "-", "-"]


def test_cli_out_option(tmp_path: Path) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    out = tmp_path / "sub" / "c.png"
    res = cli(str(run), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{out}\n"
    assert out.is_file()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["missing"], "missing: no such run directory"),
        (["a"], "metrics.jsonl:3: not valid JSON"),
        (["a", "--target-loss", "nan"], "--target-loss: expected a finite number"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    run = write_run(tmp_path, "a", "splitlora", SPLIT_EVALS)
    if "--target-loss" not in args:
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
        (run / "metrics.jsonl").write_text("".join(lines[:2]) + "garbage\n" + "".join(lines[2:]))
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: ") and named in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "convergence.png").exists()


def test_labels_tell_runs_of_one_mode_apart_by_name_then_directory(tmp_path):
    from splitlora_mpi.plot import Run, run_labels

    runs = [Run(tmp_path / "a" / "x", "run", "splitlora", []), Run(tmp_path / "b" / "y", "run", "splitlora", []),
            Run(tmp_path / "c", "other", "splitlora", []), Run(tmp_path / "d", "run", "central", [])]  # fmt: skip
    assert run_labels(runs) == ["SplitLoRA (x)", "SplitLoRA (y)", "SplitLoRA (other)", "CenLoRA"]
