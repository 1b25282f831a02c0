"""RSD: Redundancy Suppression Distillation (Zhang et al., ICCV 2025), as the official code runs it.

Loss = CE(student logits, y) + weight * rsd_loss(AAD(student embedding), teacher embedding, kappa).
Only the pre-logits embeddings are used; no teacher logits, no KD term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..losses import rsd_loss
from ..models import AADProjector, embedding_dim
from . import register_method
from .base import DistillOutput, Distiller, MethodConfig


@dataclass
class RSDConfig(MethodConfig):
    weight: float = 0.1
    """lambda: multiplies the summed RSD loss."""
    kappa: float = 0.01
    """Weight of the off-diagonal (decorrelation) terms."""
    gamma: int = 2
    """AAD hidden width = gamma * student embedding width."""

    def validate(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"config key 'method_args.weight': must be >= 0, got {self.weight}")
        if self.kappa < 0:
            raise ConfigError(f"config key 'method_args.kappa': must be >= 0, got {self.kappa}")
        if self.gamma < 1:
            raise ConfigError(f"config key 'method_args.gamma': must be >= 1, got {self.gamma}")


@register_method("rsd")
class RSD(Distiller):
    config_cls = RSDConfig
    min_batch_size = 2

    def __init__(self, student, teacher, cfg: RSDConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.aad = AADProjector(embedding_dim(student), teacher.dim, cfg.gamma)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> DistillOutput:
        if x.shape[0] < 2:
            raise ValueError(f"RSD needs at least 2 samples per batch (per process), got {x.shape[0]}")
        z_t = self.teacher(x).embedding
        out = self.student_forward(x)
        z_s = self.aad(out.embedding)
        return DistillOutput(
            logits=out.logits,
            losses={
                "ce": self.criterion(out.logits, target),
                "rsd": self.cfg.weight * rsd_loss(z_s, z_t, kappa=self.cfg.kappa),
            },
        )
