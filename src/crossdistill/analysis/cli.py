"""``crossdistill analyze cka``: CKA maps between a teacher and one or two students.

Where things come from:

* ``RUN_DIR`` (positional, or ``--config RUN_DIR``): the run's teacher (name, kwargs, weights,
  normalisation), its student (name, kwargs; weights: ``best.pt``, or ``--weights last|ema``)
  and its data settings. Flags given as well override these.
* ``--config run.yaml``: teacher, student name and data from a run config; pass
  ``--student-checkpoint``.
* neither: ``--teacher NAME --teacher-checkpoint FILE --student-checkpoint FILE``; data settings
  are taken from the run config recorded in the student checkpoint (crossdistill checkpoints
  carry one), ``--data/--data-root/--img-size`` adjust them.

``--compare-checkpoint`` adds a second student (e.g. the from-scratch student next to the
distilled one): both maps are drawn side by side with their difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..checkpoint import load_weights_file
from ..config import DataConfig, ModelConfig, RunConfig, from_dict, load_config
from ..data import balanced_subset, build_data
from ..engine.distributed import resolve_device
from ..engine.setup import create_teacher, student_data_config
from ..errors import CrossDistillError
from ..models import Teacher, create_model, load_model_weights
from ..plots import require_matplotlib
from .cka import POOLS, LayerSet, as_mapping, collect_cka, format_table, plot_cka, summary_lines, write_csv

# ---------------------------------------------------------------- resolving models and data


def _load_source(path: str | None):
    """(run config or None, run directory or None) from --config / RUN_DIR."""
    if path is None:
        return None, None
    p = Path(path)
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise CrossDistillError(
                f"{p} is not a crossdistill run directory (no config.yaml); pass a run directory or a run config YAML"
            )
        return load_config(p / "config.yaml"), p
    if not p.is_file():
        raise CrossDistillError(f"{p} does not exist; pass a run directory or a run config YAML")
    return load_config(p), None


def _recorded_config(loaded: dict[str, Any]):
    raw = loaded.get("config")
    if not isinstance(raw, dict):
        return None
    try:
        return from_dict(RunConfig, raw)
    except CrossDistillError:
        return None


def _student_checkpoint(run_dir: Path, weights: str) -> tuple[Path, bool]:
    if weights == "best":
        return run_dir / "best.pt", False
    return run_dir / "last.pt", weights == "ema"


def _model_config(name: str | None, checkpoint_cfg, run_model_cfg, what: str):
    """ModelConfig for a student-like model: name and kwargs from the flag, the run or the checkpoint."""
    for source in (run_model_cfg, checkpoint_cfg.student if checkpoint_cfg is not None else None):
        if source is not None and (name is None or name == source.name):
            return ModelConfig(name=source.name, kwargs=dict(source.kwargs))
    if name is None:
        raise CrossDistillError(f"the {what} model is unknown: pass its timm name (--{what} NAME)")
    return ModelConfig(name=name)


def _label(loaded: dict[str, Any], fallback: str) -> str:
    cfg = loaded.get("config")
    if isinstance(cfg, dict) and cfg.get("method"):
        return str(cfg["method"])
    return fallback


def _frozen_student(
    path: Path, model_cfg, num_classes: int, use_ema: bool, loaded: dict[str, Any], data, img_size: int
):
    net = create_model(model_cfg, num_classes, img_size)
    load_model_weights(net, path, use_ema=use_ema, num_classes=num_classes, loaded=loaded)
    recorded = loaded.get("normalization")
    mean, std = data.mean, data.std
    if isinstance(recorded, dict) and "mean" in recorded:
        mean, std = tuple(recorded["mean"]), tuple(recorded["std"])
    # a wrapper that keeps the model frozen and maps the data's normalisation to the model's
    return Teacher(net, data_mean=data.mean, data_std=data.std, model_mean=mean, model_std=std)


def run_cka(
    run: str | None = None,
    *,
    teacher: str | None = None,
    teacher_checkpoint: str | None = None,
    student: str | None = None,
    student_checkpoint: str | None = None,
    compare_checkpoint: str | None = None,
    weights: str = "best",
    labels: tuple[str | None, str | None] = (None, None),
    samples: int = 512,
    batch_size: int = 64,
    split: str = "eval",
    pool: str = "mean",
    estimator: str = "full",
    dataset: str | None = None,
    data_root: str | None = None,
    img_size: int | None = None,
    device: str = "auto",
    out: str | Path | None = None,
    name: str = "cka",
    stream=None,
):
    """Compute, print and write (``OUT/NAME.csv``, ``OUT/NAME.png``) the CKA maps; returns the CKAResult."""
    from torch.utils.data import DataLoader

    stream = stream if stream is not None else sys.stdout
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    require_matplotlib()  # fail before the (slow) feature pass, not after it
    if pool not in POOLS:
        raise CrossDistillError(f"unknown --pool {pool!r}; choose from {', '.join(POOLS)}")
    if samples < 4:
        raise CrossDistillError(f"--samples must be at least 4, got {samples}")
    if weights not in ("best", "last", "ema"):
        raise CrossDistillError(f"unknown --weights {weights!r}; choose best, last or ema")
    run_cfg, run_dir = _load_source(run)

    # --- student (the distilled one) and its weights
    use_ema = False
    if student_checkpoint is None:
        if run_dir is None:
            raise CrossDistillError(
                "analyze cka needs the student's weights: --student-checkpoint FILE, or a run "
                "directory (positional RUN_DIR or --config RUN_DIR)"
            )
        path, use_ema = _student_checkpoint(run_dir, weights)
        if not path.is_file():
            raise CrossDistillError(f"{run_dir} has no {path.name}; train the run first or pass --weights")
    else:
        path, use_ema = Path(student_checkpoint), weights == "ema"
    loaded = load_weights_file(path)
    ckpt_cfg = _recorded_config(loaded)
    student_cfg = _model_config(student, ckpt_cfg, run_cfg.student if run_cfg else None, "student")

    # --- teacher
    teacher_cfg = None
    if run_cfg is not None and run_cfg.teacher is not None and teacher in (None, run_cfg.teacher.name):
        teacher_cfg = run_cfg.teacher
    elif ckpt_cfg is not None and ckpt_cfg.teacher is not None and teacher in (None, ckpt_cfg.teacher.name):
        teacher_cfg = ckpt_cfg.teacher
    elif teacher is not None:
        teacher_cfg = ModelConfig(name=teacher)
    if teacher_cfg is None:
        raise CrossDistillError(
            "analyze cka needs a teacher: --teacher NAME --teacher-checkpoint FILE, or a run "
            "directory / config of a distillation run"
        )
    if teacher_checkpoint is not None:
        teacher_cfg = dataclasses.replace(teacher_cfg, checkpoint=str(teacher_checkpoint), pretrained=False)
        if not teacher_cfg.kwargs:
            teacher_recorded = _recorded_config(load_weights_file(teacher_checkpoint))
            if teacher_recorded is not None and teacher_recorded.student.name == teacher_cfg.name:
                teacher_cfg = dataclasses.replace(teacher_cfg, kwargs=dict(teacher_recorded.student.kwargs))

    # --- data: the run's (or the checkpoint's recorded run's), with the checkpoint's normalisation
    data_cfg = run_cfg.data if run_cfg else (ckpt_cfg.data if ckpt_cfg else DataConfig())
    changes = {k: v for k, v in (("dataset", dataset), ("root", data_root), ("img_size", img_size)) if v is not None}
    recorded = loaded.get("normalization")
    if isinstance(recorded, dict) and "mean" in recorded and data_cfg.mean is None:
        changes.update(mean=tuple(recorded["mean"]), std=tuple(recorded["std"]))
    data_cfg = dataclasses.replace(data_cfg, train_subset=None, eval_subset=None, **changes)
    data = build_data(data_cfg, student_data_config(ModelConfig(name=student_cfg.name)))
    if split not in ("eval", "train"):
        raise CrossDistillError(f"unknown --split {split!r}; choose eval or train")
    pool_ds = data.eval if split == "eval" else data.train
    n = min(samples, len(pool_ds))
    if n < samples:
        say(
            f"note: the {split} split of {data_cfg.dataset} has {len(pool_ds)} images; using all of them "
            f"(asked for {samples})"
        )
    subset = pool_ds.select(balanced_subset(pool_ds.targets, n, seed=0, what="--samples"))
    subset.transform = data.eval.transform  # eval transforms for either split: no augmentation in an analysis
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=data_cfg.num_workers)

    if not (teacher_cfg.checkpoint or teacher_cfg.pretrained):
        say(
            "warning: the teacher has no checkpoint and no pretrained weights: it is randomly initialised, so its "
            "CKA map says nothing about what was learnt (pass --teacher-checkpoint)"
        )
    dev = resolve_device(device)
    teacher_model = create_teacher(teacher_cfg, data.num_classes, data.mean, data.std, data_cfg.img_size)
    teacher_model.to(dev)

    # --- students
    first_label = labels[0] or _label(loaded, "student")
    students = [
        LayerSet.of(
            first_label,
            student_cfg.name,
            _frozen_student(path, student_cfg, data.num_classes, use_ema, loaded, data, data_cfg.img_size).to(dev),
        )
    ]
    compare_path = None
    if compare_checkpoint is not None:
        compare_path = Path(compare_checkpoint)
        compare_loaded = load_weights_file(compare_path)
        compare_recorded = _recorded_config(compare_loaded)
        compare_cfg = (
            _model_config(None, compare_recorded, None, "student") if compare_recorded is not None else student_cfg
        )  # a plain weights file: the same architecture as the student
        second = labels[1] or _label(compare_loaded, "compare")
        if second == first_label:
            first_label, second = f"{first_label} ({path.parent.name})", f"{second} ({compare_path.parent.name})"
            if first_label == second:
                first_label, second = "student", "compare"
            students[0].label = first_label
        students.append(
            LayerSet.of(
                second,
                compare_cfg.name,
                _frozen_student(
                    compare_path, compare_cfg, data.num_classes, False, compare_loaded, data, data_cfg.img_size
                ).to(dev),
            )
        )
    teacher_layers = LayerSet.of("teacher", teacher_cfg.name, teacher_model)

    say(
        f"CKA: teacher {teacher_cfg.name} vs "
        + " and ".join(f"{s.label} ({s.model_name})" for s in students)
        + f" on {n} {split} images of {data_cfg.dataset} ({estimator} linear CKA, features {pool}-pooled)"
    )
    result = collect_cka(
        teacher_layers, students, (images for images, _ in loader), estimator=estimator, pool=pool, device=dev
    )
    result.extra.update(
        teacher_checkpoint=teacher_cfg.checkpoint,
        student_checkpoint=str(path),
        compare_checkpoint=str(compare_path) if compare_path else None,
        dataset=data_cfg.dataset,
        split=split,
    )

    out_dir = Path(out) if out is not None else (run_dir / "analysis" if run_dir is not None else Path("cka"))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"{name}.csv", out_dir / f"{name}.png"
    write_csv(result, str(csv_path))
    plot_cka(result, str(png_path))
    say(format_table(result))
    for line in summary_lines(result):
        say(line)
    say(f"wrote {csv_path} and {png_path}")
    result.extra.update(csv=str(csv_path), png=str(png_path))
    return result


# ---------------------------------------------------------------- command line


def _cmd_cka(args: argparse.Namespace) -> int:
    if args.run_dir and args.config and Path(args.run_dir).resolve() != Path(args.config).resolve():
        raise CrossDistillError("give the run either as RUN_DIR or as --config, not two different ones")
    result = run_cka(
        args.run_dir or args.config,
        teacher=args.teacher,
        teacher_checkpoint=args.teacher_checkpoint,
        student=args.student,
        student_checkpoint=args.student_checkpoint,
        compare_checkpoint=args.compare_checkpoint,
        weights=args.weights,
        labels=(args.label, args.compare_label),
        samples=args.samples,
        batch_size=args.batch_size,
        split=args.split,
        pool=args.pool,
        estimator=args.estimator,
        dataset=args.data,
        data_root=args.data_root,
        img_size=args.img_size,
        device=args.device,
        out=args.out,
        name=args.name,
        stream=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps({**as_mapping(result), **result.extra}, indent=2))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="analyses of trained models (cka)", description="Analyses of trained teachers and students."
    )
    sub = p.add_subparsers(dest="analysis", required=True, metavar="{cka}")
    c = sub.add_parser(
        "cka",
        help="linear CKA between teacher and student layers (heat map PNG + CSV)",
        description="Linear CKA between the teacher's default stages + pre-logits embedding and the student's, "
        "on a sample of the data; with --compare-checkpoint, two students side by side and their "
        "difference. Stage features are mean-pooled over positions (--pool flatten keeps them whole).",
    )
    c.add_argument(
        "run_dir",
        nargs="?",
        default=None,
        metavar="RUN_DIR",
        help="a distillation run directory: teacher, student, weights and data from the run",
    )
    c.add_argument("--config", default=None, help="a run config YAML, or a run directory (same as RUN_DIR)")
    c.add_argument("--teacher", default=None, help="teacher timm name (default: the run's)")
    c.add_argument("--teacher-checkpoint", default=None, help="teacher weights (default: the run's teacher.checkpoint)")
    c.add_argument("--student", default=None, help="student timm name (default: the run's / the checkpoint's)")
    c.add_argument("--student-checkpoint", default=None, help="student weights (default: RUN_DIR/best.pt)")
    c.add_argument(
        "--compare-checkpoint",
        default=None,
        help="a second student checkpoint (e.g. the scratch student) drawn beside the first",
    )
    c.add_argument(
        "--weights",
        default="best",
        choices=("best", "last", "ema"),
        help="with RUN_DIR: best.pt, last.pt or the EMA in last.pt (with --student-checkpoint: ema "
        "takes that file's EMA weights)",
    )
    c.add_argument("--label", default=None, help="name of the student in the figure (default: its method)")
    c.add_argument("--compare-label", default=None, help="name of the compared student (default: its method)")
    c.add_argument("--samples", type=int, default=512, help="images to compute CKA on (class-balanced, fixed)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--split", default="eval", choices=("eval", "train"), help="which split to sample (eval transforms)")
    c.add_argument(
        "--pool",
        default="mean",
        choices=("mean", "flatten"),
        help="stage features per sample: mean over positions (default) or flattened",
    )
    c.add_argument(
        "--estimator",
        default="full",
        choices=("full", "minibatch"),
        help="full: exact linear CKA on all samples; minibatch: unbiased-HSIC minibatch CKA (Nguyen et al. "
        "2021), nothing stored, for large --samples",
    )
    c.add_argument("--data", default=None, help="dataset override: digits, cifar10, cifar100, folder")
    c.add_argument("--data-root", default=None)
    c.add_argument("--img-size", type=int, default=None)
    c.add_argument("--device", default="auto")
    c.add_argument("--out", default=None, help="output directory (default: RUN_DIR/analysis, else ./cka)")
    c.add_argument("--name", default="cka", help="file stem of the CSV and PNG (default cka)")
    c.add_argument("--json", action="store_true", help="print the maps as JSON (log lines go to stderr)")
    c.set_defaults(func=_cmd_cka)
    return p
