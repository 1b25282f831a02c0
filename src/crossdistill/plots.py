"""``crossdistill plot RUN_DIR...``: training curves from the runs' ``metrics.csv``.

One panel per training loss term (``train_*`` columns: the total ``loss`` first, then each
term such as ``ce`` and ``rsd``, logged as the weighted contributions that sum to the total:
``rsd`` is lambda * L_rsd), one for top-1 accuracy (eval, solid; EMA, dashed, when the
run kept one) and one for the learning rate. Several runs are overlaid, one colour per run,
with a legend of run names (the directory names; parent directories are added when two runs
share a name).

matplotlib is an optional extra (``pip install 'crossdistill[analysis]'``). Figures are drawn
with matplotlib's object-oriented API on the non-interactive Agg canvas: no pyplot, no global
backend switch, nothing shown on screen.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any, Sequence

from .errors import CrossDistillError
from .files import RERUN_HINT, write_path_atomic

CURVES = "curves.png"
_INSTALL = "pip install 'crossdistill[analysis]'"


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise CrossDistillError(f"plots need matplotlib, which is not installed: {_INSTALL}") from None
    return matplotlib


def new_figure(**kwargs: Any):
    """A matplotlib Figure on an Agg canvas (non-interactive), with constrained layout."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kwargs.setdefault("layout", "constrained")
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- reading runs


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of ``RUN_DIR/metrics.csv`` as floats (empty cells dropped)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.csv"
    if not run_dir.is_dir():
        raise CrossDistillError(f"{run_dir} is not a directory; pass run directories written by `crossdistill train`")
    if not path.is_file():
        raise CrossDistillError(
            f"{run_dir} has no metrics.csv: not a crossdistill run directory, or the run has not finished an epoch"
        )
    rows = []
    with path.open(newline="") as handle:
        for raw in csv.DictReader(handle):
            row = {}
            for key, value in raw.items():
                if key is None or value in (None, ""):
                    continue
                try:
                    row[key] = float(value)
                except ValueError:
                    continue
            if "epoch" in row:
                rows.append(row)
    if not rows:
        raise CrossDistillError(f"{path} has no epochs yet")
    return rows


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Short unique labels: directory names, with parents added until they differ."""
    paths = [Path(p).resolve() for p in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in paths):
            return labels
        depth += 1


DIAGNOSTIC_WORDS = ("grad", "time", "skipped", "nonfinite", "throughput", "lr")
"""``train_*`` columns containing one of these are training diagnostics (e.g. ``train_grad_norm``), not loss terms."""


def is_loss_term(key: str) -> bool:
    return key.startswith("train_") and not any(word in key[len("train_") :] for word in DIAGNOSTIC_WORDS)


def _train_columns(all_rows: Sequence[Sequence[dict[str, float]]]) -> tuple[list[str], list[str]]:
    """(loss terms with the total ``train_loss`` first, other ``train_*`` diagnostics)."""
    keys: list[str] = []
    for rows in all_rows:
        for row in rows:
            for key in row:
                if key.startswith("train_") and key not in keys:
                    keys.append(key)
    terms = sorted((k for k in keys if is_loss_term(k)), key=lambda k: (k != "train_loss", k))
    return terms, sorted(k for k in keys if not is_loss_term(k))


def _series(rows: Sequence[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    xs = [r["epoch"] for r in rows if key in r and math.isfinite(r[key])]
    ys = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return xs, ys


# ---------------------------------------------------------------- the figure


def plot_accuracy(
    run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str], title: str = "", dpi: int = 150
) -> Path:
    """One panel: the eval top-1 of each run against the epoch, one labelled line per run; returns ``out``."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for run_dir, label in zip(run_dirs, labels):
        xs, ys = _series(read_metrics(run_dir), "eval_top1")
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} ({ys[-1]:.2f})" if ys else label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right", title="run (last top-1)", title_fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    out = Path(out)
    write_path_atomic(out, lambda target: fig.savefig(target, dpi=dpi, format=out.suffix[1:] or "png"), hint=RERUN_HINT)
    return out


def plot_runs(
    run_dirs: Sequence[str | Path], out: str | Path = CURVES, labels: Sequence[str] | None = None, dpi: int = 150
) -> Path:
    """Draw the curves of ``run_dirs`` into the PNG ``out``; returns its path."""
    if not run_dirs:
        raise CrossDistillError("plot needs at least one run directory")
    all_rows = [read_metrics(d) for d in run_dirs]
    if labels and len(labels) != len(run_dirs):
        raise CrossDistillError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    labels = list(labels) if labels else run_labels(run_dirs)
    terms, diagnostics = _train_columns(all_rows)
    has_ema = any("ema_top1" in r for rows in all_rows for r in rows)
    panels: list[tuple[str, str]] = (
        [(term, "loss") for term in terms]
        + [("top1", "acc"), ("lr", "lr")]
        + [(key, "diagnostic") for key in diagnostics]
    )
    epochs = [r["epoch"] for rows in all_rows for r in rows]
    first, last = min(epochs), max(epochs)
    pad = max(0.5, 0.03 * (last - first))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(figsize=(4.6 * ncols, 3.3 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    from matplotlib.ticker import MaxNLocator

    colours = [f"C{i % 10}" for i in range(len(run_dirs))]
    few = max(len(rows) for rows in all_rows) <= 30
    marker = {"marker": "o", "markersize": 3.5} if few else {}
    for ax, (key, kind) in zip(axes, panels):
        for rows, label, colour in zip(all_rows, labels, colours):
            if kind == "acc":
                xs, ys = _series(rows, "eval_top1")
                ax.plot(xs, ys, color=colour, label=label, **marker)
                xs, ys = _series(rows, "ema_top1")
                if xs:
                    ax.plot(xs, ys, color=colour, linestyle="--", alpha=0.8, **marker)
            else:
                xs, ys = _series(rows, key)
                ax.plot(xs, ys, color=colour, label=label, **marker)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if kind == "loss":
            term = key[len("train_") :]
            # the logged terms are the weighted contributions that sum to the total
            ax.set_title(
                "total training loss" if term == "loss" else f"loss term: {term} (as added to the total)", fontsize=10
            )
            ax.set_ylabel(f"train {term}")
        elif kind == "diagnostic":
            term = key[len("train_") :]
            ax.set_title(f"training diagnostic: {term} (epoch mean)", fontsize=10)
            ax.set_ylabel(term)
        elif kind == "acc":
            ax.set_title("top-1 accuracy (eval" + (", EMA dashed)" if has_ema else ")"), fontsize=10)
            ax.set_ylabel("top-1 (%)")
            if has_ema:
                from matplotlib.lines import Line2D

                ax.legend(
                    handles=[
                        Line2D([], [], color="0.3", label="eval"),
                        Line2D([], [], color="0.3", linestyle="--", label="EMA"),
                    ],
                    fontsize=8,
                    loc="best",
                )
        else:
            ax.set_title("learning rate (end of epoch)", fontsize=10)
            ax.set_ylabel("lr")
            values = [r["lr"] for rows in all_rows for r in rows if r.get("lr", 0) > 0]
            if values and max(values) / min(values) > 100:
                ax.set_yscale("log")
            if ax.get_yscale() == "linear":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_xlim(first - pad, last + pad)  # one epoch range for every panel, also for single-epoch runs
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        loc="outside upper center",
        ncols=min(len(names), 4),
        fontsize=9,
        title="run",
        title_fontsize=9,
        frameon=False,
    )
    out = Path(out)
    write_path_atomic(out, lambda target: fig.savefig(target, dpi=dpi, format=out.suffix[1:] or "png"), hint=RERUN_HINT)
    return out


def _output_path(out: str | None, name: str) -> Path:
    if out is None:
        return Path.cwd() / name
    path = Path(out)
    return path if path.suffix.lower() == ".png" else path / name


def _cmd_plot(args: argparse.Namespace) -> int:
    path = plot_runs(args.run_dirs, _output_path(args.out, args.name), labels=args.labels)
    print(f"wrote {path} ({len(args.run_dirs)} run{'s' if len(args.run_dirs) > 1 else ''})")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plot",
        help="training curves (loss terms, top-1, lr) of one or more runs",
        description="Plot the metrics.csv of one or more runs, overlaid: one panel per loss term, top-1 "
        "(eval, EMA dashed), learning rate.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories written by `crossdistill train`")
    p.add_argument("--out", default=None, help="output directory (or a .png path); default: the current directory")
    p.add_argument("--name", default=CURVES, help=f"file name inside --out (default {CURVES})")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per run (default: run names)")
    p.set_defaults(func=_cmd_plot)
    return p
