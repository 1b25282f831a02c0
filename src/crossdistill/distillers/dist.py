"""DIST: Knowledge Distillation from A Stronger Teacher (Huang et al., NeurIPS 2022), as the OFA/RSD code runs it.

Loss = ce_weight * CE(student logits, y)
     + weight * tau^2 * (beta * inter-class + gamma * intra-class Pearson relation loss).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..losses.dist import dist_loss
from .base import MethodConfig, register_method
from .kd import LogitDistiller, check_range


@dataclass
class DISTConfig(MethodConfig):
    """DIST hyper-parameters; defaults are the OFA/RSD ``train.py`` flags (identical in both repos)."""

    beta: float = 1.0
    """Weight of the inter-class relation (per sample, over classes) (``--dist-beta``, OFA train.py line 95)."""
    gamma: float = 1.0
    """Weight of the intra-class relation (per class, over the batch) (``--dist-gamma``, OFA train.py line 96)."""
    tau: float = 1.0
    """Temperature (``--dist-tau``, OFA train.py line 97). The loss is multiplied by tau^2."""
    weight: float = 1.0
    """Weight of the DIST term (``--kd-loss-weight``, OFA train.py line 83; applied in distillers/dist.py line 22)."""
    ce_weight: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``, OFA train.py line 82)."""

    def validate(self) -> None:
        check_range("beta", self.beta)
        check_range("gamma", self.gamma)
        check_range("tau", self.tau, strict=True)
        check_range("weight", self.weight)
        check_range("ce_weight", self.ce_weight)


@register_method("dist")
class DIST(LogitDistiller):
    config_cls = DISTConfig
    min_batch_size = 2
    """The intra-class relation correlates each class's scores over the batch."""

    def distill_loss(self, logits_student, logits_teacher, target):
        cfg = self.cfg
        return dist_loss(logits_student, logits_teacher, cfg.beta, cfg.gamma, cfg.tau)
