"""OFA: One-for-All Knowledge Distillation (Hao et al., NeurIPS 2023), as the official code runs it.

Loss = w_gt * CE(student logits, y)
     + w_kd * ofa_loss(student logits, teacher logits; eps_last)
     + w_ofa * sum_s ofa_loss(branch_s(student stage s), teacher logits; eps_s)

The teacher contributes logits only. Each branch (see :mod:`crossdistill.models.ofa_branches`)
maps one of the student's four default stages to class logits; the branches are trained with
the student and dropped afterwards. ``eps`` is one value or ``len(stages) + 1`` values (one per
stage, the last for the final logits), as the official ``--ofa-eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..losses.ofa import ofa_loss, ofa_target_mask
from ..models import TeacherOutputs
from ..models.ofa_branches import build_ofa_branches, ofa_stage_indices
from .base import Distiller, DistillOutput, MethodConfig, register_method


@dataclass
class OFAConfig(MethodConfig):
    stages: tuple[int, ...] = (1, 2, 3, 4)
    """Student stages with a branch: numbers 1..4 = the adapter's four default stages."""
    eps: float | list[float] = 1.0
    """Target-class modulating exponent: one value, or len(stages)+1 values (the last for the final logits)."""
    temperature: float = 1.0
    w_gt: float = 1.0
    """Weight of the classification loss (official --gt-loss-weight)."""
    w_kd: float = 1.0
    """Weight of the OFA loss on the final logits (official --kd-loss-weight)."""
    w_ofa: float = 1.0
    """Weight of the summed branch losses (official --ofa-loss-weight; 0.1 in the maintainers' CIFAR CNN runs)."""
    img_size: int | None = None
    """Input size the branches are sized for (token students); default: the student's own / pretrained size."""
    student_kind: str = "auto"
    """Branch type: auto (CNN branch for CNN students, token branch otherwise), cnn or token."""

    def eps_list(self) -> list[float]:
        """eps broadcast to len(stages) + 1 values."""
        values = [self.eps] if isinstance(self.eps, (int, float)) else list(self.eps)
        return values * (len(self.stages) + 1) if len(values) == 1 else values

    def validate(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"config key 'method_args.{key}': {message}")

        bad = [s for s in self.stages if s not in (1, 2, 3, 4)]
        if bad:
            fail("stages", f"stage numbers are 1..4 (the four default stages of the student), got {list(self.stages)}")
        if len(set(self.stages)) != len(self.stages):
            fail("stages", f"each stage may appear once, got {list(self.stages)}")
        values = [self.eps] if isinstance(self.eps, (int, float)) else list(self.eps)
        if len(values) not in (1, len(self.stages) + 1):
            fail(
                "eps",
                f"give one value or len(stages)+1 = {len(self.stages) + 1} values "
                f"(one per stage, then the final logits), got {len(values)}",
            )
        if any(not v > 0 for v in values):
            fail("eps", f"must be > 0, got {self.eps}")
        if not self.temperature > 0:
            fail("temperature", f"must be > 0, got {self.temperature}")
        for key in ("w_gt", "w_kd", "w_ofa"):
            if not getattr(self, key) >= 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.img_size is not None and self.img_size < 8:
            fail("img_size", f"must be >= 8 (or null), got {self.img_size}")
        if self.student_kind not in ("auto", "cnn", "token"):
            fail("student_kind", f"must be auto, cnn or token, got {self.student_kind!r}")


@register_method("ofa")
class OFA(Distiller):
    config_cls = OFAConfig
    teacher_outputs = ("logits",)  # the branches read student stages; from the teacher only its logits

    def __init__(self, student, teacher, cfg: OFAConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.stage_indices = ofa_stage_indices(student, cfg.stages) if cfg.stages else []
        self.branches = build_ofa_branches(
            student, teacher.dim, None, cfg.stages, input_size=cfg.img_size, kind=cfg.student_kind
        )
        self.eps = cfg.eps_list()

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        cfg: OFAConfig = self.cfg
        logits_t = teacher.logits
        out = self.student_forward(images, stages=self.stage_indices)
        mask = ofa_target_mask(target, out.logits.shape[-1])
        losses = {
            "ce": cfg.w_gt * self.criterion(out.logits, target),
            "kd": cfg.w_kd * ofa_loss(out.logits, logits_t, mask, self.eps[-1], cfg.temperature),
        }
        if len(self.branches):
            branch_losses = [
                ofa_loss(branch(feature), logits_t, mask, eps, cfg.temperature)
                for branch, feature, eps in zip(self.branches, out.stages, self.eps)
            ]
            losses["ofa"] = cfg.w_ofa * torch.stack(branch_losses).sum()
        return DistillOutput(logits=out.logits, losses=losses)


__all__ = ["OFA", "OFAConfig"]
