"""Build everything a run needs from its config: data, models, distiller."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

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
from ..models.factory import check_input_size, default_input_size, fixed_input_size, load_model_weights
from .logs import check_trackers

FINE_TUNE_HINT = (
    "Fine-tune the teacher on this dataset first (README, 'Your own data: fine-tune a teacher, then distil'; "
    "configs/own_data/finetune_teacher.yaml) and distil from its best.pt"
)


def check_run_config(cfg: RunConfig) -> MethodConfig:
    """The checks of a run config that config.py cannot make (it knows no methods and no data pipeline):
    the method's arguments (returns its typed config), the options device augmentation cannot apply, and
    that the libraries of ``train.trackers`` are installed.
    Every run calls this before it builds or writes anything."""
    check_device_augment(cfg.data)
    check_trackers(cfg.train.trackers)
    check_model_kwargs(cfg)
    return method_config(cfg.method, cfg.method_args, teacher=cfg.teacher)


def _square(value: Any) -> int | None:
    """``img_size`` as one int: N, or [N, N]; None for anything else (left to the model to accept)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check_model_kwargs(cfg: RunConfig) -> None:
    """The model kwargs a run sets itself: the classifier's class count, and the student's input size."""
    if "num_classes" in cfg.student.kwargs:
        raise CrossDistillError(
            "student.kwargs.num_classes: the student's classifier always has the run's class count (num_classes, "
            "or the dataset's); drop student.kwargs.num_classes"
        )
    if cfg.teacher is not None and "num_classes" in cfg.teacher.kwargs:
        raise CrossDistillError(
            "teacher.kwargs.num_classes: the teacher's classifier keeps the class count of its weights (checkpoint or "
            "pretrained), and methods that read only its embedding (rsd) accept any; drop teacher.kwargs.num_classes"
        )
    size = cfg.student.kwargs.get("img_size")
    if size is not None and _square(size) != cfg.data.img_size and not cfg.student.kwargs.get("dynamic_img_size"):
        raise CrossDistillError(
            f"student.kwargs.img_size is {size} but the student is fed data.img_size={cfg.data.img_size} px images; "
            f"drop student.kwargs.img_size (a student is built for data.img_size) or set data.img_size={size}"
        )


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


def _trained_size(loaded: Mapping[str, Any] | None, name: str) -> int | None:
    """The input size a crossdistill run checkpoint's student was built for, when it is the model ``name``."""
    config = loaded.get("config") if isinstance(loaded, Mapping) else None
    student = config.get("student") if isinstance(config, Mapping) else None
    if not isinstance(student, Mapping) or str(student.get("name", "")).split(".")[0] != name.split(".")[0]:
        return None
    kwargs, data = student.get("kwargs"), config.get("data")
    size = _square(kwargs.get("img_size")) if isinstance(kwargs, Mapping) else None
    return size or (_square(data.get("img_size")) if isinstance(data, Mapping) else None)


def teacher_input_size(cfg: ModelConfig, data_img_size: int, loaded: Mapping[str, Any] | None = None) -> int:
    """The square input size the teacher runs at; its inputs are resized to it when the data's differ.

    A teacher that takes any size (a CNN) runs at the data's. One built for one size (ViT, Swin, Mixer) keeps
    the size its weights were trained at: ``teacher.kwargs.img_size``, else the size recorded in a crossdistill
    run checkpoint (``loaded``), else timm's default for pretrained weights and other checkpoints. A teacher
    without weights is built for the data's size."""
    if not fixed_input_size(cfg.name):
        return data_img_size
    given = _square(cfg.kwargs.get("img_size"))
    if given is not None:
        return given
    trained = _trained_size(loaded, cfg.name)
    if trained is not None:
        return trained
    if cfg.pretrained or cfg.checkpoint:
        return default_input_size(cfg.name)
    return data_img_size


def teacher_size_source(cfg: ModelConfig) -> str:
    """Where the teacher's own input size comes from (see :func:`teacher_input_size`), for the start-up summary."""
    if _square(cfg.kwargs.get("img_size")) is not None:
        return "teacher.kwargs.img_size"
    if cfg.checkpoint:
        return "its checkpoint's size: the one a crossdistill run recorded, else timm's default"
    return "the size of its pretrained weights"


def _pretrained_classes(name: str, fallback: int) -> int:
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    classes = getattr(pretrained_cfg, "num_classes", None)
    return int(classes) if isinstance(classes, int) else fallback


def create_teacher(
    cfg: ModelConfig,
    num_classes: int,
    data_mean,
    data_std,
    img_size: int | None = None,
    *,
    load_weights: bool = True,
    download: bool = True,
) -> Teacher:
    """Build and load the teacher, and work out which input normalisation and size it expects.

    Normalisation, by precedence: ``teacher.mean/std`` from the config; the normalisation recorded in a
    crossdistill checkpoint; timm's pretrained config when ``pretrained: true``; otherwise the data's (what
    the official code feeds its teachers). Size: :func:`teacher_input_size` for ``img_size`` px data (None:
    the model's own). The classifier keeps the class count of the weights (the method decides whether that
    fits: :func:`check_teacher_fits`); ``load_weights=False`` builds it without weights (``--dry-run``).
    """
    loaded = load_weights_file(cfg.checkpoint) if cfg.checkpoint and load_weights else None
    size = teacher_input_size(cfg, img_size, loaded) if img_size is not None else None
    size_fix = (
        f"set teacher.kwargs.img_size to a size {cfg.name} takes (e.g. {default_input_size(cfg.name)}; "
        "the teacher's inputs are resized to it)"
    )
    head = _pretrained_classes(cfg.name, num_classes) if cfg.pretrained else num_classes
    unloaded = dataclasses.replace(cfg, checkpoint=None, pretrained=cfg.pretrained and load_weights and download)
    model = create_model(unloaded, head, size, size_fix)
    mean, std = data_mean, data_std
    if loaded is not None:
        load_model_weights(model, cfg.checkpoint, use_ema=cfg.checkpoint_ema, loaded=loaded, head="adopt")
        recorded = loaded.get("normalization")
        if isinstance(recorded, dict) and "mean" in recorded:
            mean, std = tuple(recorded["mean"]), tuple(recorded["std"])
    elif cfg.pretrained:
        mean, std = model.pretrained_cfg.get("mean", mean), model.pretrained_cfg.get("std", std)
    if cfg.mean is not None:
        mean = cfg.mean
    if cfg.std is not None:
        std = cfg.std
    resized = size is not None and size != img_size and fixed_input_size(cfg.name)
    if size is not None:
        check_input_size(model, cfg.name, size, size_fix)
    return Teacher(
        model,
        data_mean=data_mean,
        data_std=data_std,
        model_mean=mean,
        model_std=std,
        input_size=size if resized else None,
    )


def reads_teacher_head(distiller: Distiller) -> bool:
    """Whether the method reads the teacher's classifier: its logits, or what a method computes from the teacher
    itself (SDD: region logits through the head). Feature-only methods (RSD: the embedding) accept any head."""
    if not distiller.reads_teacher:
        return False
    return distiller.teacher_request().logits or type(distiller).compute_teacher is not Distiller.compute_teacher


def teacher_head_classes(teacher: Teacher) -> int | None:
    """The class count of the teacher's classifier (0: none), None where the model does not say (not timm)."""
    classes = getattr(teacher.model, "num_classes", None)
    return int(classes) if isinstance(classes, int) else None


def check_teacher_fits(distiller: Distiller, cfg: RunConfig, num_classes: int) -> None:
    """Refuse a teacher the method cannot use: a classifier of other classes when the method reads the teacher's
    logits, and a teacher at its own input size when the method computes from its feature maps at the data's."""
    teacher = distiller.teacher
    if teacher is None or cfg.teacher is None:
        return
    head = teacher_head_classes(teacher)
    if head is not None and head != num_classes and reads_teacher_head(distiller):
        source = (
            f" (teacher.checkpoint {cfg.teacher.checkpoint})"
            if cfg.teacher.checkpoint
            else (" (its pretrained weights)" if cfg.teacher.pretrained else "")
        )
        raise CrossDistillError(
            f"method {cfg.method!r} reads the teacher's logits, but the teacher's classifier{source} has "
            f"{head or 'no'} classes and the run has {num_classes}. {FINE_TUNE_HINT}, or use a method that reads "
            "only the teacher's embedding (rsd)"
        )
    if teacher.input_size is not None and type(distiller).compute_teacher is not Distiller.compute_teacher:
        raise CrossDistillError(
            f"method {cfg.method!r} computes its teacher outputs from the teacher's feature map at the data's input "
            f"size, but the teacher runs at {teacher.input_size} px and data.img_size is {cfg.data.img_size}: set "
            f"teacher.kwargs.img_size={cfg.data.img_size}"
        )


def build_models(
    cfg: RunConfig,
    method_args: MethodConfig,
    num_classes: int,
    data_mean=None,
    data_std=None,
    *,
    load_weights: bool = True,
    download: bool = True,
) -> Distiller:
    """Student, teacher and distiller of ``cfg`` (on CPU), each at the input size it takes, checked before a run
    writes anything; ``load_weights=False`` builds them without weights, ``download=False`` without the
    ``pretrained`` ones (which would be downloaded) but as they would be built (their size and classifier:
    ``--dry-run``)."""
    method_cls = METHODS.get(cfg.method)
    size = cfg.data.img_size
    size_fix = (
        f"set data.img_size to a size the student takes ({cfg.student.name} is made for "
        f"{default_input_size(cfg.student.name)} px)"
    )
    student_cfg = cfg.student if load_weights else dataclasses.replace(cfg.student, pretrained=False, checkpoint=None)
    if not download:
        student_cfg = dataclasses.replace(student_cfg, pretrained=False)
    student = create_model(student_cfg, num_classes, size, size_fix, head="new")  # fine-tuning: a new classifier
    check_input_size(student, cfg.student.name, size, size_fix)
    teacher = None
    if cfg.teacher is not None and method_cls.needs_teacher:
        teacher = create_teacher(
            cfg.teacher, num_classes, data_mean, data_std, size, load_weights=load_weights, download=download
        )
    distiller = build_distiller(cfg.method, student, teacher, method_args, criterion=make_criterion(cfg))
    check_teacher_fits(distiller, cfg, num_classes)
    return distiller


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


def build_run(cfg: RunConfig, world_size: int = 1) -> Built:
    """Data, student, teacher and distiller for ``cfg`` (on CPU), with the input checks a run needs."""
    method_args = check_run_inputs(cfg)
    data, num_classes = open_data(cfg, world_size)
    distiller = build_models(cfg, method_args, num_classes, data.mean, data.std)
    if distiller.needs_indices:
        distiller.bind_training_set(training_targets(data.train, cfg.method), cfg.train.seed)
    return Built(data=data, num_classes=num_classes, distiller=distiller)


def training_targets(dataset, method: str) -> list[int]:
    """The class of every training sample, in index order, from the dataset's ``targets`` (no image decoded)."""
    targets = getattr(dataset, "targets", None)
    if targets is None or len(targets) != len(dataset):
        raise CrossDistillError(
            f"method {method!r} needs the class of every training sample, and this training set does not list "
            "them (a 'targets' attribute, one label per sample); use a dataset that does, or another method"
        )
    return [int(t) for t in targets]


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


def weights_source(model: ModelConfig) -> str:
    """Where a model's weights come from, as the start-up lines say it."""
    if model.checkpoint:
        return str(model.checkpoint) + (" (EMA)" if model.checkpoint_ema else "")
    if model.pretrained:
        return f"timm's pretrained {model.name}"
    return "random initialisation"


def describe_weights(cfg: RunConfig, with_teacher: bool) -> str:
    """The start-up line naming the weights each model starts from."""
    text = f"weights: student {weights_source(cfg.student)}"
    if with_teacher and cfg.teacher is not None:
        text += f" | teacher {weights_source(cfg.teacher)}"
    return text


def describe_batch(train: TrainConfig, world_size: int) -> str:
    """``per-process batch B x W process(es) [x N accumulation steps] = effective batch E``."""
    accum = f" x {train.grad_accum_steps} accumulation steps" if train.grad_accum_steps > 1 else ""
    return (
        f"per-process batch {train.batch_size} x {world_size} process(es){accum} = "
        f"effective batch {effective_batch(train, world_size)}"
    )


def optimizer_steps_per_epoch(batches_per_epoch: int, train: TrainConfig) -> int:
    """The loader's batches in groups of ``train.grad_accum_steps``, one optimiser step each (the last group of
    an epoch may be short)."""
    return -(-batches_per_epoch // train.grad_accum_steps)


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


def warmup_warning(cfg: RunConfig, plan: LrPlan) -> str | None:
    """The warning for a warm-up as long as the run: timm's schedule is stepped once per epoch, so such a run trains
    every epoch below ``optim.lr`` (the first at ``warmup_lr``) and never decays."""
    o, epochs = cfg.optim, cfg.train.epochs
    if o.sched == "none" or o.warmup_epochs < epochs:
        return None
    return (
        f"warning: optim.warmup_epochs={o.warmup_epochs} covers all {epochs} epoch(s): the lr (set once per epoch) "
        f"rises from {plan.warmup_lr:g} and never reaches {plan.lr:g}; lower optim.warmup_epochs or train longer."
    )


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
    """timm's scheduler for ``optim.sched`` (None for ``none``). As in timm's train.py (and the official RSD/OFA
    code, which use it), the lr is set once per epoch: ``step(epoch)``; ``step_update`` changes nothing unless a
    scheduler is per update. Epochs count optimiser steps through ``updates_per_epoch`` (gradient accumulation)."""
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
