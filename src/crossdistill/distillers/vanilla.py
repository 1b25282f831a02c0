"""Vanilla: the student alone with its classification loss (from-scratch baseline, teacher fine-tuning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import TeacherOutputs
from .base import Distiller, DistillOutput, MethodConfig, register_method


@dataclass
class VanillaConfig(MethodConfig):
    pass


@register_method("vanilla")
class Vanilla(Distiller):
    config_cls = VanillaConfig
    needs_teacher = False

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        logits = self.student(images)
        return DistillOutput(logits=logits, losses={"ce": self.criterion(logits, target)})
