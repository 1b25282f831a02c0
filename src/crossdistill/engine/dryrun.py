"""``crossdistill train --dry-run``: check a recipe before launching it (no data, no weights, no run directory)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import torch

from ..config import RunConfig
from ..data import CLASS_COUNTS
from ..distillers import METHODS
from ..errors import CrossDistillError
from .setup import build_models, check_run_config, count_parameters
from .teacher_runner import TeacherRunner


def dry_run(cfg: RunConfig, *, batch: int = 4, world_size: int | None = None, out=None) -> dict[str, Any]:
    """Print the resolved config, the effective batch, parameter counts and one step's losses on random data.

    Models are built with random weights (``pretrained``/``checkpoint`` are not loaded) and the
    dataset is not opened: ``num_classes`` comes from the config, or from the built-in dataset's known count.
    """
    out = out if out is not None else sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    args = check_run_config(cfg)
    if cfg.num_classes is None:
        if cfg.data.dataset not in CLASS_COUNTS:
            raise CrossDistillError(
                "--dry-run does not open the dataset: set num_classes in the config "
                "(the number of class directories, e.g. num_classes=100)"
            )
        cfg = dataclasses.replace(cfg, num_classes=CLASS_COUNTS[cfg.data.dataset])
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    say("# resolved config")
    say(cfg.to_yaml().rstrip())
    method_cls = METHODS.get(cfg.method)
    if getattr(args, "img_size", "absent") is None:
        args = dataclasses.replace(args, img_size=cfg.data.img_size)
    distiller = build_models(cfg, args, cfg.num_classes, load_weights=False)  # each model at the size it takes
    student, teacher = distiller.student, distiller.teacher

    effective = cfg.train.batch_size * world
    say("\n# run")
    say(
        f"method {cfg.method}: {cfg.teacher.name if teacher else '-'} -> {cfg.student.name}, "
        f"{cfg.num_classes} classes, "
        f"{cfg.data.img_size} px"
    )
    say(
        f"per-process batch {cfg.train.batch_size} x {world} process(es) = effective batch {effective}"
        + (f" (recipe reference {cfg.train.reference_batch})" if cfg.train.reference_batch else "")
    )
    if cfg.train.reference_batch and cfg.train.reference_batch != effective and cfg.optim.scale_lr == "none":
        say(
            f"warning: the effective batch differs from the reference {cfg.train.reference_batch}; run on "
            f"{cfg.train.reference_batch // cfg.train.batch_size} processes or pass optim.scale_lr=linear"
        )
    counts = {
        "student_parameters": count_parameters(student),
        "extra_trainable_parameters": distiller.extra_parameter_count(),
        "teacher_parameters": count_parameters(teacher.model) if teacher is not None else 0,
    }
    say(
        f"student {counts['student_parameters'] / 1e6:.2f}M"
        f" | extra trainable {counts['extra_trainable_parameters'] / 1e6:.3f}M"
        f" | teacher {counts['teacher_parameters'] / 1e6:.2f}M (frozen)"
    )

    batch = max(batch, method_cls.min_batch_size)
    if (cfg.train.mixup > 0 or cfg.train.cutmix > 0) and batch % 2:
        batch += 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        y = torch.nn.functional.one_hot(y, cfg.num_classes).float()
    distiller.train()
    started = time.time()
    output = distiller(x, y, TeacherRunner(distiller).compute(x) if distiller.reads_teacher else None)
    output.loss.backward()
    elapsed = time.time() - started
    losses = {name: float(value.detach()) for name, value in output.losses.items()}
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses.values())):
        raise CrossDistillError(f"the dry-run step gave a non-finite loss: {losses}")
    say(
        f"one step on random data (batch {batch}, CPU, {elapsed:.2f}s): "
        + ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        + f" | total {float(output.loss.detach()):.4g}"
    )
    return {**counts, "effective_batch": effective, "losses": losses, "batch": batch}
