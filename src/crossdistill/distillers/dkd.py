"""DKD: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), as the OFA/RSD code runs it.

Loss = ce_weight * CE(student logits, y)
     + weight * warmup(epoch) * (alpha * TCKD + beta * NCKD)   (both KL terms times T^2).

The target class comes from ``argmax`` of soft (mixup) targets. The OFA/RSD code has no
warm-up (``warmup_epochs = 0``); the original DKD code ramps the term in linearly over
its first 20 epochs, available with ``warmup_epochs: 20``.

Note: OFA's ``distillers/dkd.py`` (line 29) reads ``self.dkd_alpha/beta/temperature``, which
it never sets, so its DKD raises AttributeError as published; the intended values are
evidently the ``--dkd-*`` flags, which are the defaults here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..losses.dkd import dkd_loss, dkd_warmup_factor
from .base import MethodConfig, register_method
from .kd import LogitDistiller, check_range


@dataclass
class DKDConfig(MethodConfig):
    """DKD hyper-parameters; defaults are the OFA/RSD ``train.py`` flags (identical in both repos)."""

    alpha: float = 1.0
    """Weight of TCKD, the target-vs-rest term (``--dkd-alpha``, OFA train.py line 100)."""
    beta: float = 2.0
    """Weight of NCKD, the non-target term (``--dkd-beta``, OFA train.py line 101; the DKD paper's CIFAR
    default is 8)."""
    temperature: float = 1.0
    """T (``--dkd-temperature``, OFA train.py line 102). Both terms are multiplied by T^2."""
    weight: float = 1.0
    """Weight of the DKD term (``--kd-loss-weight``, OFA train.py line 83; applied in distillers/dkd.py line 28)."""
    ce_weight: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``, OFA train.py line 82)."""
    warmup_epochs: int = 0
    """Ramp the DKD term in as ``min((epoch + 1) / warmup_epochs, 1)`` (0-based epoch). 0 = off, as in
    OFA/RSD (their DKD ignores the epoch); the original DKD code uses 20 (mdistiller engine/cfg.py line 167)."""

    def validate(self) -> None:
        check_range("alpha", self.alpha)
        check_range("beta", self.beta)
        check_range("temperature", self.temperature, strict=True)
        check_range("weight", self.weight)
        check_range("ce_weight", self.ce_weight)
        if self.warmup_epochs < 0:
            raise ConfigError(f"config key 'method_args.warmup_epochs': must be >= 0, got {self.warmup_epochs}")


@register_method("dkd")
class DKD(LogitDistiller):
    config_cls = DKDConfig

    def __init__(self, student, teacher, cfg: DKDConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.warmup_factor = dkd_warmup_factor(0, cfg.warmup_epochs)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.warmup_factor = dkd_warmup_factor(epoch, self.cfg.warmup_epochs)

    def distill_loss(self, logits_student, logits_teacher, target):
        cfg = self.cfg
        loss = dkd_loss(logits_student, logits_teacher, target, cfg.alpha, cfg.beta, cfg.temperature)
        return self.warmup_factor * loss
