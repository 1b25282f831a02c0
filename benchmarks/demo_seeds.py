"""The demo pair over several seeds: mean and std of the ResNet teacher, the ViT alone, with KD and with RSD.

    python benchmarks/demo_seeds.py                  # 5 seeds, about 3 minutes each on 2 CPU cores
    python benchmarks/demo_seeds.py --seeds 0 1 2 --out runs/demo-seeds --results docs/RESULTS.md

Each seed runs the whole demo (``crossdistill demo``: its recipes, its epochs) with ``train.seed=SEED``:
the teacher is retrained per seed too. The figures are last-epoch test top-1 on the 360 digits test
images. The gain of RSD over scratch (and over KD) is also given as the mean and std of the per-seed
difference, with the ratio of the mean to that std: the claim "RSD helps" stands when the mean
difference exceeds two standard deviations of the difference.

The results replace the block between the ``demo-seeds`` markers in ``--results`` (appended if absent).
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import sys
import time
from pathlib import Path

from crossdistill import __version__
from crossdistill.demo import RUNS, run_demo
from crossdistill.files import write_text_atomic

START, END = "<!-- demo-seeds:start -->", "<!-- demo-seeds:end -->"
REPO = Path(__file__).resolve().parent.parent


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def difference(a: list[float], b: list[float]) -> str:
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return f"{mean:+.2f} ± {std:.2f} ({mean / std:.1f} std)" if std > 0 else f"{mean:+.2f} ± {std:.2f}"


def write_block(path: Path, block: str) -> None:
    text = path.read_text() if path.is_file() else ""
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, new, hint="the results page")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "demo-seeds")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "RESULTS.md")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the demo recipes')")
    args = ap.parse_args(argv)

    top1: dict[str, list[float]] = {run.key: [] for run in RUNS}
    started = time.time()
    for seed in args.seeds:
        log = io.StringIO()
        result = run_demo(
            output_dir=str(args.out / f"seed{seed}"),
            epochs=args.epochs,
            out=log,
            overrides=[f"train.seed={seed}", "train.progress=false"],
        )
        for run in RUNS:
            top1[run.key].append(result[run.key].last_top1)
        row = ", ".join(f"{run.key} {result[run.key].last_top1:.2f}" for run in RUNS)
        print(f"seed {seed}: {row} ({result['wall_time_s']:.0f}s)", flush=True)
    wall = time.time() - started

    command = "python benchmarks/demo_seeds.py" + (f" --seeds {' '.join(map(str, args.seeds))}")
    lines = [
        START,
        "## The demo over seeds",
        "",
        f"`{command}` (crossdistill {__version__}, {len(args.seeds)} seeds, {wall / 60:.0f} minutes on this "
        "machine's CPU): the `make demo` pair on scikit-learn's digits, last-epoch test top-1 (360 images), "
        "mean ± std over the seeds; each seed retrains the teacher.",
        "",
        "| run | top-1 (mean ± std) | per seed |",
        "|---|---|---|",
    ]
    for run in RUNS:
        per_seed = ", ".join(f"{v:.2f}" for v in top1[run.key])
        lines.append(f"| {run.label.split(maxsplit=1)[1]} | {mean_std(top1[run.key])} | {per_seed} |")
    lines += [
        "",
        f"- RSD − ViT alone: {difference(top1['rsd'], top1['scratch'])} points (mean ± std of the per-seed difference)",
        f"- RSD − KD: {difference(top1['rsd'], top1['kd'])} points",
        f"- KD − ViT alone: {difference(top1['kd'], top1['scratch'])} points",
        f"- teacher − ViT alone: {difference(top1['teacher'], top1['scratch'])} points",
        END,
    ]
    block = "\n".join(lines)
    write_block(args.results, block)
    print(block)
    print(f"written to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
