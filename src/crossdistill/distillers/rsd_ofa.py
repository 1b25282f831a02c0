"""RSD + OFA multi-stage: the redundancy-suppression loss at several student stages.

The RSD paper reports that replacing OFA's losses by RSD losses gives further gains. As the
authors' development code (``RRD``, compiled into the official repository) builds it:

* each student stage in ``stages`` gets an OFA branch projector (SepConv stack for CNN
  students, PatchMerging + ViT blocks for token students) that maps it to class logits, and
  the RSD loss correlates those branch logits with the teacher's logits;
* the final embedding ("stage -1") goes through an MLP projector (an AAD with expansion
  ``gamma``, 4 in that code) onto the teacher's embedding, with the same loss;
* total = CE + weight * sum of the stage losses (weight 0.01, kappa 0.01 in that code).

The paper gives no numbers for this variant; these defaults are the development code's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models import AADProjector, TeacherOutputs, TeacherRequest, embedding_dim
from ..models.ofa_branches import build_ofa_branches, ofa_stage_indices
from .base import Distiller, DistillOutput, MethodConfig, register_method
from .rsd import check_batch, global_rsd_loss


@dataclass
class RSDOFAConfig(MethodConfig):
    stages: tuple[int, ...] = (1, 2, 3, 4)
    """Student stages with an OFA branch (1..4 = the adapter's four default stages)."""
    embedding: bool = True
    """Also apply the loss on the final embedding through an AAD projector ("stage -1")."""
    weight: float = 0.01
    kappa: float = 0.01
    gamma: int = 4
    """Expansion of the embedding projector (4 in the development code, 2 in plain RSD)."""
    global_batch: bool = False
    img_size: int | None = None
    """Input size the token branches are sized for; default: the run's data.img_size."""

    def validate(self) -> None:
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"config key 'method_args.{key}': {message}")

        if any(s not in (1, 2, 3, 4) for s in self.stages) or len(set(self.stages)) != len(self.stages):
            fail("stages", f"distinct stage numbers in 1..4, got {list(self.stages)}")
        if not self.stages and not self.embedding:
            fail("stages", "no stage and no embedding: nothing to distil")
        if self.weight < 0:
            fail("weight", f"must be >= 0, got {self.weight}")
        if self.kappa < 0:
            fail("kappa", f"must be >= 0, got {self.kappa}")
        if self.gamma < 1:
            fail("gamma", f"must be >= 1, got {self.gamma}")


@register_method("rsd_ofa")
class RSDOFA(Distiller):
    config_cls = RSDOFAConfig
    min_batch_size = 2

    def __init__(self, student, teacher, cfg: RSDOFAConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.stage_indices = ofa_stage_indices(student, cfg.stages) if cfg.stages else []
        self.branches = build_ofa_branches(student, teacher.dim, None, cfg.stages, input_size=cfg.img_size)
        if cfg.embedding:
            self.aad = AADProjector(embedding_dim(student), teacher.dim, cfg.gamma)

    def teacher_request(self) -> TeacherRequest:
        # the stage branches are matched to the teacher's logits, the final embedding to its embedding
        return TeacherRequest(embedding=self.cfg.embedding, logits=bool(self.cfg.stages))

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        cfg: RSDOFAConfig = self.cfg
        check_batch(images)
        out = self.student_forward(images, stages=self.stage_indices)
        terms = [
            global_rsd_loss(branch(feature), teacher.logits, cfg.kappa, cfg.global_batch)
            for branch, feature in zip(self.branches, out.stages)
        ]
        if cfg.embedding:
            terms.append(global_rsd_loss(self.aad(out.embedding), teacher.embedding, cfg.kappa, cfg.global_batch))
        return DistillOutput(
            logits=out.logits,
            losses={"ce": self.criterion(out.logits, target), "rsd": cfg.weight * torch.stack(terms).sum()},
        )
