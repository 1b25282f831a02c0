"""RKD (Park et al., CVPR 2019, "Relational Knowledge Distillation") across architectures, as the OFA code runs it.

Loss = w_gt * CE(student logits, y)
     + weight * (distance_weight * L_distance + angle_weight * L_angle)(student embedding, teacher embedding).

* Features: the pre-logits embeddings of both models (OFA's ``feat[-1]``); RKD compares distances and angles
  *within* each batch, so the two widths may differ and there is no projector (no extra parameters).
* The loss (:mod:`crossdistill.losses.rkd`): distances normalised by their mean over the pairs, smooth-L1 on
  distances and on angles; the teacher's side is a target (no gradient).
* Defaults: OFA ``train.py`` flags ``--rkd-distance-weight 25``, ``--rkd-angle-weight 50``, ``--rkd-eps 1e-12``,
  ``--rkd-squared`` off, ``--kd-loss-weight 1``, ``--gt-loss-weight 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..losses.rkd import RKD_EPS, rkd_loss
from ..models import TeacherOutputs
from .base import Distiller, DistillOutput, MethodConfig, register_method
from .kd import check_range


@dataclass
class RKDConfig(MethodConfig):
    """RKD hyper-parameters; defaults are the OFA ``train.py`` flags."""

    distance_weight: float = 25.0
    """Weight of the distance term (``--rkd-distance-weight``)."""
    angle_weight: float = 50.0
    """Weight of the angle term (``--rkd-angle-weight``)."""
    weight: float = 1.0
    """Weight of the whole RKD term (``--kd-loss-weight``)."""
    w_gt: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``)."""
    eps: float = RKD_EPS
    """Lower clamp of the squared pairwise distances (``--rkd-eps``)."""
    squared: bool = False
    """Compare squared distances (``--rkd-squared``)."""

    def validate(self) -> None:
        for key in ("distance_weight", "angle_weight", "weight", "w_gt"):
            check_range(key, getattr(self, key))
        check_range("eps", self.eps, strict=True)


class EmbeddingDistiller(Distiller):
    """Shared forward of the methods on the two pre-logits embeddings that relate the samples of a batch
    (``rkd``, ``cc``): ``losses = {"ce": w_gt * criterion(student logits, target), term: weight *
    distill_loss(student embedding, teacher embedding)}``; subclasses set :attr:`term`, implement
    :meth:`distill_loss` and use a config with ``weight`` and ``w_gt``."""

    term: ClassVar[str] = ""
    teacher_outputs = ("embedding",)
    min_batch_size = 2
    """The losses relate the samples of a batch."""

    def distill_loss(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        out = self.student_forward(images)
        return DistillOutput(
            logits=out.logits,
            losses={
                "ce": self.cfg.w_gt * self.criterion(out.logits, target),
                self.term: self.cfg.weight * self.distill_loss(out.embedding, teacher.embedding),
            },
        )


@register_method("rkd")
class RKD(EmbeddingDistiller):
    config_cls = RKDConfig
    term = "rkd"

    def distill_loss(self, student_embedding, teacher_embedding):
        cfg = self.cfg
        return rkd_loss(
            student_embedding, teacher_embedding, cfg.distance_weight, cfg.angle_weight, cfg.squared, cfg.eps
        )
