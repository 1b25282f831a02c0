"""CC (correlation congruence, Peng et al., ICCV 2019) across architectures, as the OFA code runs it.

Loss = w_gt * CE(student logits, y) + weight * scale * cc_loss(embed_s(student embedding), embed_t(teacher embedding)).

* Features: the pre-logits embeddings of both models (OFA's ``feat[-1]``), each through its own trainable
  ``Linear`` to ``feat_dim`` (OFA's ``LinearEmbed``, PyTorch's default init). Both embeddings are trainable
  modules of the distiller (``embed_s``, ``embed_t``): the teacher stays frozen, its embedding layer trains
  with the student, is counted by ``crossdistill params`` and is dropped from the exported student.
* The loss (:mod:`crossdistill.losses.cc`) is the code's, which differs from the paper's formula (see there).
* Defaults: OFA ``train.py`` flags ``--correlation-scale 0.02``, ``--correlation-feat-dim 128``,
  ``--kd-loss-weight 1``, ``--gt-loss-weight 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..losses.cc import cc_loss
from ..models import embedding_dim
from .base import MethodConfig, register_method
from .kd import check_range
from .rkd import EmbeddingDistiller


@dataclass
class CCConfig(MethodConfig):
    """CC hyper-parameters; defaults are the OFA ``train.py`` flags."""

    scale: float = 0.02
    """Weight of the correlation term (``--correlation-scale``)."""
    feat_dim: int = 128
    """Width both embeddings are mapped to (``--correlation-feat-dim``)."""
    weight: float = 1.0
    """A further factor on the correlation term (``--kd-loss-weight``)."""
    w_gt: float = 1.0
    """Weight of the classification term (``--gt-loss-weight``)."""

    def validate(self) -> None:
        for key in ("scale", "weight", "w_gt"):
            check_range(key, getattr(self, key))
        if self.feat_dim < 1:
            raise ConfigError(f"config key 'method_args.feat_dim': must be >= 1, got {self.feat_dim}")


@register_method("cc")
class CC(EmbeddingDistiller):
    config_cls = CCConfig
    term = "cc"

    def __init__(self, student, teacher, cfg: CCConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.embed_s = nn.Linear(embedding_dim(student), cfg.feat_dim)
        self.embed_t = nn.Linear(teacher.dim, cfg.feat_dim)

    def distill_loss(self, student_embedding, teacher_embedding):
        return self.cfg.scale * cc_loss(self.embed_s(student_embedding), self.embed_t(teacher_embedding))
