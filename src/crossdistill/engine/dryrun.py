"""``crossdistill train --dry-run``: every check a run makes before its first step, with the run's own code,
without writing anything (no run directory, no lock, no download, no decoded archive, no teacher cache)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, TypeVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config import RunConfig, with_absolute_paths
from ..data import CLASS_COUNTS, opening_writes
from ..distillers import METHODS
from ..errors import CrossDistillError, one_line
from .claim import preview_run_dir, run_dir_of
from .loaders import build_train_loader
from .setup import (
    batch_warning,
    build_models,
    build_scheduler,
    check_run_inputs,
    count_parameters,
    describe_batch,
    describe_lr,
    lr_plan,
    make_mixup,
    open_data,
    optimizer_steps_per_epoch,
    training_targets,
    untrained_teacher_warning,
    warmup_warning,
    weights_source,
)
from .step import build_train_step

T = TypeVar("T")


class _Checks:
    """The problems found so far: a run would stop at the first; the dry run lists them all."""

    def __init__(self, say: Callable[[str], None]):
        self.say, self.problems = say, []

    def run(self, what: Callable[[], T]) -> T | None:
        try:
            return what()
        except CrossDistillError as err:
            self.problems.append(one_line(err))
            self.say(f"problem: {one_line(err)}")
            return None

    def verdict(self) -> None:
        if self.problems:
            more = len(self.problems) - 1
            raise CrossDistillError(self.problems[0] + (f" (and {more} more problem(s) listed above)" if more else ""))


def dry_run(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    batch: int = 4,
    world_size: int | None = None,
    out=None,
) -> dict[str, Any]:
    """Check ``cfg`` as a run would before its first step, and print what the run would use.

    The same functions as the run check the config and the method's arguments, judge the run directory
    (printed, with what ``resume`` / ``overwrite`` would do there), open the data, build the models and load
    their weights (``checkpoint``: missing, unreadable, of other classes...), plan the learning rate
    (after ``optim.scale_lr``) and schedule, and take one optimiser step on a tiny random batch on the CPU.
    Nothing is written: data that a run would download or decode first is not opened, ``pretrained``
    weights are not downloaded (random ones stand in), and the run directory is only looked at.
    Problems are listed as they are found; the first is raised at the end (a run would stop there).
    """
    out = out if out is not None else sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    method_args = check_run_inputs(cfg)  # a config error is one line before anything is printed
    cfg = with_absolute_paths(cfg)
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    checks = _Checks(say)
    say("# resolved config")
    say(cfg.to_yaml().rstrip())
    say("\n# run")
    run_dir = os.path.abspath(run_dir_of(cfg))
    state = checks.run(lambda: preview_run_dir(cfg, resume, overwrite))
    say(f"run directory: {run_dir}" + (f" ({state})" if state else ""))

    data, num_classes = None, cfg.num_classes
    not_opened = opening_writes(cfg.data)
    if not_opened:
        say(f"data: {not_opened}; not opened by --dry-run")
    else:
        opened = checks.run(lambda: open_data(cfg, world))
        if opened is not None:
            data, num_classes = opened
            say(
                f"data: {cfg.data.dataset}, {len(data.train)} train / {len(data.eval)} eval images, "
                f"{num_classes} classes"
                + (
                    f"; evaluated on the val split ({cfg.data.val_fraction:g} of {cfg.data.train_split}, val_seed "
                    f"{cfg.data.val_seed}), not {cfg.data.eval_split}"
                    if cfg.data.val_fraction is not None
                    else ""
                )
            )
    if num_classes is None:
        num_classes = CLASS_COUNTS.get(cfg.data.dataset)
    if num_classes is None:
        if not_opened:
            checks.run(_raise("set num_classes in the config for --dry-run, which leaves the dataset unopened"))
        checks.verdict()  # no class count, no models: a run would have stopped at the data

    mean, std = (data.mean, data.std) if data is not None else _data_stats(cfg)
    distiller = checks.run(lambda: build_models(cfg, method_args, num_classes, mean, std, download=False))
    loaded = distiller is not None
    if distiller is None:  # the weights did not load: check the rest with random ones
        distiller = checks.run(lambda: build_models(cfg, method_args, num_classes, mean, std, load_weights=False))
    if distiller is None:
        checks.verdict()  # the models cannot be built: a run would have stopped here
    teacher = distiller.teacher
    say(
        f"method {cfg.method}: {cfg.teacher.name if teacher is not None else '-'} -> {cfg.student.name}, "
        f"{num_classes} classes, {cfg.data.img_size} px"
    )
    for role in ("student", "teacher"):
        model = getattr(cfg, role)
        if model is not None and (role == "student" or teacher is not None):
            say(f"{role} weights: {_weights(model, loaded)}")
    warning = untrained_teacher_warning(cfg, distiller)
    if warning:
        say(warning)
    counts = {
        "student_parameters": count_parameters(distiller.student),
        "extra_trainable_parameters": distiller.extra_parameter_count(),
        "teacher_parameters": count_parameters(teacher.model) if teacher is not None else 0,
    }
    say(
        f"student {counts['student_parameters'] / 1e6:.2f}M"
        f" | extra trainable {counts['extra_trainable_parameters'] / 1e6:.3f}M"
        f" | teacher {counts['teacher_parameters'] / 1e6:.2f}M (frozen)"
    )

    plan = lr_plan(cfg, world)
    reference = cfg.train.reference_batch
    say(describe_batch(cfg.train, world) + (f" (recipe reference {reference})" if reference else ""))
    for warning in (batch_warning(cfg, world), warmup_warning(cfg, plan)):
        if warning:
            say(warning)
    steps_per_epoch = None
    if data is not None:
        loader = build_train_loader(
            data.train, seed=cfg.train.seed, batch_size=cfg.train.batch_size, num_workers=0, world_size=world
        )[3]
        steps_per_epoch = optimizer_steps_per_epoch(len(loader), cfg.train)
    say(
        describe_lr(cfg, plan)
        + (f" | {steps_per_epoch} steps/epoch" if steps_per_epoch else "")
        + f" x {cfg.train.epochs} epochs"
    )
    if cfg.train.teacher_cache and distiller.reads_teacher:
        say(f"teacher cache: {cfg.train.teacher_cache} (not opened by --dry-run)")

    if distiller.needs_indices:  # state keyed by training sample: the training set's classes, or stand-ins
        targets = [i % max(num_classes, 2) for i in range(2 * batch + 2)]
        if data is not None:
            targets = checks.run(lambda: training_targets(data.train, cfg.method))
        if targets is None or checks.run(lambda: distiller.bind_training_set(targets, cfg.train.seed) or True) is None:
            checks.verdict()  # a run would have stopped here

    # one optimiser step as the run takes it, on the CPU in fp32 (no torch.compile)
    on_cpu = dataclasses.replace(cfg.train, amp="none", compile=False)
    step = build_train_step(distiller, on_cpu, cfg.optim, torch.device("cpu"), lr=plan.lr)
    checks.run(lambda: build_scheduler(step.optimizer, cfg, plan, steps_per_epoch or 1))
    batch = max(batch, METHODS.get(cfg.method).min_batch_size)
    mixup = make_mixup(cfg.train, num_classes)
    if mixup is not None and batch % 2:
        batch += 1
    gen = torch.Generator().manual_seed(0)
    x, y = step.to_device(
        torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size, generator=gen),
        torch.randint(0, num_classes, (batch,), generator=gen),
    )
    if mixup is not None:
        x, y = mixup(x, y)
    distiller.train()
    started = time.time()
    result = step(x, y, torch.arange(batch) if distiller.needs_indices else None, tag=(0, 0))
    elapsed = time.time() - started
    losses = {name: float(value.detach()) for name, value in result.output.losses.items()}
    if not result.finite or not all(map(lambda v: v == v and abs(v) != float("inf"), losses.values())):
        checks.run(_raise(f"the dry-run step gave a non-finite loss or gradient: {losses}"))
    say(
        f"one step on random data (batch {batch}, CPU, fp32, {elapsed:.2f}s): "
        + ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        + f" | total {float(result.loss.detach()):.4g}"
    )
    checks.verdict()
    return {
        **counts,
        "run_dir": run_dir,
        "effective_batch": plan.effective_batch,
        "lr": plan.lr,
        "losses": losses,
        "batch": batch,
    }


def _raise(message: str) -> Callable[[], None]:
    def fail() -> None:
        raise CrossDistillError(message)

    return fail


def _data_stats(cfg: RunConfig) -> tuple[Any, Any]:
    """The data's normalisation when it was not opened (only the teacher's re-normalisation depends on it)."""
    return cfg.data.mean or IMAGENET_DEFAULT_MEAN, cfg.data.std or IMAGENET_DEFAULT_STD


def _weights(model, loaded: bool) -> str:
    if model.checkpoint:
        return weights_source(model) + (" loaded" if loaded else " not loaded (see the problem above)")
    if model.pretrained:
        return "pretrained (timm): not downloaded by --dry-run, random weights stand in"
    return weights_source(model)
