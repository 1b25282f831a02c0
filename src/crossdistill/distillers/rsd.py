"""RSD: Redundancy Suppression Distillation (Zhang et al., ICCV 2025), as the official code runs it.

Loss = CE(student logits, y) + weight * rsd_loss(AAD(student embedding), teacher embedding, kappa).
Only the pre-logits embeddings are used; no teacher logits, no KD term.

Variants the paper reports, as options or sibling methods:

* ``kappa: 0``: the "correlation only" ablation (no decorrelation term);
* ``projector: linear``: the "without AAD" ablation (a bias-free linear adaptor when the
  widths differ, the identity when they are equal);
* ``global_batch: true``: the correlation over the batch of all DDP ranks (default off,
  as the official code uses per-GPU statistics);
* ``reduction: mean``: not in the paper; the loss averaged over its diagonal and off-diagonal terms and scaled
  to their counts at ``reference_dim`` (768), so lambda and kappa mean at every teacher width what they mean for
  the paper's Swin-T teacher (see ``rsd_loss``);
* ``rsd_logits``: the same loss on student vs teacher logits, with no projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..collectives import all_gather_no_grad, all_gather_with_grad
from ..errors import ConfigError
from ..losses import rsd_loss
from ..losses.rsd import REDUCTIONS, REFERENCE_DIM
from ..models import AADProjector, TeacherOutputs, embedding_dim
from .base import Distiller, DistillOutput, MethodConfig, register_method

PROJECTORS = ("aad", "linear")


def _check_common(cfg) -> None:
    if cfg.weight < 0:
        raise ConfigError(f"config key 'method_args.weight': must be >= 0, got {cfg.weight}")
    if cfg.kappa < 0:
        raise ConfigError(f"config key 'method_args.kappa': must be >= 0, got {cfg.kappa}")


def check_batch(images: torch.Tensor) -> None:
    if images.shape[0] < 2:
        raise ValueError(f"RSD needs at least 2 samples per batch (per process), got {images.shape[0]}")


def global_rsd_loss(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    kappa: float,
    global_batch: bool,
    reduction: str = "sum",
    reference_dim: int = REFERENCE_DIM,
) -> torch.Tensor:
    """``rsd_loss`` on this process's batch, or on the batch of all ranks when ``global_batch``."""
    if global_batch:
        z_s, z_t = all_gather_with_grad(z_s), all_gather_no_grad(z_t)
    return rsd_loss(z_s, z_t, kappa=kappa, reduction=reduction, reference_dim=reference_dim)


@dataclass
class RSDConfig(MethodConfig):
    weight: float = 0.1
    """lambda: multiplies the summed RSD loss (official --rsd-loss-weight)."""
    kappa: float = 0.01
    """Weight of the off-diagonal (decorrelation) terms (official --rsd-kappa); 0 = correlation only."""
    gamma: int = 2
    """AAD hidden width = gamma * student embedding width (official --rsd-gamma)."""
    projector: str = "aad"
    """aad (the paper's AAD) | linear (the "without AAD" ablation)."""
    global_batch: bool = False
    """Correlate over the batch of all DDP ranks instead of each rank's own batch. With train.grad_accum_steps
    the correlation is per micro-batch: over the ranks' batches of the same micro-step, never the accumulated
    batch."""
    reduction: str = "sum"
    """sum (the official loss) | mean: each term averaged over its count and scaled to the counts at reference_dim,
    so that weight and kappa keep their meaning at any teacher width (equal to sum at reference_dim)."""
    reference_dim: int = REFERENCE_DIM
    """The teacher width at which reduction mean equals the sum (768: the paper's Swin-T teacher)."""

    def validate(self) -> None:
        _check_common(self)
        if self.reduction not in REDUCTIONS:
            raise ConfigError(
                f"config key 'method_args.reduction': must be one of {REDUCTIONS}, got {self.reduction!r}"
            )
        if self.reference_dim < 2:
            raise ConfigError(f"config key 'method_args.reference_dim': must be >= 2, got {self.reference_dim}")
        if self.gamma < 1:
            raise ConfigError(f"config key 'method_args.gamma': must be >= 1, got {self.gamma}")
        if self.projector not in PROJECTORS:
            raise ConfigError(
                f"config key 'method_args.projector': must be one of {PROJECTORS}, got {self.projector!r}"
            )


def linear_adaptor(student_dim: int, teacher_dim: int) -> nn.Module:
    """The "without AAD" adaptor: a bias-free linear map when widths differ, else the identity."""
    if student_dim == teacher_dim:
        return nn.Identity()
    layer = nn.Linear(student_dim, teacher_dim, bias=False)
    nn.init.trunc_normal_(layer.weight, std=0.02)
    return layer


@register_method("rsd")
class RSD(Distiller):
    config_cls = RSDConfig
    min_batch_size = 2
    teacher_outputs = ("embedding",)

    def __init__(self, student, teacher, cfg: RSDConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        student_dim = embedding_dim(student)
        if cfg.projector == "aad":
            self.aad = AADProjector(student_dim, teacher.dim, cfg.gamma)
        else:
            self.adaptor = linear_adaptor(student_dim, teacher.dim)

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.aad(embedding) if self.cfg.projector == "aad" else self.adaptor(embedding)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        check_batch(images)
        out = self.student_forward(images)
        z_s = self.project(out.embedding)
        return DistillOutput(
            logits=out.logits,
            losses={
                "ce": self.criterion(out.logits, target),
                "rsd": self.cfg.weight
                * global_rsd_loss(
                    z_s,
                    teacher.embedding,
                    self.cfg.kappa,
                    self.cfg.global_batch,
                    self.cfg.reduction,
                    self.cfg.reference_dim,
                ),
            },
        )


@dataclass
class RSDLogitsConfig(MethodConfig):
    weight: float = 0.02
    """Weight of the summed loss on logits; 0.02 as in the RSD authors' development code (BarlowKD)."""
    kappa: float = 0.01
    global_batch: bool = False

    def validate(self) -> None:
        _check_common(self)


@register_method("rsd_logits")
class RSDLogits(Distiller):
    """RSD as a logit distiller: the redundancy-suppression loss between student and teacher logits."""

    config_cls = RSDLogitsConfig
    min_batch_size = 2
    teacher_outputs = ("logits",)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        check_batch(images)
        out = self.student_forward(images)
        return DistillOutput(
            logits=out.logits,
            losses={
                "ce": self.criterion(out.logits, target),
                "rsd": self.cfg.weight
                * global_rsd_loss(out.logits, teacher.logits, self.cfg.kappa, self.cfg.global_batch),
            },
        )
