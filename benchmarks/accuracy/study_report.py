"""The accuracy study's results page: RESULTS{suffix}.md (setup, tables of mean ± std over seeds, the RSD grid,
findings, how to reproduce, machine and time) and its two charts, written from the finished run directories."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shlex
import statistics
from pathlib import Path
from typing import Any, Sequence

from study_plan import (
    Run,
    Settings,
    cell_run_name,
    estimate_wall,
    fmt_min,
    grid_runs,
    method_args_for,
    train_images,
)
from study_protocols import (
    DEFAULT_DATA,
    METHOD_LABELS,
    MODELS,
    OFA_CNN_STUDENT,
    PAIR_LABELS,
    PAIRS,
    REPO,
    RESULTS_ARCHIVE,
    ModelSpec,
    Protocol,
    method_defaults,
    rsd_default,
    teacher_model,
)
from study_run import machine_info, read_log
from study_teachers import TEACHERS_DIR

# tests/test_docs.py runs every shell block of docs/ that is not marked like this one
DOC_TEST_SKIP = (
    "<!-- doc-test: skip the whole study: 90 minutes on 2 CPU cores (cpu) or a GPU (gpu); "
    "tests/test_accuracy_study.py runs its tiny protocol -->"
)

# ------------------------------------------------------------------------------------------ report


def read_summary(run: Run) -> dict[str, Any] | None:
    path = run.run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def param_count(spec: ModelSpec) -> int:
    import timm
    import torch

    import study_models  # noqa: F401

    with torch.device("meta"):
        model = timm.create_model(spec.name, num_classes=10, **spec.kwargs)
    return sum(p.numel() for p in model.parameters())


def cell_stats(plan: Sequence[Run], pair: str, method: str, seeds: Sequence[int], key: str):
    from crossdistill.report import mean_std

    names = [cell_run_name(pair, method, seed) for seed in seeds]
    by_name = {r.name: r for r in plan}
    values = []
    for name in names:
        summary = read_summary(by_name[name]) if name in by_name else None
        if summary is not None:
            values.append(summary.get(key))
    return mean_std(values)


def _pm(stats, digits: int = 2) -> str:
    from crossdistill.report import format_mean_std

    mean, std, n = stats
    text = format_mean_std(mean, std, digits)
    return text if n == 0 or n >= 3 else f"{text} (n={n})"


def plot_accuracy(
    path: Path,
    protocol: Protocol,
    methods: Sequence[str],
    plan: Sequence[Run],
    teacher_acc: dict[str, float],
    kept: Sequence[str] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(protocol.pairs)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7.5, 2.6 * len(pairs) + 2.5), 4.8), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    lows = []
    for j, method in enumerate(methods):
        means, stds = [], []
        for pair in pairs:
            mean, std, n = cell_stats(plan, pair, method, protocol.seeds, "last_top1")
            means.append(mean if n else np.nan)
            stds.append(std if std is not None else 0.0)
            if n:
                lows.append(mean - (std or 0.0))
        x = np.arange(len(pairs)) + (j - (len(methods) - 1) / 2) * width
        edge = "black" if method == "rsd" else "none"
        ax.bar(
            x,
            means,
            width * 0.92,
            yerr=stds,
            capsize=2.5,
            label=METHOD_LABELS.get(method, method),
            color=colors(j % 10),
            edgecolor=edge,
            linewidth=1.2 if method == "rsd" else 0,
        )
    for i, pair in enumerate(pairs):
        acc = teacher_acc.get(PAIRS[pair][0])
        if acc is not None and math.isfinite(acc):
            ax.hlines(
                acc,
                i - 0.45,
                i + 0.45,
                colors="black",
                linestyles="dashed",
                linewidth=1.2,
                label="teacher" if i == 0 else None,
            )
            lows.append(acc)
    ax.set_xticks(np.arange(len(pairs)))
    ax.set_xticklabels(
        [
            f"{PAIR_LABELS.get(p, p)}\nteacher: {teacher_model(PAIRS[p][0], PAIRS[p][0] in kept).label}\n"
            f"student: {MODELS[PAIRS[p][1]].label}"
            for p in pairs
        ],
        fontsize=8,
    )
    n_seeds = len(protocol.seeds)
    ax.set_ylabel(f"top-1 (%), last epoch, mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}")
    title = f"CIFAR-10 at 32 px, {protocol.name} protocol: top-1 of each student by distillation method"
    if not protocol.results:
        title = "SMOKE TEST (tiny protocol), NOT RESULTS\n" + title
    ax.set_title(title, fontsize=10)
    finite = [v for v in lows if math.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, math.floor(min(finite) / 5.0) * 5.0 - 5.0), None)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="method", title_fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sensitivity(
    path: Path, protocol: Protocol, grid: dict[tuple[float, float], Run], reference: dict[str, float]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    weights, kappas = list(protocol.grid_weights), list(protocol.grid_kappas)
    values = np.full((len(weights), len(kappas)), np.nan)
    for i, w in enumerate(weights):
        for j, k in enumerate(kappas):
            run = grid.get((w, k))
            summary = read_summary(run) if run is not None else None
            if summary is not None:
                values[i, j] = summary["last_top1"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    for i in range(len(weights)):
        for j in range(len(kappas)):
            v = values[i, j]
            text = "not run" if not np.isfinite(v) else f"{v:.2f}"
            dark = np.isfinite(v) and (v - vmin) / (vmax - vmin) > 0.6
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=10,
                color="black" if dark else "white" if np.isfinite(v) else "gray",
            )
            if (weights[i], kappas[j]) == rsd_default():
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(kappas)))
    ax.set_xticklabels([f"{k:g}" for k in kappas])
    ax.set_yticks(range(len(weights)))
    ax.set_yticklabels([f"{w:g}" for w in weights])
    ax.set_xlabel("kappa (weight of the off-diagonal, decorrelation terms)")
    ax.set_ylabel("lambda (weight of the RSD loss)")
    pair = protocol.sens_pair
    weight, kappa = rsd_default()
    title = (
        f"RSD sensitivity, {PAIR_LABELS.get(pair, pair)} (seed {protocol.sens_seed}), last-epoch top-1 (%)\n"
        f"red box: released defaults (lambda {weight:g}, kappa {kappa:g})"
    )
    refs = ", ".join(f"{k} {v:.2f}" for k, v in reference.items() if v is not None and math.isfinite(v))
    if refs:
        title += f"; same seed: {refs}"
    if not protocol.results:
        title = "SMOKE TEST (tiny protocol), not results\n" + title
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def study_command(protocol: Protocol, s: Settings, extra: str = "") -> str:
    # the archived copy of a finished study is where its page is rewritten from, not where it is run
    usual_outs = {REPO / "runs" / f"accuracy-{protocol.name}", RESULTS_ARCHIVE / protocol.name}
    kept_dirs = {kept.weights.parent for kept in s.kept.values()}
    teachers_dir = next(iter(kept_dirs)) if kept_dirs and kept_dirs != {TEACHERS_DIR} else None
    parts = ["python benchmarks/accuracy/run_study.py", *shared_flags(protocol, s, usual_outs, teachers_dir)]
    return " ".join(parts) + (f" {extra}" if extra else "")


def shared_flags(protocol: Protocol, s: Settings, usual_outs: set[Path], teachers_dir: Path | None) -> list[str]:
    """The flags of ``run_study.py`` (and ``equal_budget.py``) that reproduce the settings ``s``: ``--out`` unless
    it is one of ``usual_outs``, the other settings where they differ from the protocol's."""
    flags = [f"--protocol {protocol.name}"]
    if s.out.resolve() not in {out.resolve() for out in usual_outs}:
        flags.append(f"--out {shlex.quote(rel_path(s.out))}")
    if Path(s.data_root).resolve() != DEFAULT_DATA.resolve():
        flags.append(f"--data-root {shlex.quote(rel_path(Path(s.data_root)))}")
    flags += [f"--set {shlex.quote(o)}" for o in s.overrides]
    if protocol.kept_teachers and not s.kept:
        flags.append("--train-teachers")
    if teachers_dir is not None:
        flags.append(f"--teachers-dir {shlex.quote(rel_path(teachers_dir))}")
    return flags


def rel_path(path: Path) -> str:
    """A path relative to the repository when it is inside it or beside it (../shared), else absolute."""
    path = Path(path).resolve()
    for base in (REPO, REPO.parent):
        if path == base or base in path.parents:
            return os.path.relpath(path, REPO)
    return str(path)


def write_report(s: Settings, plan: Sequence[Run], docs_dir: Path) -> Path:
    from crossdistill.report import format_seconds, method_args_of

    p = s.protocol
    docs_dir.mkdir(parents=True, exist_ok=True)
    md_path = docs_dir / f"RESULTS{p.docs_suffix.upper()}.md"
    bar_path = docs_dir / f"results{p.docs_suffix}_accuracy.png"
    heat_path = docs_dir / f"results{p.docs_suffix}_sensitivity.png"
    methods = [m for m in s.methods]
    by_name = {r.name: r for r in plan}
    summaries = {r.name: read_summary(r) for r in plan}
    n_done = sum(v is not None for v in summaries.values())

    teacher_acc: dict[str, float] = {key: kept.last_top1 for key, kept in s.kept.items()}
    kept_specs = {key: teacher_model(key, kept=True) for key in s.kept}
    teacher_rows = [
        f"| {kept_specs[key].label} (`{kept_specs[key].name}`) | {param_count(kept_specs[key]) / 1e6:.2f}M | "
        f"{kept.epochs} "
        f"(kept: {kept.train_images:,} images; top-1 on {kept.eval_images:,} test images) | {kept.last_top1:.2f} | "
        f"{kept.best_top1:.2f} "
        f"(epoch {kept.best_epoch}) | {format_seconds(kept.wall_time_s)} ({kept.trained_with.get('device', '?')}) |"
        for key, kept in s.kept.items()
    ]
    for run in plan:
        if run.part != "teachers":
            continue
        summary = summaries[run.name]
        spec = MODELS[run.student]
        if summary is not None:
            teacher_acc[run.student] = summary["last_top1"]
        teacher_rows.append(
            f"| {spec.label} (`{spec.name}`) | {param_count(spec) / 1e6:.2f}M | {run.config['train']['epochs']} | "
            + (
                f"{summary['last_top1']:.2f} | {summary['best_top1']:.2f} (epoch {summary['best_epoch']}) | "
                f"{format_seconds(summary['wall_time_s'])} |"
                if summary
                else "not run | - | - |"
            )
        )
    plot_accuracy(bar_path, p, methods, plan, teacher_acc, kept=list(s.kept))
    grid = grid_runs(plan, p)
    ref = {}
    if p.sens_pair in p.pairs:
        for method in ("vanilla", "kd"):
            if method in methods:
                run = by_name.get(cell_run_name(p.sens_pair, method, p.sens_seed))
                summary = read_summary(run) if run else None
                ref[METHOD_LABELS[method]] = summary["last_top1"] if summary else None
    plot_sensitivity(heat_path, p, grid, ref)

    log = read_log(s.out)
    run_records = [r for r in log if r.get("event") == "run" and r.get("ok")]
    invocations = [r for r in log if r.get("event") == "invocation"]
    latest_seconds: dict[str, float] = {}
    for record in run_records:
        latest_seconds[record["run"]] = record["seconds"]
    wall_runs = sum(
        latest_seconds.get(n, (summaries[n] or {}).get("wall_time_s", 0.0))
        for n in summaries
        if summaries[n] is not None
    )
    loads = [x for r in run_records for x in (r.get("load_before"), r.get("load_after")) if x is not None]
    machine = next((r["machine"] for r in reversed(invocations) if r.get("machine")), None)
    if machine is None:  # no invocation recorded (runs copied from elsewhere): describe this machine
        machine = dict(machine_info(s.device), jobs=s.jobs)
        if s.threads:
            machine["torch_threads"] = s.threads

    L: list[str] = []
    title = "Cross-architecture accuracy study"
    if p.name != "cpu":
        title += f" ({p.name} protocol)"
    L.append(f"# {title}\n")
    if takeaways := leading_block(md_path):
        L.append(takeaways + "\n")
    if not p.results:
        L.append(
            "> **SMOKE TEST OUTPUT, NOT RESULTS.** This file was written by the `tiny` protocol (a few hundred "
            "images, one epoch, one seed), which only checks that the study's runner works end to end. Its "
            "numbers mean nothing about the methods.\n"
        )
    if s.overrides:
        L.append(
            f"> **Not the {p.name} protocol:** every run was changed with `--set {' '.join(s.overrides)}`; the "
            "setup below describes the protocol, not these runs.\n"
        )
    total = len(plan)
    if n_done < total:
        missing = [r.name for r in plan if summaries[r.name] is None]
        L.append(
            f"> **Incomplete: {n_done} of {total} runs finished.** Missing: {', '.join(missing[:12])}"
            + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
            + ". Cells with fewer than 3 seeds show n; re-run the command below to finish them.\n"
        )
    L.append(
        f"Generated {datetime.date.today().isoformat()} by `benchmarks/accuracy/run_study.py` from the run "
        f"directories in `{rel_path(s.out)}/` (each holds config.yaml, summary.json and metrics.csv).\n"
    )

    L.append("## Setup\n")
    teacher_keys = list(dict.fromkeys(PAIRS[pair][0] for pair in p.pairs))
    trained = [key for key in teacher_keys if key not in s.kept]
    kept_labels = ", ".join(teacher_model(key, kept=True).label for key in teacher_keys if key in s.kept)
    kept_dir = next(iter(s.kept.values())).weights.parent if s.kept else TEACHERS_DIR
    subset = "all 50,000" if p.train_subset is None else f"{p.train_subset:,} (class-balanced, fixed)"
    tsubset = (
        "all 50,000"
        if p.teacher_train_subset is None
        else f"{p.teacher_train_subset:,} (the same subset)"
        if p.teacher_train_subset == p.train_subset
        else f"{p.teacher_train_subset:,}"
    )
    esubset = (
        "all 10,000 test images"
        if p.eval_subset is None
        else f"a fixed class-balanced subset of {p.eval_subset:,} test images"
    )
    L.append(
        f"- Data: CIFAR-10 ({rel_path(Path(s.data_root))}, dataset `{s.dataset}`) at its native 32 px. Students "
        f"train on {subset} training images, "
        + (f"teachers trained in the study on {tsubset}" if trained else "")
        + ("; " if trained and s.kept else "")
        + (f"kept teachers ({kept_labels}) trained once on their own schedule (see Teachers)" if s.kept else "")
        + f"; every epoch is evaluated on {esubset}."
    )
    L.append(
        f"- Augmentation: RandomResizedCrop(32, scale {tuple(p.scale)}) + horizontal flip; evaluation on the "
        "unchanged 32 px image; CIFAR-10 mean/std; label smoothing 0.1; no mixup, cutmix, RandAugment or "
        "random erasing."
    )
    L.append(
        f"- Schedule: students {p.epochs} epochs"
        + (f", teachers trained in the study {p.teacher_epochs} epochs" if trained else "")
        + f", batch {p.batch_size}, "
        "cosine learning rate with 1 warm-up epoch. CNN students: SGD (momentum 0.9) lr 0.05, weight decay "
        "2e-3 (the paper's CNN recipe); ViT and ResMLP: AdamW lr 1e-3, weight decay 0.05, gradient clipping 5."
    )
    L.append(
        f"- Seeds {', '.join(map(str, p.seeds))} for every cell (a seed sets the initialisation, the data "
        "order and the augmentation); teachers: one run each (seed 0), from scratch, no pre-training; "
        "students use the teacher's last-epoch weights"
        + (
            f" (kept teachers: the last-epoch weights of one long run each, `{rel_path(kept_dir)}/` with their "
            "config, SHA-256 and command; `--train-teachers` trains them in the study instead)."
            if s.kept
            else "."
        )
    )
    L.append(
        f"- Device `{s.device}`, precision `{p.amp}`, {s.jobs} run(s) at a time"
        + (f" with {s.threads} torch thread(s) each." if s.threads else ".")
        + (
            " Teacher outputs cached between runs with the same teacher and seed (`train.teacher_cache`, fp16)."
            if s.teacher_cache
            else ""
        )
    )
    L.append("")
    L.append("| role | model | timm name and kwargs | parameters |")
    L.append("|---|---|---|---|")
    roles = {}
    for pair in p.pairs:
        t, st = PAIRS[pair]
        roles.setdefault(t, "teacher")
        roles.setdefault(st, "student")
    for key, role in roles.items():
        spec = teacher_model(key, kept=key in s.kept) if role == "teacher" else MODELS[key]
        kw = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
        L.append(f"| {role} | {spec.label} | `{spec.name}` ({kw}) | {param_count(spec) / 1e6:.2f}M |")
    L.append("")
    L.append(
        "Method hyper-parameters (the official cross-architecture code's defaults, the same in every pair; "
        "nothing was tuned):\n"
    )
    L.append("| method | arguments |")
    L.append("|---|---|")
    for method in methods:
        student = PAIRS[p.pairs[0]][1]
        args = method_args_of({"method": method, "method_args": method_args_for(method, student, p)})
        text = ", ".join(f"{k}={v}" for k, v in args.items()) or "-"
        if method == "ofa":
            text += f" (w_ofa={OFA_CNN_STUDENT['w_ofa']} for the CNN student)"
        if method == "crd" and args["num_negatives"] != method_defaults("crd")["num_negatives"]:
            text += (
                f" (num_negatives: the official 16384 per 50,000 training images, scaled to this protocol's "
                f"{train_images(p):,})"
            )
        L.append(f"| {METHOD_LABELS.get(method, method)} (`{method}`) | {text} |")
    L.append("")

    L.append("## Teachers\n")
    L.append("| teacher | parameters | epochs | last top-1 | best top-1 | wall time |")
    L.append("|---|---|---|---|---|---|")
    L.extend(teacher_rows)
    L.append("")

    for key, label in (("last_top1", "last-epoch"), ("best_top1", "best-epoch")):
        L.append(f"## Top-1 (%), {label}: mean ± std over seeds\n")
        header = ["pair (teacher → student)", "teacher"] + [METHOD_LABELS.get(m, m) for m in methods]
        L.append("| " + " | ".join(header) + " |")
        L.append("|" + "|".join("---" for _ in header) + "|")
        for pair in p.pairs:
            t = PAIRS[pair][0]
            stats = {m: cell_stats(plan, pair, m, p.seeds, key) for m in methods}
            finite = {m: v[0] for m, v in stats.items() if v[2] and math.isfinite(v[0])}
            top = round(max(finite.values()), 2) if finite else None  # ties as shown (two decimals) all bold
            cells = []
            for m in methods:
                text = _pm(stats[m])
                cells.append(f"**{text}**" if m in finite and round(finite[m], 2) == top else text)
            tacc = teacher_acc.get(t)
            L.append(
                f"| {PAIR_LABELS.get(pair, pair)} | {tacc:.2f} | "
                if tacc is not None
                else f"| {PAIR_LABELS.get(pair, pair)} | - | "
            )
            L[-1] += " | ".join(cells) + " |"
        L.append("")
        if key == "last_top1":
            L.append(
                "Bold: the highest mean in the row (every mean level with it at two decimals). Sample standard "
                f"deviation (n - 1) over seeds "
                f"{', '.join(map(str, p.seeds))}. Bar chart of the last-epoch table (dashed line: the "
                "teacher):\n"
            )
            L.append(f"![top-1 by pair and method]({bar_path.name})\n")
        else:
            L.append(
                "Best epoch: the highest of the per-epoch evaluations on the same test images (as the "
                "paper reports), an optimistic number; the last-epoch table is the primary one.\n"
            )

    L.append("## RSD sensitivity: lambda x kappa\n")
    if grid:
        weight, kappa = rsd_default()
        L.append(
            f"Pair {PAIR_LABELS.get(p.sens_pair, p.sens_pair)}, seed {p.sens_seed}, last-epoch top-1 (%); "
            "rows lambda (`method_args.weight`), columns kappa (`method_args.kappa`); the released default "
            f"is ({weight:g}, {kappa:g}).\n"
        )
        L.append("| lambda \\ kappa | " + " | ".join(f"{k:g}" for k in p.grid_kappas) + " |")
        L.append("|---|" + "|".join("---" for _ in p.grid_kappas) + "|")
        for w in p.grid_weights:
            row = []
            for k in p.grid_kappas:
                run = grid.get((w, k))
                summary = read_summary(run) if run else None
                row.append(f"{summary['last_top1']:.2f}" if summary else "not run")
            L.append(f"| {w:g} | " + " | ".join(row) + " |")
        L.append("")
        if ref:
            L.append(
                "Same pair and seed without RSD: "
                + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} not run" for k, v in ref.items())
                + ".\n"
            )
        L.append(f"![RSD lambda x kappa heat map]({heat_path.name})\n")
    else:
        L.append("No grid (RSD is not among the methods of this installation).\n")

    L.append("## What the numbers say\n")
    L.extend(findings(p, plan, methods, teacher_acc))
    L.append("")
    L.append("## How this differs from the paper's setting\n")
    L.append(
        "- **Teachers.** The paper distils ImageNet-pretrained teachers fine-tuned on CIFAR-100 (ViT-S 92.4%, "
        "Swin-T, ConvNeXt-T, Mixer-B/16). Ours are small models trained from scratch on CIFAR-10 alone"
        + (
            ": kept "
            + ", ".join(
                f"{teacher_model(key, kept=True).label} ({kept.last_top1:.2f} %)" for key, kept in s.kept.items()
            )
            + f" after {'one long run' if len(s.kept) == 1 else 'one long run each'} on all "
            f"{max(kept.train_images for kept in s.kept.values()):,} training images" + ("; " if trained else ".")
            if s.kept
            else ", "
        )
        + (
            f"{'the ones' if not s.kept else ', '.join(MODELS[key].label for key in trained)} trained in the "
            f"study on the same training images as the students, for a few epochs: "
            f"{'weak teachers' if len(trained) > 1 else 'a weak teacher'}, and a token-model teacher trained "
            "from scratch on little data is weaker than a CNN (no locality prior)."
            if trained
            else ""
        )
    )
    last_stages = (
        "the ResNet student's last stage is 1 x 1, the kept ResNet teacher's 2 x 2 (no stem max-pool)"
        if "resnet_t" in s.kept
        else "the ResNet's last stage is 1 x 1"
    )
    L.append(
        "- **Resolution.** The paper upsamples CIFAR to 224 px (RandomResizedCrop); we train at the native "
        f"32 px, so the ViT and ResMLP see 8 x 8 tokens of 4 px and {last_stages}."
    )
    L.append(
        f"- **Schedule and data.** The paper trains 300 epochs on all 50,000 CIFAR-100 images with mixup, cutmix "
        f"and RandAugment for the token students; here {p.epochs} epochs on {subset.split(' (')[0]} CIFAR-10 "
        "images without them. Method hyper-parameters are the paper's defaults, not re-tuned for this regime."
    )
    L.append(
        "- **Dataset.** CIFAR-10 (10 classes) instead of CIFAR-100 / ImageNet-1k: logit-based methods have "
        "less dark knowledge to transfer with 10 classes."
    )
    L.append("")

    L.append("## Reproduce\n")
    L.append(DOC_TEST_SKIP)
    L.append("```bash")
    L.append(study_command(p, s, "--dry-list") + "   # the plan, estimated time, what is already done")
    L.append(study_command(p, s) + "              # everything; resumable, finished runs are skipped")
    if trained:
        L.append("# or in chunks (any order; teachers are trained first when a chunk needs them):")
        L.append(study_command(p, s, "--only teachers"))
    else:
        L.append("# or in chunks (any order):")
    for pair in p.pairs:
        L.append(study_command(p, s, f"--only pair={pair}"))
    L.append(study_command(p, s, "--only sensitivity"))
    L.append(study_command(p, s, "--report-only") + "   # rewrite this page from the finished runs")
    L.append("```\n")
    L.append(
        "Each run's resolved YAML is in `configs/` of the output folder (`python benchmarks/accuracy/study_models.py "
        "train --config` reruns one alone: `crossdistill` with the study's ResMLP and kept ResNet registered). "
        "Runs are deterministic for a given seed, machine and torch build, on CPU and on CUDA. Checked: a second "
        "invocation of the gpu protocol into a fresh output folder on the same H100 gave the same training "
        "losses and accuracies in all 73 runs; on the CPU, two cells rerun into a fresh folder (a cold teacher "
        "cache) matched every logged loss and accuracy. Another machine or torch build can differ in the last "
        "digits, within the reported std.\n"
    )
    archive = RESULTS_ARCHIVE / p.name
    if (archive / "study_log.jsonl").exists():
        archived_report = f"--out {rel_path(archive)} --report-only"
        L.append(
            f"The run directories behind this page (config.yaml, metrics.csv, summary.json; no checkpoints) "
            f"and the runner's log are kept in `{rel_path(archive)}/`: "
            f"`{study_command(p, s, '--report-only').replace('--report-only', archived_report)}` "
            "rewrites this page from them."
        )
    L.append("")

    L.append("## Machine and time\n")
    L.append(
        f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores visible; {machine.get('jobs', s.jobs)} run(s) at "
        f"a time with {machine.get('torch_threads')} torch thread(s) each"
        + (f"; GPU: {machine['gpu']}" if machine.get("gpu") else "")
    )
    L.append(
        f"- torch {machine.get('torch')}, timm {machine.get('timm')}, crossdistill {machine.get('crossdistill')}, "
        f"Python {machine.get('python')}"
    )
    ends = [r for r in log if r.get("event") == "invocation_end"]
    wall_clock = sum(r.get("seconds", 0.0) for r in ends)
    L.append(
        f"- Wall-clock time of the study: {fmt_min(wall_clock)} over {len(ends)} invocation(s) of the runner "
        f"(each run's own time, summed over the {n_done} finished runs: {fmt_min(wall_runs)}; several runs "
        "go at a time)"
        + (
            f"; 1-minute load average during the runs {min(loads):.1f} to {max(loads):.1f} "
            f"({machine.get('cores')} cores, {machine.get('jobs', s.jobs)} run(s) at a time; a load well above "
            "what the runs themselves make means other work shared the machine and the times are inflated)"
            if loads
            else ""
        )
        + "."
    )
    L.append(
        f"- Planned time of the whole study on a free machine: {fmt_min(estimate_wall(s, plan))}"
        + (f" (limit of the {p.name} protocol: {p.budget_min:g} min)." if p.budget_min else ".")
    )
    L.extend(speed_lines(run_records, by_name, wall_clock))
    L.append("")
    from crossdistill.files import write_text_atomic

    write_text_atomic(md_path, "\n".join(L) + "\n" + kept_blocks(md_path), hint="the results page")
    return md_path


def speed_lines(records: Sequence[dict[str, Any]], by_name: dict[str, Run], wall_clock: float) -> list[str]:
    """How much slower (or faster) than the plan's calibration this machine ran the runs, as ratios: the median of
    measured / estimated seconds over the runs trained from the start, overall and per method."""
    fresh = [r for r in records if not r.get("resumed") and r.get("est_s") and r["run"] in by_name]
    if not fresh:
        return []
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in fresh:
        run = by_name[r["run"]]
        label = "teachers" if run.part == "teachers" else METHOD_LABELS.get(run.method, run.method)
        groups.setdefault(label, []).append(r)
    wall = statistics.median(r["seconds"] / r["est_s"] for r in fresh)
    cpu = [r["cpu_s"] / r["est_s"] for r in fresh if r.get("cpu_s")]
    per_method = ", ".join(
        f"{label} {statistics.median(r.get('cpu_s', r['seconds']) / r['est_s'] for r in rs):.2f}"
        for label, rs in groups.items()
    )
    return [
        f"- Against the speeds the plan is calibrated with (`study_protocols.SPEEDS`): the runs took {wall:.2f} x their"
        f" estimate on this machine (median over the {len(fresh)} runs trained from the start"
        + (f"; CPU time {statistics.median(cpu):.2f} x" if cpu else "")
        + f"); CPU time / estimate by method: {per_method}. At the calibration's speed the wall-clock time above "
        f"is {fmt_min(wall_clock / wall)}."
    ]


KEPT_BLOCKS = re.compile(r"<!-- (demo-seeds|equal-budget):start -->.*?<!-- \1:end -->", re.S)
"""Sections other benchmarks write into the same page (benchmarks/demo_seeds.py, equal_budget.py): kept when the study
rewrites it."""
LEADING_BLOCK = re.compile(r"<!-- takeaways:start -->.*?<!-- takeaways:end -->", re.S)
"""What a reader should take away, written by hand from all the studies: kept under the title when the study rewrites
the page."""


def kept_blocks(md_path: Path) -> str:
    if not md_path.is_file():
        return ""
    return "".join("\n" + m.group(0) + "\n" for m in KEPT_BLOCKS.finditer(md_path.read_text()))


def leading_block(md_path: Path) -> str:
    found = LEADING_BLOCK.search(md_path.read_text()) if md_path.is_file() else None
    return found.group(0) if found else ""


def findings(p: Protocol, plan: Sequence[Run], methods: Sequence[str], teacher_acc: dict[str, float]) -> list[str]:
    lines: list[str] = []
    if not p.results:
        lines.append("Nothing: this is a smoke test.")
        return lines
    first_counts: dict[str, int] = {}
    complete = True
    for pair in p.pairs:
        stats = {m: cell_stats(plan, pair, m, p.seeds, "last_top1") for m in methods}
        have = {m: v for m, v in stats.items() if v[2] and math.isfinite(v[0])}
        if len(have) < len(methods) or any(v[2] < len(p.seeds) for v in have.values()):
            complete = False
        if not have:
            lines.append(f"- **{PAIR_LABELS.get(pair, pair)}**: no finished runs yet.")
            continue
        order = sorted(have, key=lambda m: have[m][0], reverse=True)
        first = order[0]
        first_counts[first] = first_counts.get(first, 0) + 1
        text = (
            f"- **{PAIR_LABELS.get(pair, pair)}**: first {METHOD_LABELS.get(first, first)} "
            f"({_pm(have[first])}); order " + " > ".join(METHOD_LABELS.get(m, m) for m in order) + "."
        )
        if "rsd" in have:
            rsd = have["rsd"]
            others = [m for m in order if m not in ("rsd", "vanilla")]
            if others:
                best_other = others[0]
                bo = have[best_other]
                delta = rsd[0] - bo[0]
                spread = math.sqrt((rsd[1] or 0.0) ** 2 + (bo[1] or 0.0) ** 2)
                verdict = "within the seed-to-seed spread" if abs(delta) <= spread else "beyond the seed-to-seed spread"
                text += (
                    f" RSD ranks {order.index('rsd') + 1} of {len(order)}: {rsd[0]:.2f} vs "
                    f"{METHOD_LABELS.get(best_other, best_other)} {bo[0]:.2f}, "
                    f"{'+' if delta >= 0 else ''}{delta:.2f} points ({verdict}, "
                    f"sqrt(std² + std²) = {spread:.2f})."
                )
            if "vanilla" in have:
                gain = rsd[0] - have["vanilla"][0]
                text += f" RSD vs scratch: {'+' if gain >= 0 else ''}{gain:.2f} points."
        lines.append(text)
    if first_counts:
        summary = ", ".join(
            f"{METHOD_LABELS.get(m, m)} in {n}" for m, n in sorted(first_counts.items(), key=lambda kv: -kv[1])
        )
        lines.append(
            f"- First place by pair: {summary} of {len(p.pairs)} pair(s)."
            + ("" if complete else " (The table is incomplete: these rankings are provisional.)")
        )
        rsd_first = first_counts.get("rsd", 0)
        if rsd_first < len(p.pairs):
            lines.append(
                f"- **RSD does not come first in {len(p.pairs) - rsd_first} of {len(p.pairs)} pairs at this "
                "scale.** The protocol was fixed before the runs and has not been tuned afterwards; the "
                "section below lists what differs from the paper's setting."
            )
        else:
            lines.append("- RSD comes first in every pair at this scale.")
    # teacher vs scratch students
    for pair in p.pairs:
        t, st = PAIRS[pair]
        tacc = teacher_acc.get(t)
        scratch = (
            cell_stats(plan, pair, "vanilla", p.seeds, "last_top1") if "vanilla" in methods else (math.nan, None, 0)
        )
        if tacc is None or not scratch[2]:
            continue
        if tacc > scratch[0]:
            lines.append(
                f"- Teacher check, {PAIR_LABELS.get(pair, pair)}: the teacher ({tacc:.2f}) is more accurate "
                f"than the scratch student ({scratch[0]:.2f})."
            )
        else:
            lines.append(
                f"- **Teacher check, {PAIR_LABELS.get(pair, pair)}: the teacher ({tacc:.2f}) is NOT more "
                f"accurate than the student trained from scratch ({scratch[0]:.2f}).** "
                + (
                    "A ViT trained from scratch on a few thousand 32 px images has no locality prior and "
                    "learns more slowly than a CNN; the paper's teachers are pre-trained on ImageNet. "
                    if MODELS[t].family != "cnn"
                    else "The teacher's schedule is too short for its width at this scale. "
                )
                + "Distilling from a weaker teacher is part of what this pair measures."
            )
    return lines
