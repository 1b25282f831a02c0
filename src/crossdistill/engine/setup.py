"""Build everything a run needs from its config: data, models, distiller."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from ..checkpoint import load_weights_file
from ..config import ModelConfig, RunConfig, TrainConfig
from ..data import DataBundle, build_data
from ..data.device_augment import check_device_augment
from ..distillers import METHODS, Distiller, MethodConfig, build_distiller, method_config
from ..errors import CrossDistillError
from ..models import Teacher, check_model_name, create_model
from ..models.factory import load_model_weights
from .logs import check_trackers


def check_run_config(cfg: RunConfig) -> MethodConfig:
    """The checks of a run config that config.py cannot make (it knows no methods and no data pipeline):
    the method's arguments (returns its typed config), the options device augmentation cannot apply, and
    that the libraries of ``train.trackers`` are installed.
    Every run calls this before it builds or writes anything."""
    check_device_augment(cfg.data)
    check_trackers(cfg.train.trackers)
    return method_config(cfg.method, cfg.method_args, teacher=cfg.teacher)


def student_data_config(cfg: ModelConfig) -> dict[str, Any]:
    """The student's timm data config (input size, mean/std, crop_pct, interpolation) without building it."""
    check_model_name(cfg.name)
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    return resolve_data_config({}, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})


def resolve_num_classes(cfg: RunConfig, data: DataBundle) -> int:
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise CrossDistillError(
            f"num_classes is {cfg.num_classes} but the dataset {cfg.data.dataset!r} has {data.num_classes} classes"
        )
    return data.num_classes


def create_teacher(cfg: ModelConfig, num_classes: int, data_mean, data_std) -> Teacher:
    """Build and load the teacher, and work out which input normalisation it expects.

    Precedence: ``teacher.mean/std`` from the config; the normalisation recorded in a
    crossdistill checkpoint; timm's pretrained config when ``pretrained: true``;
    otherwise the data's own (what the official code feeds its teachers).
    """
    model = create_model(dataclasses.replace(cfg, checkpoint=None), num_classes)
    mean, std = data_mean, data_std
    if cfg.checkpoint:
        loaded = load_weights_file(cfg.checkpoint)
        load_model_weights(model, cfg.checkpoint, use_ema=cfg.checkpoint_ema, num_classes=num_classes, loaded=loaded)
        recorded = loaded.get("normalization")
        if isinstance(recorded, dict) and "mean" in recorded:
            mean, std = tuple(recorded["mean"]), tuple(recorded["std"])
    elif cfg.pretrained:
        mean, std = model.pretrained_cfg.get("mean", mean), model.pretrained_cfg.get("std", std)
    if cfg.mean is not None:
        mean = cfg.mean
    if cfg.std is not None:
        std = cfg.std
    return Teacher(model, data_mean=data_mean, data_std=data_std, model_mean=mean, model_std=std)


def make_criterion(cfg: RunConfig) -> nn.Module:
    if cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


@dataclass
class Built:
    data: DataBundle
    num_classes: int
    distiller: Distiller


def check_run_inputs(cfg: RunConfig) -> MethodConfig:
    """Everything about ``cfg`` a run checks before it opens data or builds a model (with
    :func:`check_run_config`: batch sizes the method and mixup need, model names); returns the method's
    typed arguments, completed with the run's input size where the method probes feature shapes."""
    method_cls = METHODS.get(cfg.method)
    method_args = check_run_config(cfg)
    if getattr(method_args, "img_size", "absent") is None:  # methods that probe feature shapes
        method_args = dataclasses.replace(method_args, img_size=cfg.data.img_size)
    if cfg.train.batch_size < method_cls.min_batch_size:
        raise CrossDistillError(
            f"method {cfg.method!r} needs at least {method_cls.min_batch_size} samples per batch and process "
            f"(its loss uses batch statistics); train.batch_size is {cfg.train.batch_size}"
        )
    if (cfg.train.mixup > 0 or cfg.train.cutmix > 0) and cfg.train.batch_size % 2:
        raise CrossDistillError("mixup/cutmix need an even train.batch_size")
    check_model_name(cfg.student.name)
    if cfg.teacher is not None:
        check_model_name(cfg.teacher.name)
    return method_args


def open_data(cfg: RunConfig, world_size: int) -> tuple[DataBundle, int]:
    """The run's datasets and class count, checked against the config and the effective batch."""
    data = build_data(cfg.data, student_data_config(cfg.student))
    num_classes = resolve_num_classes(cfg, data)
    global_batch = cfg.train.batch_size * world_size
    if len(data.train) < global_batch:
        raise CrossDistillError(
            f"the training set has {len(data.train)} images, fewer than one batch "
            f"({cfg.train.batch_size} x {world_size} processes = {global_batch}); lower train.batch_size"
        )
    return data, num_classes


def build_models(cfg: RunConfig, method_args: MethodConfig, num_classes: int, data_mean, data_std) -> Distiller:
    """Student and teacher (their weights loaded and checked) in the method's distiller."""
    student = create_model(cfg.student, num_classes)
    teacher = None
    if cfg.teacher is not None and METHODS.get(cfg.method).needs_teacher:
        teacher = create_teacher(cfg.teacher, num_classes, data_mean, data_std)
    return build_distiller(cfg.method, student, teacher, method_args, criterion=make_criterion(cfg))


def build_run(cfg: RunConfig, world_size: int = 1) -> Built:
    """Data, student, teacher and distiller for ``cfg`` (on CPU), with the input checks a run needs."""
    method_args = check_run_inputs(cfg)
    data, num_classes = open_data(cfg, world_size)
    distiller = build_models(cfg, method_args, num_classes, data.mean, data.std)
    return Built(data=data, num_classes=num_classes, distiller=distiller)


def untrained_teacher_warning(cfg: RunConfig, distiller: Distiller) -> str | None:
    if (
        distiller.teacher is not None
        and cfg.teacher is not None
        and not (cfg.teacher.checkpoint or cfg.teacher.pretrained)
    ):
        return "warning: the teacher has neither checkpoint nor pretrained weights: it is randomly initialised"
    return None


# ---------------------------------------------------------------- batch and learning rate


def effective_batch(train: TrainConfig, world_size: int) -> int:
    """The samples of one optimiser step over all processes (per-process batch x processes x gradient-accumulation
    steps): what ``train.reference_batch`` and ``optim.scale_lr`` compare with."""
    return train.batch_size * world_size * train.grad_accum_steps


def describe_batch(train: TrainConfig, world_size: int) -> str:
    """``per-process batch B x W process(es) [x N accumulation steps] = effective batch E``."""
    accum = f" x {train.grad_accum_steps} accumulation steps" if train.grad_accum_steps > 1 else ""
    return (
        f"per-process batch {train.batch_size} x {world_size} process(es){accum} = "
        f"effective batch {effective_batch(train, world_size)}"
    )


def reach_reference_batch(train: TrainConfig, world_size: int) -> str:
    """How to make the effective batch ``train.reference_batch`` without rescaling the lr: another process
    count (with this accumulation) or another ``train.grad_accum_steps`` (on these processes), where one divides
    evenly; '' where neither does."""
    reference, options = train.reference_batch, []
    processes, rest = divmod(reference, train.batch_size * train.grad_accum_steps)
    if processes and not rest and processes != world_size:
        options.append(f"run on {processes} processes")
    steps, rest = divmod(reference, train.batch_size * world_size)
    if steps and not rest and steps != train.grad_accum_steps:
        options.append(f"set train.grad_accum_steps={steps}")
    return " or ".join(options)


def batch_warning(cfg: RunConfig, world_size: int) -> str | None:
    """The warning for an effective batch other than the recipe's reference with an lr that is not rescaled."""
    reference, batch = cfg.train.reference_batch, effective_batch(cfg.train, world_size)
    if reference is None or reference == batch or cfg.optim.scale_lr != "none":
        return None
    reach = reach_reference_batch(cfg.train, world_size)
    advice = f"{reach} to match it, or pass" if reach else "pass"
    t = cfg.train
    accum = f" x {t.grad_accum_steps} accumulation steps" if t.grad_accum_steps > 1 else ""
    return (
        f"warning: effective batch {batch} ({t.batch_size} per process x {world_size}{accum}) differs from the "
        f"recipe's reference {reference} and the learning rate is not rescaled: {advice} optim.scale_lr=linear "
        f"(lr {cfg.optim.lr:g} -> {cfg.optim.lr * batch / reference:g})."
    )


@dataclass(frozen=True)
class LrPlan:
    """The learning rates a run uses: ``optim``'s, times ``factor`` under ``optim.scale_lr=linear``."""

    effective_batch: int
    factor: float
    lr: float
    min_lr: float
    warmup_lr: float


def lr_plan(cfg: RunConfig, world_size: int) -> LrPlan:
    o, batch = cfg.optim, effective_batch(cfg.train, world_size)
    factor = batch / cfg.train.reference_batch if o.scale_lr == "linear" else 1.0
    return LrPlan(batch, factor, o.lr * factor, o.min_lr * factor, o.warmup_lr * factor)


def describe_lr(cfg: RunConfig, plan: LrPlan) -> str:
    """``lr 0.0125 = 0.1 x 32/256 (sgd, cosine: 3 warm-up epochs from 1.25e-05, down to 1.25e-06)``."""
    o = cfg.optim
    scaled = f" = {o.lr:g} x {plan.effective_batch}/{cfg.train.reference_batch}" if plan.factor != 1 else ""
    schedule = ""
    if o.sched != "none":
        warmup = f"{o.warmup_epochs} warm-up epoch(s) from {plan.warmup_lr:g}, " if o.warmup_epochs else ""
        schedule = f": {warmup}down to {plan.min_lr:g}"
    return f"lr {plan.lr:g}{scaled} ({o.opt}, {o.sched}{schedule})"


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, plan: LrPlan, steps_per_epoch: int):
    """timm's scheduler for ``optim.sched`` (None for ``none``), planned per optimiser update."""
    from timm.scheduler import create_scheduler_v2

    o = cfg.optim
    if o.sched == "none":
        return None
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=o.sched,
            num_epochs=cfg.train.epochs,
            decay_epochs=o.decay_epochs,
            decay_rate=o.decay_rate,
            min_lr=plan.min_lr,
            warmup_lr=plan.warmup_lr,
            warmup_epochs=o.warmup_epochs,
            cooldown_epochs=0,
            updates_per_epoch=steps_per_epoch,
        )
    except (ValueError, AssertionError) as err:
        raise CrossDistillError(f"optim.sched={o.sched!r}: {err}") from None
    if scheduler is None:
        raise CrossDistillError(f"optim.sched={o.sched!r} is not a timm scheduler (cosine, step, ...)")
    return scheduler


def make_mixup(train: TrainConfig, num_classes: int):
    """timm's Mixup for ``train.mixup`` / ``train.cutmix`` (None when both are off)."""
    if train.mixup <= 0 and train.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=train.mixup,
        cutmix_alpha=train.cutmix,
        prob=train.mixup_prob,
        switch_prob=train.mixup_switch_prob,
        label_smoothing=train.label_smoothing,
        num_classes=num_classes,
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.amp on ``device`` (None: full precision)."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise CrossDistillError("train.amp=fp16 needs a CUDA GPU; use bf16 or none on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16
