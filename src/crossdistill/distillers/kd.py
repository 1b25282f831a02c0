"""KD: classic logit distillation (Hinton et al., 2015), as the OFA/RSD code runs it.

Loss = ce_weight * CE(student logits, y) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

Also holds :class:`LogitDistiller`, the shared forward of the logit-only baselines
(``kd``, ``dkd``, ``dist``): frozen teacher logits, student logits, a weighted
classification term and a weighted distillation term, as OFA's distillers compute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..losses.kd import kd_loss
from ..models import TeacherOutputs
from .base import Distiller, DistillOutput, MethodConfig, register_method


def check_range(key: str, value: float, *, minimum: float = 0.0, strict: bool = False) -> None:
    """Raise ConfigError naming ``method_args.<key>`` unless ``value`` is finite and >= (or >) ``minimum``."""
    bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        relation = ">" if strict else ">="
        raise ConfigError(f"config key 'method_args.{key}': must be a finite number {relation} {minimum}, got {value}")


@dataclass
class KDConfig(MethodConfig):
    """KD hyper-parameters; defaults are the OFA/RSD ``train.py`` flags (identical in both repos)."""

    temperature: float = 1.0
    """T (``--kd-temperature``, OFA train.py line 86). The loss is multiplied by T^2."""
    weight: float = 1.0
    """Weight of the KD term (``--kd-loss-weight``, OFA train.py line 83)."""
    ce_weight: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``, OFA train.py line 82)."""

    def validate(self) -> None:
        check_range("temperature", self.temperature, strict=True)
        check_range("weight", self.weight)
        check_range("ce_weight", self.ce_weight)


class LogitDistiller(Distiller):
    """Shared forward of the logit-only methods.

    ``losses = {"ce": ce_weight * criterion(student logits, target),
    "kd": weight * distill_loss(student logits, teacher logits, target)}``; subclasses
    implement :meth:`distill_loss` and use a config with ``weight`` and ``ce_weight``.
    ``target`` is what the engine gives the criterion: class indices, or a [B, K]
    soft-label matrix under mixup/cutmix.
    """

    def distill_loss(
        self, logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    teacher_outputs = ("logits",)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        logits = self.student_forward(images).logits
        logits_teacher = teacher.logits
        return DistillOutput(
            logits=logits,
            losses={
                "ce": self.cfg.ce_weight * self.criterion(logits, target),
                "kd": self.cfg.weight * self.distill_loss(logits, logits_teacher, target),
            },
        )


@register_method("kd")
class KD(LogitDistiller):
    config_cls = KDConfig

    def distill_loss(self, logits_student, logits_teacher, target):
        return kd_loss(logits_student, logits_teacher, self.cfg.temperature)
