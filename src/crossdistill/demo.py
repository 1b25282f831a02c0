"""The demo: a CNN teacher and a ViT student on scikit-learn's digits (scratch vs KD vs RSD), on CPU.

A narrow ResNet-18 learns the 8x8 digits easily; a small ViT (16 tokens, no convolutional prior)
trained alone on 1,437 images does not. Distilled from the ResNet (the paper's direction: a teacher
of one family, a student of another), the ViT gains several points: the toolkit's point, in about
2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from .config import load_config
from .engine import RunSummary, train
from .errors import CrossDistillError
from .plots import plot_accuracy

CURVES = "demo_curves.png"


def recipe(name: str) -> Path:
    """Path of a recipe shipped inside the package, e.g. ``recipe('demo/rsd.yaml')``."""
    return Path(str(resources.files("crossdistill") / "recipes" / name))


@dataclass(frozen=True)
class DemoRun:
    key: str
    recipe: str
    label: str
    heading: str


RUNS = (
    DemoRun("teacher", "demo/teacher.yaml", "teacher  ResNet-18, narrow", "the teacher: a narrow ResNet-18 alone"),
    DemoRun("scratch", "demo/scratch.yaml", "student  ViT, alone", "the student alone: a small ViT"),
    DemoRun("kd", "demo/kd.yaml", "student  ViT + KD", "the ViT distilled from the ResNet with KD"),
    DemoRun("rsd", "demo/rsd.yaml", "student  ViT + RSD", "the ViT distilled from the ResNet with RSD"),
)


def run_demo(
    output_dir: str = "demo_runs",
    epochs: int | None = None,
    overwrite: bool = True,
    out=None,
    overrides: Sequence[str] = (),
) -> dict:
    """Train the four demo runs, print the table, draw the curves; ``overrides``: more ``key=value`` for every run."""
    out = out if out is not None else sys.stdout
    started = time.time()
    common = [f"train.output_dir={output_dir}", *([f"train.epochs={epochs}"] if epochs else []), *overrides]
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731

    summaries: dict[str, RunSummary] = {}
    for number, run in enumerate(RUNS, start=1):
        say(f"{'' if number == 1 else chr(10)}== {number}/{len(RUNS)} {run.heading} ==")
        extra = []
        if run.key in ("kd", "rsd"):
            extra = [f"teacher.checkpoint={Path(summaries['teacher'].run_dir) / 'best.pt'}"]
        summaries[run.key] = train(load_config(recipe(run.recipe), common + extra), overwrite=overwrite, out=out)
    wall = time.time() - started
    print_table(summaries, wall, say)
    curves = Path(output_dir) / CURVES
    try:
        plot_accuracy(
            [summaries[run.key].run_dir for run in RUNS],
            curves,
            [run.label.split(maxsplit=1)[1] for run in RUNS],
            title="digits: test top-1 per epoch",
        )
        say(f"curves: {curves}")
    except CrossDistillError as err:  # matplotlib missing: the table is the result
        say(f"curves not drawn: {err}")
        curves = None
    say(f"runs: {', '.join(summaries[run.key].run_dir for run in RUNS)}")
    return {**summaries, "wall_time_s": wall, "curves": curves}


def print_table(summaries: dict[str, RunSummary], wall: float, say) -> None:
    say("\n== crossdistill demo: digits, test top-1 (360 images) ==")
    say(f"{'run':<28} {'parameters':>10} {'last top-1':>10} {'best top-1':>10} {'time':>7}")
    for run in RUNS:
        s = summaries[run.key]
        extra = f" +{s.extra_parameters / 1e3:.0f}k" if s.extra_parameters else ""
        params = f"{s.student_parameters / 1e6:.2f}M{extra}"
        say(f"{run.label:<28} {params:>10} {s.last_top1:>10.2f} {s.best_top1:>10.2f} {s.wall_time_s:>6.0f}s")
    scratch, kd, rsd = (summaries[k].last_top1 for k in ("scratch", "kd", "rsd"))
    teacher = summaries["teacher"].last_top1
    say(
        f"RSD over the ViT alone: {rsd - scratch:+.2f} points; over KD: {rsd - kd:+.2f} points "
        f"(teacher {teacher - scratch:+.2f} over the ViT alone; last-epoch top-1, one seed: "
        "benchmarks/demo_seeds.py gives mean and std over seeds)"
    )
    say(
        f"RSD trains {summaries['rsd'].extra_parameters / 1e3:.0f}k extra parameters (its AAD projector), "
        f"dropped from the exported student; total time {wall:.0f}s"
    )
