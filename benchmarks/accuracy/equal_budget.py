#!/usr/bin/env python
"""Equal-budget comparison (issue 19): does a method win because of the method or because of its defaults?

Every method of the accuracy study gets the same search budget on the same pairs: ``--trials`` (12) Optuna trials
(``crossdistill tune``: TPE sampler, median pruner on the per-epoch validation top-1) over its own key
hyper-parameters (``configs/search/methods/<method>.yaml``; the first trial is the method's defaults), each trial a
run of the study's cpu protocol on a validation split carved from the training images (``data.val_fraction``
0.1: 5,000 images; the test images are never seen while tuning; a kept teacher was trained on all 50,000
training images, these included, as the paper's teachers were trained on their students' training set). The
best trial's config is then trained with the study's seeds (0, 1, 2) on the training subset and evaluated on the
test subset, exactly as the study's cells are.

The table sets that tuned result beside the study's cell at the defaults (the same runs of ``run_study.py``, in
the same output folder: the teacher is the study's); it is written between markers into ``docs/RESULTS.md``,
where the study's own rewrite keeps it.

Usage::

    python benchmarks/accuracy/equal_budget.py --dry-list        # the cells, their budget and estimated time
    python benchmarks/accuracy/equal_budget.py                   # tune and evaluate what is missing (resumable)
    python benchmarks/accuracy/equal_budget.py --only pair=resnet-vit --only method=rsd
    python benchmarks/accuracy/equal_budget.py --report-only     # rewrite the table from what is finished

Run the study first (``run_study.py --protocol cpu``): its teacher (or the kept one) is the teacher here and its
cells are the default column. Everything goes to ``<out>/equal-budget/<pair>-<method>/`` (Optuna's study.db,
trials.csv, best.yaml, history.png, the trial runs and the ``-best-seed<N>`` runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import study_models  # noqa: E402,F401  (registers resmlp_cifar here and, under spawn, in the tune workers)
from study_plan import (  # noqa: E402
    Run,
    Settings,
    build_plan,
    cell_run_name,
    check_teacher_weights,
    detect_dataset,
    estimate_seconds,
    fmt_min,
    method_args_for,
    run_config,
    teacher_run_name,
)
from study_protocols import (  # noqa: E402
    DEFAULT_DATA,
    METHOD_LABELS,
    PAIR_LABELS,
    PAIRS,
    PROTOCOLS,
    REPO,
    RESULTS_ARCHIVE,
    Protocol,
)
from study_report import shared_flags  # noqa: E402
from study_run import check_teachers, record_kept, stop_code  # noqa: E402
from study_teachers import TEACHERS_DIR, KeptTeacherError, kept_teachers, verify  # noqa: E402

PAIRS_TUNED = ("resnet-vit", "resnet-resmlp")
METHODS_TUNED = ("kd", "dkd", "dist", "fitnet", "ofa", "crd", "rkd", "cc", "at", "rsd")
SPACES = REPO / "configs" / "search" / "methods"
TRIALS = 12
VAL_FRACTION = 0.1
START, END = "<!-- equal-budget:start -->", "<!-- equal-budget:end -->"


@dataclass
class Cell:
    pair: str
    method: str
    config: dict[str, Any]  # the base run config of the trials
    space: Path

    @property
    def name(self) -> str:
        return f"{self.pair}-{self.method}"


def cells(s: Settings, pairs: Sequence[str], methods: Sequence[str]) -> list[Cell]:
    out = []
    for pair in pairs:
        teacher, student = PAIRS[pair]
        for method in methods:
            cfg = run_config(s, "base", student, teacher, method, method_args_for(method, student, s.protocol), 0)
            cfg["data"]["val_fraction"] = VAL_FRACTION
            cfg["train"]["output_dir"] = str(s.out / "equal-budget")
            cfg["train"].pop("run_name", None)
            cfg["train"].pop("teacher_cache", None)  # tune gives the trials of one study a shared cache
            out.append(Cell(pair, method, cfg, SPACES / f"{method}.yaml"))
    return out


def default_pairs(protocol: Protocol) -> list[str]:
    """The pairs compared when ``--pairs`` is not given: those of PAIRS_TUNED the protocol has."""
    return [p for p in PAIRS_TUNED if p in protocol.pairs]


def archive_of(protocol: str) -> Path:
    """Where the finished cells of a protocol are kept without checkpoints, beside the study's results/<protocol>."""
    return RESULTS_ARCHIVE / f"{protocol}-equal-budget"


def folder(s: Settings, cell: Cell) -> Path:
    return s.out / "equal-budget" / cell.name


def default_params(cell: Cell) -> dict[str, Any]:
    """The method's defaults for the keys of its space: the study's arguments (what the first trial runs)."""
    import yaml

    from crossdistill.distillers import method_config

    given = _space_values(cell.config, yaml.safe_load(cell.space.read_text()) or {})
    return {
        key: value if value is not None else getattr(method_config(cell.method), key.partition(".")[2])
        for key, value in given.items()
    }


def cell_estimate(s: Settings, cell: Cell, trials: int, seeds: Sequence[int]) -> float:
    """Seconds of run time of a cell: every trial and final run as long as the study's cell at the defaults."""
    teacher, student = PAIRS[cell.pair]
    run = Run("estimate", "cells", cell.method, 0, student, teacher, (cell.pair,), cell.config)
    return (trials + len(seeds)) * estimate_seconds(s, run, teacher_cached=True)


def check_teachers_of(s: Settings, chosen: Sequence[Cell], study_command: str) -> None:
    """The teachers exist, and the study's cells in ``s.out`` (the default column) learnt from the same ones."""
    for teacher in dict.fromkeys(PAIRS[c.pair][0] for c in chosen):
        if teacher not in s.kept and not (s.out / teacher_run_name(teacher) / "summary.json").is_file():
            raise SystemExit(
                f"equal_budget.py: the study's teacher {teacher} is not in {s.out} and none is kept: run "
                f"`{study_command} --only teachers` first"
            )
    wanted = {(c.pair, c.method) for c in chosen}
    check_teachers(s, [run for run in build_plan(s) if run.part == "cells" and (run.pairs[0], run.method) in wanted])


def run_cell(s: Settings, cell: Cell, trials: int, seeds: Sequence[int]) -> dict[str, Any]:
    import optuna
    import yaml

    from crossdistill.files import write_text_atomic
    from crossdistill.search.tune import open_storage, tune

    base = folder(s, cell)
    config_path = s.out / "equal-budget" / "configs" / f"{cell.name}.yaml"
    if config_path.is_file() and yaml.safe_load(config_path.read_text()) != json.loads(json.dumps(cell.config)):
        raise SystemExit(
            f"equal_budget.py: {base} holds trials of another base config ({config_path} differs: other --set, "
            "teacher or version); use another --out, or delete that folder to tune again"
        )
    base.mkdir(parents=True, exist_ok=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        config_path,
        f"# equal-budget base config of {cell.name}; written by benchmarks/accuracy/equal_budget.py\n"
        + yaml.safe_dump(cell.config, sort_keys=False),
        hint="the equal-budget folder",
    )
    storage = f"sqlite:///{base / 'study.db'}"
    study = optuna.create_study(
        study_name=cell.name, storage=open_storage(storage), direction="maximize", load_if_exists=True
    )
    study.enqueue_trial(default_params(cell), skip_if_exists=True)  # trial 0: the defaults
    return tune(
        str(config_path),
        str(cell.space),
        trials=trials,
        workers=s.jobs,
        storage=storage,
        study_name=cell.name,
        sampler="tpe",
        pruner="median",
        seed=0,
        evaluate_best=True,
        seeds=",".join(map(str, seeds)),
    )


# ------------------------------------------------------------------------------------------ the table


def _mean_std(values: Sequence[float], seeds: int) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {std:.2f}" + (f" (n={len(values)})" if len(values) < seeds else "")


def _space_values(config: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """The values of a run config at the dotted keys of a search space (None where the config leaves one out)."""
    from crossdistill.report import flatten

    flat = flatten(config)
    return {key: flat.get(key) for key in space}


def cell_result(s: Settings, cell: Cell, seeds: Sequence[int]) -> dict[str, Any]:
    import yaml

    from crossdistill.search.runs import read_summary

    default = [read_summary(s.out / cell_run_name(cell.pair, cell.method, seed)) for seed in seeds]
    finals = [folder(s, cell) / f"{cell.name}-best-seed{seed}" for seed in seeds]
    tuned = [read_summary(path) for path in finals]
    space = yaml.safe_load(cell.space.read_text()) or {}
    # the values the final runs trained with (best.yaml may be newer: more trials found another best since)
    trained = [
        _space_values(yaml.safe_load((p / "config.yaml").read_text()) or {}, space)
        for p in finals
        if p.joinpath("config.yaml").is_file()
    ]
    best_path = folder(s, cell) / "best.yaml"
    best = _space_values(yaml.safe_load(best_path.read_text()) or {}, space) if best_path.is_file() else {}
    params = trained[0] if trained else best
    stale = bool(trained and best and any(t != best for t in trained))
    trials = {"complete": 0, "pruned": 0}
    csv_path = folder(s, cell) / "trials.csv"
    if csv_path.is_file():
        import csv

        for row in csv.DictReader(csv_path.open()):
            state = (row.get("state") or "").lower()
            if state in trials:
                trials[state] += 1
    return {
        "default": [x.last_top1 for x in default if x],
        "tuned": [x.last_top1 for x in tuned if x],
        "params": params,
        "stale": stale,
        "trials": trials,
    }


def table_cells(s: Settings, requested: Sequence[Cell]) -> list[Cell]:
    """The invocation's cells and every other cell tuned in the same folder (its study.db), in the usual order of
    pairs and methods: invocations of one method or pair at a time add up to one table instead of replacing it."""
    pairs = list(dict.fromkeys([*default_pairs(s.protocol), *(c.pair for c in requested)]))
    methods = list(dict.fromkeys([*METHODS_TUNED, *(c.method for c in requested)]))
    given = {c.name: c for c in requested}
    return [
        given.get(c.name, c)
        for c in cells(s, pairs, methods)
        if c.name in given or (folder(s, c) / "study.db").is_file()
    ]


def commands(s: Settings, args: argparse.Namespace, pairs: Sequence[str], methods: Sequence[str]) -> tuple[str, str]:
    """The study's and this script's command lines with this invocation's settings, for ``pairs`` x ``methods``."""
    # an archived copy (results/<protocol>-equal-budget) is where the table is rewritten from, not where it is run
    usual_outs = {REPO / "runs" / f"accuracy-{s.protocol.name}", archive_of(s.protocol.name)}
    teachers_dir = args.teachers_dir if args.teachers_dir != TEACHERS_DIR else None
    shared = shared_flags(s.protocol, s, usual_outs, teachers_dir)
    study = " ".join(["python benchmarks/accuracy/run_study.py", *shared])
    own = shared + [
        flag
        for flag, given in (
            (f"--pairs {','.join(pairs)}", list(pairs) != default_pairs(s.protocol)),
            (f"--methods {','.join(methods)}", list(methods) != list(METHODS_TUNED)),
            (f"--trials {args.trials}", args.trials != TRIALS),
            (f"--seeds {args.seeds}", args.seeds),
        )
        if given
    ]
    return study, " ".join(["python benchmarks/accuracy/equal_budget.py", *own])


def teacher_line(s: Settings, pairs: Sequence[str]) -> str:
    parts = []
    for teacher in dict.fromkeys(PAIRS[p][0] for p in pairs):
        kept = s.kept.get(teacher)
        parts.append(
            f"{teacher}: kept (top-1 {kept.last_top1:.2f} after {kept.epochs} epochs on {kept.train_images:,} images, "
            f"SHA-256 {kept.sha256[:12]}...)"
            if kept
            else f"{teacher}: trained in the study ({teacher_run_name(teacher)})"
        )
    return (
        "Teachers: "
        + "; ".join(parts)
        + "."
        + (f" Not the protocol's settings: --set {' '.join(s.overrides)}." if s.overrides else "")
    )


def scratch_top1(s: Settings, pair: str, seeds: Sequence[int]) -> list[float]:
    """The study's student-alone runs of the pair's student (what both columns should beat)."""
    from crossdistill.search.runs import read_summary

    found = [read_summary(s.out / cell_run_name(pair, "vanilla", seed)) for seed in seeds]
    return [x.last_top1 for x in found if x]


def plot(s: Settings, all_cells: Sequence[Cell], results: dict[str, dict[str, Any]], seeds: Sequence[int], path: Path):
    """One panel per pair: each method's defaults and tuned bars (mean, std over seeds), the student alone dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(dict.fromkeys(c.pair for c in all_cells))
    widest = max(sum(c.pair == p for c in all_cells) for p in pairs)
    fig, axes = plt.subplots(
        1, len(pairs), figsize=(max(5.0, 0.75 * widest + 1.5) * len(pairs), 4.2), sharey=True, squeeze=False
    )
    lows: list[float] = []
    for ax, pair in zip(axes[0], pairs):
        here = [c for c in all_cells if c.pair == pair]
        x = np.arange(len(here))
        for offset, column, color, label in (
            (-0.2, "default", "#9ecae1", "defaults"),
            (0.2, "tuned", "#08519c", "tuned"),
        ):
            values = [results[c.name][column] for c in here]
            means = [statistics.mean(v) if v else np.nan for v in values]
            stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.bar(x + offset, means, 0.38, yerr=stds, capsize=2.5, color=color, label=label)
            lows += [m - d for m, d in zip(means, stds) if not np.isnan(m)]
        alone = scratch_top1(s, pair, seeds)
        if alone:
            ax.axhline(statistics.mean(alone), color="black", linestyle=":", linewidth=1.2, label="student alone")
            lows.append(statistics.mean(alone))
        ax.set_xticks(x)
        ax.set_xticklabels([METHOD_LABELS.get(c.method, c.method) for c in here], fontsize=8, rotation=30)
        ax.set_title(PAIR_LABELS.get(pair, pair), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    if lows:
        axes[0][0].set_ylim(max(0.0, 5.0 * (min(lows) // 5.0) - 5.0), None)
    axes[0][0].set_ylabel(f"top-1 (%), last epoch, mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''}")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    title = f"CIFAR-10, {s.protocol.name} protocol: each method at its defaults and after the same tuning budget"
    if not s.protocol.results:
        title = "SMOKE TEST (tiny protocol), NOT RESULTS\n" + title
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(
    s: Settings,
    all_cells: Sequence[Cell],
    results: dict[str, dict[str, Any]],
    seeds: Sequence[int],
    trials: int,
    cmds: tuple[str, str],
    image: str | None,
) -> str:
    L = [
        START,
        "## Equal tuning budget: defaults vs tuned\n",
        f"Generated {datetime.date.today().isoformat()} by `benchmarks/accuracy/equal_budget.py`. Each method: "
        f"{trials} Optuna trials (TPE, median pruning; the first trial at its defaults) over its key "
        "hyper-parameters (`configs/search/methods/<method>.yaml`), each trial measured on a validation split of "
        f"{VAL_FRACTION:.0%} of the training images; then its best config with seeds "
        f"{', '.join(map(str, seeds))} on the test subset, as the study's cells. Last-epoch top-1 (%), "
        "mean ± std over seeds; **bold**: the best tuned mean of the pair. "
        + teacher_line(s, [c.pair for c in all_cells])
        + "\n",
        "| pair | method | defaults | tuned | tuned - defaults | best values | trials (complete / pruned) |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in dict.fromkeys(c.pair for c in all_cells):
        here = [c for c in all_cells if c.pair == pair]
        tuned_means = {c.name: statistics.mean(results[c.name]["tuned"]) for c in here if results[c.name]["tuned"]}
        top = max(tuned_means.values(), default=None)
        for c in here:
            r = results[c.name]
            tuned = _mean_std(r["tuned"], len(seeds))
            if top is not None and tuned_means.get(c.name) == top:
                tuned = f"**{tuned}**"
            gain = (
                f"{statistics.mean(r['tuned']) - statistics.mean(r['default']):+.2f}"
                if r["tuned"] and r["default"]
                else "-"
            )
            values = ", ".join(
                f"{key.partition('.')[2]}={v:.3g}" if isinstance(v, float) else f"{key.partition('.')[2]}={v}"
                for key, v in r["params"].items()
            )
            L.append(
                f"| {PAIR_LABELS.get(pair, pair)} | {METHOD_LABELS.get(c.method, c.method)} | "
                f"{_mean_std(r['default'], len(seeds))} | {tuned} | {gain} | "
                f"{values or '-'}{' (stale: best.yaml has another best now)' if r['stale'] else ''} | "
                f"{r['trials']['complete']} / {r['trials']['pruned']} |"
            )
    L.append("")
    if image:
        L.append(f"![defaults vs tuned, per method and pair]({image})\n")
    L.append("<!-- doc-test: skip hours on 2 CPU cores; tests/test_equal_budget.py runs it at a toy size -->")
    L.append("```bash")
    L.append(f"{cmds[0]}   # the teacher and the default column")
    L.append(f"{cmds[1]}   # resumable; --dry-list for the plan")
    L.append("```")
    L.append(END)
    return "\n".join(L)


def write_block(path: Path, block: str) -> None:
    from crossdistill.files import write_text_atomic

    text = path.read_text() if path.is_file() else ""
    if text.count(START) != text.count(END) or text.count(START) > 1:
        raise SystemExit(f"equal_budget.py: {path} has unpaired or repeated {START} / {END} markers; mend it by hand")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text, hint="the results page")


# ------------------------------------------------------------------------------------------ main


def parse_only(tokens: Sequence[str]) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for token in (t for chunk in tokens for t in chunk.split(",") if t):
        key, sep, value = token.partition("=")
        if not sep or key not in ("pair", "method"):
            raise SystemExit(f"equal_budget.py: --only {token!r}: use pair=NAME or method=NAME")
        wanted.setdefault(key, set()).add(value)
    return wanted


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument(
        "--out", type=Path, default=None, help="the study's output folder (default runs/accuracy-<protocol>)"
    )
    ap.add_argument("--data-root", default=None, help=f"as run_study.py (default {DEFAULT_DATA})")
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir: where decoded archives are cached")
    ap.add_argument("--pairs", default=None, help=f"default: those of {', '.join(PAIRS_TUNED)} in the protocol")
    ap.add_argument("--methods", default=",".join(METHODS_TUNED))
    ap.add_argument("--only", action="append", default=[], metavar="SEL", help="pair=NAME | method=NAME")
    ap.add_argument("--trials", type=int, default=TRIALS, help=f"trials per method and pair (default {TRIALS})")
    ap.add_argument("--seeds", default=None, help="seeds of the final runs (default: the protocol's)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the protocol's)")
    ap.add_argument("--train-teachers", action="store_true", help="as run_study.py: the study's own teachers")
    ap.add_argument("--teachers-dir", type=lambda text: Path(text).expanduser().resolve(), default=TEACHERS_DIR)
    ap.add_argument("--results", type=Path, default=None, help="the page the table goes in (default: the study's page)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as run_study.py --set")
    ap.add_argument("--dry-list", action="store_true", help="list the cells and the estimate; train nothing")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the table from what is finished")
    args = ap.parse_args(argv)

    protocol = PROTOCOLS[args.protocol]
    pairs = [p for p in args.pairs.split(",") if p] if args.pairs else default_pairs(protocol)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [p for p in pairs if p not in PAIRS] + [m for m in methods if not (SPACES / f"{m}.yaml").is_file()]
    if unknown:
        raise SystemExit(f"equal_budget.py: unknown pair or method without a space file: {', '.join(unknown)}")
    if args.trials < 1:
        raise SystemExit(f"equal_budget.py: --trials {args.trials}: must be at least 1")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(protocol.seeds)
    data_root = str(Path(args.data_root).expanduser().resolve()) if args.data_root else str(DEFAULT_DATA)
    kept = {}
    if protocol.kept_teachers and not args.train_teachers:
        try:
            kept = {k: t for k, t in kept_teachers(args.teachers_dir).items() if any(PAIRS[p][0] == k for p in pairs)}
            for t in kept.values():
                verify(t)
        except KeptTeacherError as err:
            raise SystemExit(f"equal_budget.py: {err}") from None
    s = Settings(
        protocol=protocol,
        out=(args.out or REPO / "runs" / f"accuracy-{protocol.name}").resolve(),
        data_root=data_root,
        dataset=detect_dataset(data_root),
        cache_dir=args.cache_dir,
        teacher_cache=True,
        device=protocol.device,
        methods=tuple(methods),
        jobs=args.jobs or protocol.jobs,
        threads=protocol.threads,
        overrides=tuple(args.set),
        kept=kept,
    )
    all_cells = cells(s, pairs, methods)
    if s.overrides:
        from crossdistill.config import apply_overrides

        for cell in all_cells:
            cell.config = apply_overrides(cell.config, list(s.overrides))
    wanted = parse_only(args.only)
    chosen = [
        c for c in all_cells if c.pair in wanted.get("pair", {c.pair}) and c.method in wanted.get("method", {c.method})
    ]

    if args.dry_list:
        total = 0.0
        for cell in chosen:
            est = cell_estimate(s, cell, args.trials, seeds)
            total += est
            done = all((folder(s, cell) / f"{cell.name}-best-seed{seed}" / "summary.json").is_file() for seed in seeds)
            print(
                f"{'done' if done else 'todo':5s} {cell.name:24s} {args.trials} trials + {len(seeds)} seeds "
                f"{fmt_min(est):>9s}"
            )
        print(
            f"{len(chosen)} cells; estimated {fmt_min(total / s.jobs)} on {s.jobs} worker(s) (pruned trials are "
            "shorter) from the speeds of the study's calibration"
        )
        return 0
    check_teachers_of(s, chosen, commands(s, args, pairs, methods)[0])
    if not args.report_only:
        check_teacher_weights(s, [teacher_run_name(PAIRS[c.pair][0]) for c in chosen if PAIRS[c.pair][0] not in s.kept])
        record_kept(s)
        for i, cell in enumerate(chosen, 1):
            print(f"\n=== [{i}/{len(chosen)}] {cell.name}: {args.trials} trials, then seeds {seeds}", flush=True)
            try:
                run_cell(s, cell, args.trials, seeds)
            except (KeyboardInterrupt, Exception) as err:  # a stopped or failed cell: one line and its exit code
                code = stop_code(err, "equal_budget.py", cell.name)
                if code is None:
                    raise
                return code
    results = (
        args.results
        or (REPO / "docs" if protocol.results else s.out / "docs") / f"RESULTS{protocol.docs_suffix.upper()}.md"
    )
    shown = table_cells(s, all_cells)
    cmds = commands(s, args, list(dict.fromkeys(c.pair for c in shown)), list(dict.fromkeys(c.method for c in shown)))
    found = {c.name: cell_result(s, c, seeds) for c in shown}
    image = None
    if any(r["default"] or r["tuned"] for r in found.values()):
        image_path = results.parent / f"results{protocol.docs_suffix}_equal_budget.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        plot(s, shown, found, seeds, image_path)
        image = image_path.name
    write_block(results, table(s, shown, found, seeds, args.trials, cmds, image))
    print(f"wrote the equal-budget table into {results}" + (f" and its plot {image}" if image else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
