#!/usr/bin/env python
"""RSD across teacher widths (issue 19): where do the best lambda and kappa land for a 128-, 256- and 512-wide
teacher, with the official summed loss and with ``reduction: mean``?

RSD's official loss sums D diagonal and D(D - 1) off-diagonal terms for a D-wide teacher, so the same lambda
(``method_args.weight``) and kappa weigh the two terms differently at each width. ``reduction: mean`` averages
each term and scales it to the counts at D = 768 (the paper's Swin-T teacher). At width D it is the summed loss
with lambda x 768 / D and kappa x 767 / (D - 1): the two are one family of losses, parametrised differently. The
question is which parametrisation keeps the best values in one place when D changes.

The sweep, on the accuracy study's cpu protocol (CIFAR-10 at 32 px, 5,000 training images, 6 student epochs,
15 teacher epochs, 5,000 test images, two runs at a time with one thread each; ``study_protocols``):

1. trains three ResNet-18-style teachers of widths D/8-D (stem D/8) for D in ``--widths`` (default 128, 256 and
   512; the 256-wide one is the study's ``resnet_t``);
2. distils each into the study's ResMLP student with RSD, for both reductions: kappa in ``--kappas`` at lambda 0.1,
   and lambda in ``--weights`` at kappa 0.01, ``--seeds`` seeds each;
3. writes ``docs/RESULTS_WIDTH.md`` (last-epoch top-1, mean ± sample std over seeds, per width, reduction and
   value; the best value of each row) and ``docs/width_sweep.png``.

Runs are ordinary crossdistill run directories under ``--out`` (default ``runs/width-sweep``), trained by the
study's workers (resumable: rerun the same command). Usage::

    python benchmarks/accuracy/width_sweep.py --dry-list     # the plan and its estimated time
    python benchmarks/accuracy/width_sweep.py                # train what is missing, then write the page
    python benchmarks/accuracy/width_sweep.py --report-only  # rewrite the page from finished runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from study_plan import (  # noqa: E402
    Run,
    Settings,
    detect_dataset,
    estimate_plan,
    estimate_wall,
    fmt_min,
    is_done,
    run_config,
    teacher_run_name,
)
from study_protocols import DEFAULT_DATA, MODELS, PROTOCOLS, REPO, SPEEDS, ModelSpec  # noqa: E402
from study_run import check_existing, run_invocation  # noqa: E402

STUDENT = "resmlp_s"
REDUCTIONS = ("sum", "mean")
REFERENCE_DIM = 768
WIDTHS = (128, 256, 512)
KAPPAS = (0.0025, 0.01, 0.04, 0.16)  # at lambda 0.1: from 4x below the default to 16x above it
WEIGHTS = (0.025, 0.1, 0.4)  # at kappa 0.01
DEFAULT_WEIGHT, DEFAULT_KAPPA = 0.1, 0.01
SEEDS = (0, 1)


def teacher_key(width: int) -> str:
    return f"resnet_w{width}"


def register_teachers(widths: Sequence[int]) -> None:
    """A ResNet-18-style teacher per width in the study's tables: channels D/8, D/4, D/2, D (resnet_t is D = 256).
    Their speeds, for the estimate only, scale resnet_t's by the square of the width (the 128-wide one is the
    study's resnet_s architecture, whose speed was measured)."""
    speeds = SPEEDS["cpu"]
    for width in widths:
        if width % 8 or width < 64:
            raise SystemExit(
                f"--widths: {width} is not a multiple of 8 from 64 (the stem is width / 8 channels; under 8 channels "
                "torch 2.14's channels_last CPU training corrupts the heap)"
            )
        key = teacher_key(width)
        channels = [width // 8, width // 4, width // 2, width]
        MODELS[key] = ModelSpec(
            key,
            f"ResNet-18 (widths {channels[0]}-{width})",
            "cnn",
            "resnet18",
            {"channels": channels, "stem_width": width // 8},
        )
        cost = (width / 256) ** 2
        speeds["train"][f"{key}|-|vanilla"] = 1625.4 if width == 128 else speeds["train"]["resnet_t|-|vanilla"] / cost
        speeds["train"][f"{STUDENT}|{key}|rsd"] = speeds["train"][f"{STUDENT}|resnet_t|rsd"]
        speeds["forward"][key] = speeds["forward"]["resnet_t"] / cost
        speeds["eval"][key] = speeds["eval"]["resnet_t"] / cost


def run_name(width: int, reduction: str, weight: float, kappa: float, seed: int) -> str:
    return f"w{width}-{reduction}-l{weight:g}-k{kappa:g}-s{seed}"


def grid_points(kappas: Sequence[float], weights: Sequence[float]) -> list[tuple[float, float]]:
    """(lambda, kappa): the kappa sweep at the default lambda, then the lambda sweep at the default kappa."""
    points = [(DEFAULT_WEIGHT, k) for k in kappas]
    return points + [(w, DEFAULT_KAPPA) for w in weights if (w, DEFAULT_KAPPA) not in points]


def build_sweep(s: Settings, widths, kappas, weights, seeds) -> list[Run]:
    from crossdistill.distillers import method_config

    defaults = method_config("rsd")
    plan = []
    for width in widths:
        key = teacher_key(width)
        name = teacher_run_name(key)
        plan.append(
            Run(name, "teachers", "vanilla", 0, key, None, (), run_config(s, name, key, None, "vanilla", {}, 0))
        )
    for width in widths:  # seeds innermost (as the study): runs side by side do not share teacher-cache files
        key = teacher_key(width)
        for reduction in REDUCTIONS:
            for weight, kappa in grid_points(kappas, weights):
                for seed in seeds:
                    name = run_name(width, reduction, weight, kappa, seed)
                    args = {
                        "weight": weight,
                        "kappa": kappa,
                        "gamma": defaults.gamma,
                        "reduction": reduction,
                        "reference_dim": REFERENCE_DIM,
                    }
                    plan.append(
                        Run(
                            name,
                            "sensitivity",
                            "rsd",
                            seed,
                            STUDENT,
                            key,
                            (f"resnet{width}-resmlp {reduction}",),
                            run_config(s, name, STUDENT, key, "rsd", args, seed),
                            needs=(teacher_run_name(key),),
                            grid=(weight, kappa),
                        )
                    )
    if s.overrides:
        from crossdistill.config import apply_overrides

        for run in plan:
            run.config = apply_overrides(run.config, s.overrides)
    estimate_plan(s, plan)
    return plan


# ------------------------------------------------------------------------------------------ report


def last_top1(run: Run) -> float | None:
    path = run.run_dir / "summary.json"
    return json.loads(path.read_text())["last_top1"] if path.is_file() else None


def stats(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def point_stats(plan: Sequence[Run], width: int, reduction: str, point: tuple[float, float]):
    """(mean, std) over seeds of the finished runs of one (width, reduction, (lambda, kappa)), or None."""
    runs = [r for r in plan if r.grid == point and r.name.startswith(f"w{width}-{reduction}-")]
    return stats([v for v in (last_top1(r) for r in runs) if v is not None])


def sweep_table(plan: Sequence[Run], widths, reduction: str, points, axis: int) -> list[str]:
    """One markdown table: a row per width, a column per value of lambda (axis 0) or kappa (axis 1)."""
    head = "lambda (kappa 0.01)" if axis == 0 else "kappa (lambda 0.1)"
    values = [p[axis] for p in points]
    lines = [f"| width D | {' | '.join(f'{head.split()[0]} {v:g}' for v in values)} | best |"]
    lines.append("| --- " * (len(values) + 2) + "|")
    for width in widths:
        cells, means = [], {}
        for point in points:
            got = point_stats(plan, width, reduction, point)
            if got is None:
                cells.append("-")
                continue
            means[point[axis]] = got[0]
            cells.append(f"{got[0]:.2f} ± {got[1]:.2f}")
        best = max(means, key=means.get) if means else None
        cells = [f"**{c}**" if best is not None and v == best else c for c, v in zip(cells, values)]
        lines.append(f"| {width} | {' | '.join(cells)} | {best if best is None else f'{best:g}'} |")
    return lines


def plot(plan: Sequence[Run], widths, kappas, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, reduction in zip(axes, REDUCTIONS):
        for width in widths:
            xs, ys, es = [], [], []
            for kappa in kappas:
                got = point_stats(plan, width, reduction, (DEFAULT_WEIGHT, kappa))
                if got:
                    xs.append(kappa)
                    ys.append(got[0])
                    es.append(got[1])
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"D = {width}")
        ax.set_xscale("log")
        ax.set_xlabel("kappa (lambda 0.1)")
        ax.set_title(f"reduction: {reduction}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("student top-1 (%), last epoch")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(s: Settings, plan: Sequence[Run], widths, kappas, weights, docs_dir: Path) -> Path:
    docs_dir.mkdir(parents=True, exist_ok=True)
    points = grid_points(kappas, weights)
    kappa_points = [p for p in points if p[0] == DEFAULT_WEIGHT]
    weight_points = sorted({p for p in points if p[1] == DEFAULT_KAPPA})
    teachers = []
    for width in widths:
        teacher = next(r for r in plan if r.student == teacher_key(width) and r.part == "teachers")
        acc = last_top1(teacher)
        teachers.append(f"D = {width}: {'-' if acc is None else f'{acc:.2f} %'}")
    seeds = sorted({r.seed for r in plan if r.part != "teachers"})
    lines = [
        "# RSD across teacher widths",
        "",
        "Generated by `python benchmarks/accuracy/width_sweep.py` "
        f"({datetime.date.today().isoformat()}; {len(seeds)} seed(s) per value; last-epoch top-1 on 5,000 CIFAR-10 "
        "test images, mean ± sample std over seeds; the best mean of each row in bold).",
        "",
        "ResNet-18-style teachers of width D (channels D/8 to D) into the study's ResMLP student, cpu protocol. "
        f"Teachers' top-1: {'; '.join(teachers)}. `mean` at width D is the summed loss with lambda x 768 / D and "
        "kappa x 767 / (D - 1).",
        "",
    ]
    if s.overrides:
        lines += [f"**Not the protocol's settings:** `{' '.join(s.overrides)}`.", ""]
    for reduction in REDUCTIONS:
        lines += [f"## reduction: {reduction}, kappa at lambda 0.1", ""]
        lines += sweep_table(plan, widths, reduction, kappa_points, 1) + [""]
        lines += [f"## reduction: {reduction}, lambda at kappa 0.01", ""]
        lines += sweep_table(plan, widths, reduction, weight_points, 0) + [""]
    png = docs_dir / "width_sweep.png"
    plot(plan, widths, kappas, png)
    lines += [f"![top-1 against kappa per teacher width]({png.name})", ""]
    path = docs_dir / "RESULTS_WIDTH.md"
    from crossdistill.files import write_text_atomic

    write_text_atomic(path, "\n".join(lines), hint="the results page")
    return path


# ------------------------------------------------------------------------------------------ main


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "width-sweep")
    ap.add_argument("--docs-dir", type=Path, default=REPO / "docs")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA))
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir: where decoded archives are cached")
    ap.add_argument(
        "--widths", default=",".join(map(str, WIDTHS)), help="teacher widths D (multiples of 8, at least 64)"
    )
    ap.add_argument("--kappas", default=",".join(f"{k:g}" for k in KAPPAS), help="kappa values at lambda 0.1")
    ap.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS), help="lambda values at kappa 0.01")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the cpu protocol's 2)")
    ap.add_argument("--dry-list", action="store_true", help="print the planned runs and the estimated time")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the page from finished runs")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every run")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    protocol = PROTOCOLS["cpu"]
    widths = tuple(int(w) for w in args.widths.split(","))
    kappas, weights = floats(args.kappas), floats(args.weights)
    seeds = tuple(int(v) for v in args.seeds.split(","))
    register_teachers(widths)
    data_root = str(Path(args.data_root).expanduser().resolve())
    settings = Settings(
        protocol=protocol,
        out=args.out.resolve(),
        data_root=data_root,
        dataset=detect_dataset(data_root),
        cache_dir=args.cache_dir,
        teacher_cache=protocol.teacher_cache,
        device=protocol.device,
        methods=("rsd",),
        jobs=args.jobs or protocol.jobs,
        threads=protocol.threads,
        overrides=tuple(args.set),
    )
    plan = build_sweep(settings, widths, kappas, weights, seeds)
    todo = [r for r in plan if not is_done(r)]
    if args.dry_list:
        for run in plan:
            print(f"{'done' if is_done(run) else 'todo':6s}  {run.name:34s} {fmt_min(run.est_s)}")
        print(
            f"{len(plan)} runs, {len(plan) - len(todo)} done; estimated wall time of what is left: "
            f"{fmt_min(estimate_wall(settings, todo))} ({settings.jobs} at a time)"
        )
        return 0
    if not args.report_only and todo:
        if not Path(data_root).exists():
            raise SystemExit(f"data not found: {data_root}; pass --data-root")
        for run in plan:
            check_existing(run)
        stopped = run_invocation(settings, todo, sys.argv[1:], "width_sweep.py")
        if stopped is not None:
            return stopped
    print(f"wrote {write_report(settings, plan, widths, kappas, weights, args.docs_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
