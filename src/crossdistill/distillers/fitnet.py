"""FitNet (Romero et al., ICLR 2015) across architectures, as the RSD fork of the OFA code runs it.

Loss = w_gt * CE(student logits, y) + weight * sum_stages MSE(aligner_i(student stage i), teacher stage i).

* Stages: the adapter's four default stages of each model (:func:`~crossdistill.models.default_stages`),
  the official ``--fitnet-stage 1 2 3 4``: the last four feature stages of a CNN or Swin, blocks
  [1, 3, depth-3, depth-1] of a ViT/Mixer; stage i of the student is matched to stage i of the teacher.
* Aligners (:mod:`crossdistill.models.aligners`): one small trainable module per stage, from any
  student layout (map or tokens) to the teacher's; prefix (class) tokens are dropped on both sides
  and the comparison happens in the teacher's layout. They are the ``aligners`` child module, so
  they train with the student and are counted as extra parameters; the exported student is plain timm.
* MSE: ``F.mse_loss`` mean over all elements, per stage, summed over stages (fp32 under autocast).
* Weight: the official ``--fitnet-loss-weight`` is 1, and RSD's ``distillers/fitnet.py`` (line 129)
  multiplies the summed loss by an internal 0.1; ``weight`` is that effective product, 0.1.
  (OFA's CNN-only FitNet has no such factor: set ``weight: 1.0`` to reproduce it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..losses.fitnet import fitnet_loss
from ..models import TeacherOutputs, TeacherRequest, default_stages
from ..models.aligners import build_aligners
from .base import Distiller, DistillOutput, MethodConfig, register_method

DEFAULT_INPUT_SIZE = 224


@dataclass
class FitNetConfig(MethodConfig):
    """FitNet hyper-parameters; defaults are the RSD fork's ``train.py`` flags and ``distillers/fitnet.py``."""

    weight: float = 0.1
    """Weight of the summed stage MSEs: ``--fitnet-loss-weight`` 1 x RSD's internal 0.1 (OFA's own FitNet: 1.0)."""
    w_gt: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``)."""
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """Which of the four default stages to match (``--fitnet-stage``, 1-based)."""
    img_size: int | None = None
    """Input size at which the stage shapes are probed to build the aligners: the training input size
    (``data.img_size``). None: the student's timm ``pretrained_cfg['input_size']``."""
    norm: bool = False
    """Append BatchNorm2d to every aligner (not in the official code)."""

    def validate(self) -> None:
        for key in ("weight", "w_gt"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"config key 'method_args.{key}': must be a finite number >= 0, got {value}")
        check_stages(self.stages)
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError(f"config key 'method_args.img_size': must be >= 8 (or null), got {self.img_size}")


def probe_size(student, cfg: FitNetConfig) -> tuple[int, int]:
    """(H, W) at which the aligners are built: ``cfg.img_size``, else the student's pretrained input size."""
    if cfg.img_size is not None:
        return cfg.img_size, cfg.img_size
    pretrained = getattr(student, "pretrained_cfg", None) or {}
    size = pretrained.get("input_size") or (3, DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
    return int(size[-2]), int(size[-1])


def check_stages(stages: list[int]) -> None:
    """Raise ConfigError unless ``method_args.stages`` picks each of the four default stages (1-4) at most once."""
    if not stages:
        raise ConfigError("config key 'method_args.stages': give at least one stage out of 1, 2, 3, 4")
    bad = [s for s in stages if s not in (1, 2, 3, 4)]
    if bad:
        raise ConfigError(f"config key 'method_args.stages': stages are 1, 2, 3 or 4, got {bad}")
    if len(set(stages)) != len(stages):
        raise ConfigError(f"config key 'method_args.stages': each stage at most once, got {stages}")


def pick_stages(model, picks: list[int], role: str, method: str):
    """The adapter stage indices of the 1-based ``picks`` among ``model``'s four default stages."""
    try:
        stages = default_stages(model)
    except TypeError as err:
        raise ConfigError(
            f"{method} cannot pick the {role}'s stages: {err}. {method} pairs four stages of each model (method_args."
            "stages picks among those four): use a teacher and student with four feature stages each, or a method "
            "that reads no stages (kd, dist, rsd, ...)"
        ) from None
    return [stages[i - 1] for i in picks]


class StagePairDistiller(Distiller):
    """A method that compares stage i of the student with stage i of the teacher, for the stages ``cfg.stages``
    picks among each model's four default stages (FitNet, AT); it reads those teacher stages."""

    display_name: ClassVar[str] = ""

    def __init__(self, student, teacher, cfg, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.stages_s = pick_stages(student, cfg.stages, "student", self.display_name)
        self.stages_t = pick_stages(teacher.model, cfg.stages, "teacher", self.display_name)

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest(stages=tuple(self.stages_t))


@register_method("fitnet")
class FitNet(StagePairDistiller):
    config_cls = FitNetConfig
    display_name = "FitNet"

    def __init__(self, student, teacher, cfg: FitNetConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.input_size = probe_size(student, cfg)
        self.aligners = build_aligners(student, teacher, self.stages_s, self.stages_t, self.input_size, norm=cfg.norm)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        feats_t = teacher.stages
        out = self.student_forward(images, stages=self.stages_s)
        stage_losses = []
        for aligner, feat_s, feat_t in zip(self.aligners, out.stages, feats_t):
            aligned, goal = aligner.align(feat_s, feat_t)
            stage_losses.append(fitnet_loss(aligned, goal))
        return DistillOutput(
            logits=out.logits,
            losses={
                "ce": self.cfg.w_gt * self.criterion(out.logits, target),
                "fitnet": self.cfg.weight * torch.stack(stage_losses).sum(),
            },
        )
