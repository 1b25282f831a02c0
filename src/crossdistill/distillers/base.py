"""The distiller interface every method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..models import ModelOutput, Teacher, forward_model
from ..registry import Registry


@dataclass
class DistillOutput:
    logits: torch.Tensor
    """The student's logits (for accuracy)."""
    losses: dict[str, torch.Tensor]
    """Named, already-weighted loss terms; the training loss is their sum."""

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())


@dataclass
class MethodConfig:
    """Base of every method's typed config."""

    def validate(self) -> None:  # overridden where values have ranges
        pass


class Distiller(nn.Module):
    """A student, the method's trainable extras (projectors), and a frozen teacher.

    Subclasses set ``config_cls`` and implement :meth:`forward`. The teacher is held as a
    plain attribute (see :class:`~crossdistill.models.Teacher`), so ``parameters()``,
    ``state_dict()`` and a DDP wrapper see only trainable modules; it still follows
    ``.to()`` / ``.cuda()`` / ``.half()`` of the distiller.
    """

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = True
    min_batch_size: ClassVar[int] = 1

    def __init__(self, student: nn.Module, teacher: Teacher | None, cfg: MethodConfig, criterion: nn.Module | None = None):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    # --- parameters
    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules besides the student (dropped when the student is exported)."""
        return {name: module for name, module in self.named_children() if name not in ("student", "criterion")}

    def extra_parameter_count(self) -> int:
        return sum(p.numel() for m in self.extra_modules().values() for p in m.parameters() if p.requires_grad)

    # --- forward helpers
    def student_forward(self, x: torch.Tensor, **kwargs: Any) -> ModelOutput:
        return forward_model(self.student, x, **kwargs)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> DistillOutput:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine before each epoch (0-based); for schedules inside a method (e.g. DKD warm-up)."""

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher.apply(fn)
        return self


METHODS: Registry[type[Distiller]] = Registry("method")
"""Every method by name; a method module registers its class with ``@register_method("name")``."""
register_method = METHODS.register
