"""AT (activation-based attention transfer, Zagoruyko & Komodakis, ICLR 2017) across architectures.

Loss = w_gt * CE(student logits, y) + weight * sum over stages of at_loss(student stage i, teacher stage i, p).

AT is not in the OFA code; this follows the official code (``szagoruyko/attention-transfer``, the same
loss in mdistiller's ``distillers/AT.py``), on the stages FitNet uses:

* Stages: the adapter's four default stages of each model (:func:`~crossdistill.models.default_stages`),
  stage i of the student against stage i of the teacher, as FitNet pairs them.
* Token stages become maps as the FitNet aligners read them: prefix (class) tokens dropped, the patch tokens
  unflattened to their grid (:func:`~crossdistill.models.aligners.patch_map`). An attention map is a mean
  over channels, so the widths may differ and nothing is trained (no extra parameters).
* Grids that differ: the student's attention map is resized to the teacher's grid (area averaging where it
  shrinks, bilinear where it grows; :mod:`crossdistill.losses.at`).
* Defaults: ``p`` 2 and ``weight`` 1000, the official code's ``beta = 1e+3`` (mdistiller's ``AT.P 2``,
  ``AT.LOSS.FEAT_WEIGHT 1000``); the classification weight 1.
* Scale: each stage's loss is a mean over the teacher grid's ``h*w`` positions of the squared difference of
  two unit vectors, so it is at most ``4 / (h*w)``. The official 1000 was set for 32x32 .. 8x8 CIFAR maps; on
  coarser grids (a ViT teacher at 32 px: 4x4 patches) the same weight makes AT dominate the classification
  term, and a smaller ``weight`` may suit better.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses.at import at_loss
from ..models import TeacherOutputs
from ..models.adapter import num_prefix_tokens
from ..models.aligners import patch_map
from .base import DistillOutput, MethodConfig, register_method
from .fitnet import StagePairDistiller, check_stages
from .kd import check_range


@dataclass
class ATConfig(MethodConfig):
    """AT hyper-parameters; defaults are the official code's (and mdistiller's)."""

    weight: float = 1000.0
    """Weight of the summed stage losses (the official ``--beta 1e+3``)."""
    p: float = 2.0
    """Exponent of the attention map ``mean_c |f|^p``."""
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    """Which of the four default stages to match (1-based), as FitNet's ``stages``."""
    w_gt: float = 1.0
    """Weight of the classification term."""

    def validate(self) -> None:
        check_range("weight", self.weight)
        check_range("w_gt", self.w_gt)
        check_range("p", self.p, minimum=1.0)
        check_stages(self.stages)


def as_map(feat: torch.Tensor, prefix: int, input_hw: tuple[int, int]) -> torch.Tensor:
    """A stage feature as a map [B, C, h, w]: a map as it is, a token sequence without its ``prefix`` tokens,
    unflattened to the patch grid of the input's aspect."""
    return patch_map(feat, prefix, input_hw) if feat.ndim == 3 else feat


@register_method("at")
class AT(StagePairDistiller):
    config_cls = ATConfig
    display_name = "AT"

    def __init__(self, student, teacher, cfg: ATConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.prefix_s, self.prefix_t = num_prefix_tokens(student), num_prefix_tokens(teacher.model)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        cfg = self.cfg
        out = self.student_forward(images, stages=self.stages_s)
        input_hw = (int(images.shape[-2]), int(images.shape[-1]))
        stage_losses = [
            at_loss(as_map(feat_s, self.prefix_s, input_hw), as_map(feat_t, self.prefix_t, input_hw), cfg.p)
            for feat_s, feat_t in zip(out.stages, teacher.stages)
        ]
        return DistillOutput(
            logits=out.logits,
            losses={
                "ce": cfg.w_gt * self.criterion(out.logits, target),
                "at": cfg.weight * torch.stack(stage_losses).sum(),
            },
        )
