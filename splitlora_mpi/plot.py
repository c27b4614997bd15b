"""Convergence figure of one or more runs, in the style of the SplitLoRA paper (arXiv 2407.00952):
validation loss against wall-clock time and against the bytes sent over the network, one line
per scheme.

    python -m splitlora_mpi.plot runs/a runs/b --out convergence.png --target-loss 3.2

Reads `metrics.jsonl` (rows with `val_loss` only), `summary.json` and `config.yaml` of each run
directory; a run still in progress (no summary.json yet) is plotted as far as it got. Bad input
raises `ConfigError` (one line naming the file), which the CLI reports with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .errors import ConfigError

FIGSIZE = (11.0, 4.2)  # inches; the PNG is FIGSIZE * DPI pixels (no tight bbox, so the size is predictable)
DPI = 120
LOG_SPAN = 20.0  # MB panel turns log-scale when the runs' totals differ by more than this factor
MAX_MARKERS = 12  # per line: enough to tell the schemes apart, few enough to see the curve
TIME_LABEL = "training time (s)"
MB_LABEL = "data sent over the network (MB)"
TARGET_LABEL = "target loss {:g}"

# mode -> (paper name, color, marker); a mode keeps its look in every figure
MODE_STYLE: dict[str, tuple[str, str, str]] = {
    "splitlora": ("SplitLoRA", "tab:red", "o"),
    "sl": ("SL", "tab:blue", "s"),
    "fedlora": ("FedLoRA", "tab:green", "^"),
    "central": ("CenLoRA", "tab:purple", "D"),
}
UNKNOWN_STYLE = ("tab:gray", "x")
# runs sharing a mode share its color and differ by line style ("--" is kept for the target line)
LINESTYLES = ("-", "-.", ":", (0, (3, 1, 1, 1, 1, 1)))
EVAL_KEYS = ("step", "wall_s", "sent_bytes", "tokens", "val_loss")


@dataclass
class Run:
    """One run directory, reduced to what the figure needs: its evaluation rows."""

    path: Path
    name: str
    mode: str
    evals: list[dict[str, Any]]

    @property
    def total_mb(self) -> float:
        return self.evals[-1]["sent_bytes"] / 1e6


# ---------------------------------------------------------------- reading runs


def load_run(run_dir: Path) -> Run:
    """Read a run directory; `ConfigError` naming the file (and line) if it cannot be plotted."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    config = _read_mapping(run_dir / "config.yaml")
    summary = _read_mapping(run_dir / "summary.json")
    run_cfg = config.get("run") if isinstance(config.get("run"), dict) else {}
    mode = summary.get("mode") or run_cfg.get("mode") or ("splitlora" if config else None)
    if mode is None:
        raise ConfigError(f"{run_dir}: neither summary.json nor config.yaml says the run's mode")
    name = str(run_cfg.get("name") or run_dir.resolve().name)
    return Run(run_dir, name, str(mode), _read_evals(run_dir / "metrics.jsonl"))


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    """config.yaml / summary.json: optional (a hand-made run dir; summary.json appears only when a
    run ends, until then config.yaml gives the mode), but a broken one is an error, not a silent default."""
    if not path.is_file():
        return {}
    text = _read_text(path)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return data


def _read_evals(path: Path) -> list[dict[str, Any]]:
    """The rows with `val_loss`, in file order. A last line without its newline is a row the run
    is still writing and is skipped if it does not parse; any other bad line is an error."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is {path.parent} a run directory?)")
    text = _read_text(path)
    lines = text.splitlines()
    evals = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        in_progress = lineno == len(lines) and not text.endswith("\n")
        row = _parse_row(path, lineno, line, in_progress)
        if row is not None and "val_loss" in row:
            evals.append(_check_eval(path, lineno, row))
    if not evals:
        raise ConfigError(f"{path}: no rows with val_loss (no evaluation logged yet)")
    return evals


def _parse_row(path: Path, lineno: int, line: str, in_progress: bool) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        if in_progress:
            return None
        raise ConfigError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def _check_eval(path: Path, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
    for key in EVAL_KEYS:
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}:{lineno}: key {key!r}: expected a number, got {value!r}")
    return row


# ---------------------------------------------------------------- time to target


def time_to_target(run_dir: Path, target_loss: float) -> dict[str, Any] | None:
    """Cost of reaching `target_loss`: the first evaluation row with val_loss <= target, as
    {"step", "wall_s", "sent_bytes", "tokens"}; None if the run never got there."""
    return _first_reaching(load_run(Path(run_dir)), target_loss)


def _first_reaching(run: Run, target_loss: float) -> dict[str, Any] | None:
    for row in run.evals:
        if row["val_loss"] <= target_loss:
            return {key: row[key] for key in ("step", "wall_s", "sent_bytes", "tokens")}
    return None


# ---------------------------------------------------------------- the figure


def paper_name(mode: str) -> str:
    """The scheme's name as the paper writes it (central training is "CenLoRA")."""
    return MODE_STYLE.get(mode, (mode,))[0]


def run_labels(runs: list[Run]) -> list[str]:
    """Paper names; the run name is added only where two runs share a mode, the directory's name
    where even that is ambiguous, its path where the names are too."""
    labels = [paper_name(r.mode) for r in runs]
    for detail in (lambda r: r.name, lambda r: r.path.name, lambda r: r.path):
        shared = Counter(labels)
        labels = [f"{paper_name(r.mode)} ({detail(r)})" if shared[lab] > 1 else lab for lab, r in zip(labels, runs)]
    return labels


def _styles(runs: list[Run]) -> list[dict[str, Any]]:
    """Color and marker from the mode; a second run of the same mode gets the next line style."""
    seen: Counter[str] = Counter()
    styles = []
    for run in runs:
        color, marker = MODE_STYLE[run.mode][1:] if run.mode in MODE_STYLE else UNKNOWN_STYLE
        linestyle = LINESTYLES[seen[run.mode] % len(LINESTYLES)]
        seen[run.mode] += 1
        markevery = max(1, math.ceil(len(run.evals) / MAX_MARKERS))
        styles.append({"color": color, "marker": marker, "linestyle": linestyle, "markevery": markevery})
    return styles


def plot_runs(
    run_dirs: list[Path],
    out: Path,
    target_loss: float | None = None,
    title: str | None = None,
    labels: list[str] | None = None,
) -> Figure:
    """Draw the convergence figure of `run_dirs`, write it to `out` (PNG, atomically) and return it
    so callers (and tests) can inspect the plotted data."""
    fig = convergence_figure(load_runs(run_dirs), target_loss, title, labels)
    save_png(fig, Path(out))
    return fig


def load_runs(run_dirs: list[Path]) -> list[Run]:
    if not run_dirs:
        raise ConfigError("no run directories given")
    return [load_run(Path(d)) for d in run_dirs]


def convergence_figure(
    runs: list[Run], target_loss: float | None = None, title: str | None = None, labels: list[str] | None = None
) -> Figure:
    """Two panels sharing the loss axis: loss vs wall-clock time (left), loss vs MB sent (right),
    perplexity on the right edge."""
    if labels is None:
        labels = run_labels(runs)
    elif len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} labels for {len(runs)} runs")
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is; no display needed
    ax_time, ax_mb = fig.subplots(1, 2, sharey=True)
    styles = _styles(runs)
    _time_panel(ax_time, runs, labels, styles)
    notes = _mb_panel(ax_mb, runs, labels, styles)
    _finish_panel(ax_time, target_loss)
    _finish_panel(ax_mb, target_loss, notes)
    ax_time.set_ylabel("validation loss")
    _perplexity_axis(ax_mb)
    if title:
        fig.suptitle(title)
    return fig


def _time_panel(ax: Axes, runs: list[Run], labels: list[str], styles: list[dict[str, Any]]) -> None:
    for run, label, style in zip(runs, labels, styles):
        x = [row["wall_s"] for row in run.evals]
        ax.plot(x, [row["val_loss"] for row in run.evals], label=label, **style)
    ax.set_xlabel(TIME_LABEL)


def _mb_panel(ax: Axes, runs: list[Run], labels: list[str], styles: list[dict[str, Any]]) -> list[tuple[Line2D, str]]:
    """Runs that sent nothing (central training) have no place on this axis: they get a legend
    note (returned) instead of a line. Log scale when the runs' totals span more than LOG_SPAN."""
    notes = []
    totals = []
    for run, label, style in zip(runs, labels, styles):
        if run.total_mb <= 0:
            handle = Line2D([], [], color=style["color"], marker=style["marker"], linestyle="none")
            notes.append((handle, f"{label}: 0 MB sent (not shown)"))
            continue
        totals.append(run.total_mb)
        x = [row["sent_bytes"] / 1e6 for row in run.evals]
        ax.plot(x, [row["val_loss"] for row in run.evals], label=label, **style)
    if totals and max(totals) / min(totals) > LOG_SPAN:
        ax.set_xscale("log", nonpositive="mask")  # an eval row before the first byte is dropped, not pinned
    ax.set_xlabel(MB_LABEL)
    return notes


def _finish_panel(ax: Axes, target_loss: float | None, notes: list[tuple[Line2D, str]] | None = None) -> None:
    """Target line, grid and legend (plus the notes for runs the panel could not show)."""
    if target_loss is not None:
        ax.axhline(target_loss, color="0.3", linestyle="--", linewidth=1.0, label=TARGET_LABEL.format(target_loss))
    ax.grid(True, which="major", alpha=0.4)
    handles, texts = ax.get_legend_handles_labels()
    for handle, text in notes or []:
        handles.append(handle)
        texts.append(text)
    if handles:
        ax.legend(handles, texts, loc="best", fontsize="small")


def _perplexity_axis(ax: Axes) -> None:
    """Perplexity = exp(loss) on the figure's right edge; the y axis is shared, so one suffices."""

    def to_ppl(loss: np.ndarray) -> np.ndarray:
        return np.exp(np.clip(loss, -700, 700))

    def to_loss(ppl: np.ndarray) -> np.ndarray:
        return np.log(np.clip(ppl, 1e-300, None))

    ax.secondary_yaxis("right", functions=(to_ppl, to_loss)).set_ylabel("validation perplexity")


def save_png(fig: Figure, out: Path) -> None:
    """Temp file in the same directory, then rename: a viewer or a concurrent reader never sees a
    half-written PNG, and a failed save keeps the previous one."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"{out}: cannot write: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m splitlora_mpi.plot",
        description="Convergence figure: validation loss vs training time and vs MB sent, one line per run.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (out_dir of a run)")
    p.add_argument("--out", type=Path, default=Path("convergence.png"), help="PNG to write (default: %(default)s)")
    p.add_argument("--target-loss", type=float, help="draw this validation loss and report the time to reach it")
    p.add_argument("--title", help="figure title")
    return p.parse_args(argv)


def target_table(runs: list[Run], labels: list[str], target_loss: float) -> str:
    """Time-to-target per run, aligned for the terminal; '-' where the target was not reached."""
    header = ("run", "step", "wall_s", "MB sent", "tokens")
    rows = [header]
    for run, label in zip(runs, labels):
        hit = _first_reaching(run, target_loss)
        if hit is None:
            rows.append((label, "-", "-", "-", "-"))
        else:
            rows.append((label, str(hit["step"]), f"{hit['wall_s']:.1f}", f"{hit['sent_bytes'] / 1e6:.1f}",
                         str(hit["tokens"])))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"time to val_loss <= {target_loss:g}:"]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.target_loss is not None and not math.isfinite(args.target_loss):
            raise ConfigError(f"--target-loss: expected a finite number, got {args.target_loss}")
        runs = load_runs(args.run_dirs)
        labels = run_labels(runs)
        save_png(convergence_figure(runs, args.target_loss, args.title, labels), args.out)
        print(args.out)
        if args.target_loss is not None:
            print(target_table(runs, labels, args.target_loss))
        return 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
