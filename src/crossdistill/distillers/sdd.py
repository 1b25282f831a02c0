"""SDD: Scale Decoupled Distillation (Wei, Luo, Luo, CVPR 2024), as the official code runs it.

Methods ``sd_kd`` and ``sd_dkd``:

    loss = ce_weight * CE(student logits, y)
         + weight * warmup(epoch) * SDD(region logits of student, region logits of teacher, y)

with SDD the multi-scale, consistent/complementary-weighted KD or DKD of
:mod:`crossdistill.losses.sdd` (``warmup`` only for ``sd_dkd``).

**Region logits.** One forward of each model gives its final feature map (the adapter's
``FINAL`` stage: ``forward_features``, before global pooling). The map is average-pooled at
every scale (official SPP: first to 4x4, then 1x1, 2x2, 4x4 from that grid), and each pooled
C-vector goes through the model's *own* head, ``forward_head``: the vector is presented as a
constant input in the head's own layout (a 1x1 map for CNNs, NCHW or NHWC as the model's
``output_fmt`` says; a sequence of ``prefix + 1`` identical tokens for token models), so the
head's global pooling (average, max, class token) returns the vector itself and the rest of the
head applies exactly as in a normal forward: ``fc`` for ResNets; the head LayerNorm of ConvNeXt;
``conv_head`` + activation of MobileNetV3; ``fc_norm`` then ``head`` for ViTs. For models whose
head is average pooling + the rest, the scale-1 region logits equal the model's logits when the
map's sides are multiples of ``pool_grid`` (see below). No parameters are added:
``count_method_parameters`` reports 0 extra.

**Token models.** ViT/DeiT (and EVA, etc.): ``forward_features`` returns all tokens after the
final ``norm``; the class/register tokens (``num_prefix_tokens``) are dropped, the patch tokens
are reshaped to their 2-D grid (from ``patch_embed.patch_size`` and the input size), pooled, and
the pooled vectors go through ``fc_norm`` (identity for class-token models, whose ``norm`` was
already applied to every token) and ``head``, which mirrors ``forward_head``. For a class-token
model (DeiT, ``vit_*_224``) this applies a classifier trained on the class token to pooled
patch tokens, including the scale-1 "global" region; the model's own logits (class token) are
used only for the CE term. Mixer/ResMLP: no prefix tokens, grid from ``stem.patch_size``.
Swin: its NHWC final map (already ``norm``-ed) is pooled like a CNN map and the head gets
``[M, 1, 1, C]``.

**scales: [1]** reproduces the official ``M == '[1]'`` branch: plain KD/DKD on the models'
logits (``KD.py`` line 145, ``SDD_DKD.py`` line 167).

The pooled map is the one the official SDD models pool: the final activation (``relu(feat4)``,
``mdistiller/models/imagenet/resnet.py`` ``ResNet_SDD`` lines 328-330, ``mobilenetv2.py``
``MobileNetV2_SDD`` lines 53-55), which is timm's ``forward_features`` output. With the 4x4 detour
the scale-1 region of a 7x7 map (ResNet at 224 px) is a weighted, not the plain, average of the
map, so its logits differ slightly from the model's own, exactly as in the official code
(``pool_grid: null`` makes them equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..losses.dkd import dkd_loss, dkd_warmup_factor
from ..losses.kd import kd_loss
from ..losses.sdd import (
    COMPLEMENTARY_WEIGHT,
    DEFAULT_SCALES,
    POOL_GRID,
    check_scales,
    region_pool,
    sdd_dkd_loss,
    sdd_kd_loss,
)
from ..models import FINAL, TeacherOutputs, TeacherRequest
from ..models.adapter import num_prefix_tokens
from .base import Distiller, DistillOutput, MethodConfig, register_method
from .kd import check_range

__all__ = ["SDDKDConfig", "SDKDConfig", "region_logits", "token_grid"]


# ---------------------------------------------------------------- region logits


def token_grid(model: nn.Module, num_tokens: int, input_size: Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) grid of ``num_tokens`` patch tokens of a token model for an input of ``input_size``."""
    embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
    patch = getattr(embed, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid = (int(input_size[0]) // ph, int(input_size[1]) // pw)
        if grid[0] * grid[1] == num_tokens:
            return grid
    grid_size = getattr(embed, "grid_size", None)
    if grid_size is not None and math.prod(grid_size) == num_tokens:
        return int(grid_size[0]), int(grid_size[1])
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    raise ValueError(
        f"{type(model).__name__}: cannot arrange {num_tokens} patch tokens on a 2-D grid for input "
        f"{tuple(input_size)}; SDD needs the patch grid of token models"
    )


def region_logits(
    model: nn.Module,
    features: torch.Tensor,
    input_size: Sequence[int],
    scales: Sequence[int] = DEFAULT_SCALES,
    pool_grid: int | None = POOL_GRID,
) -> torch.Tensor:
    """Logits [B, N, K] of the ``N`` multi-scale regions of ``features`` through ``model``'s own head.

    ``features`` is the model's final feature map as the adapter's ``FINAL`` stage gives it:
    [B, C, H, W] for CNNs and Swin (NCHW), [B, prefix + L, C] for ViT/DeiT/Mixer/ResMLP.
    ``input_size`` is the (H, W) of the input image (to find the patch grid of token models).
    """
    if features.ndim == 3:
        prefix = num_prefix_tokens(model)
        tokens = features[:, prefix:]
        batch, length, channels = tokens.shape
        rows, cols = token_grid(model, length, input_size)
        fmap = tokens.transpose(1, 2).reshape(batch, channels, rows, cols)
        regions = region_pool(fmap, scales, pool_grid)  # [B, N, C]
        count = regions.shape[1]
        head_input = regions.reshape(batch * count, 1, channels).expand(-1, prefix + 1, -1).contiguous()
    elif features.ndim == 4:
        regions = region_pool(features, scales, pool_grid)
        batch, count, channels = regions.shape
        flat = regions.reshape(batch * count, channels)
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            head_input = flat[:, None, None, :]
        else:
            head_input = flat[:, :, None, None]
    else:
        raise ValueError(f"SDD needs a final feature map [B, C, H, W] or tokens [B, L, C], got {tuple(features.shape)}")
    logits = model.forward_head(head_input)
    if logits.ndim != 2 or logits.shape[0] != batch * count:
        raise ValueError(
            f"{type(model).__name__}.forward_head gave {tuple(logits.shape)} for {batch * count} pooled regions; "
            "SDD needs a head that maps one pooled vector to one row of logits"
        )
    return logits.view(batch, count, -1)


# ---------------------------------------------------------------- configs


def _check_sdd(cfg) -> None:
    try:
        scales = check_scales(cfg.scales, pool_grid=None)
    except ValueError as err:
        raise ConfigError(f"config key 'method_args.scales': {err}") from None
    if cfg.pool_grid is not None and cfg.pool_grid < scales[-1]:
        raise ConfigError(
            f"config key 'method_args.pool_grid': must be >= the largest scale ({scales[-1]}) or null, "
            f"got {cfg.pool_grid}"
        )
    check_range("complementary_weight", cfg.complementary_weight)
    check_range("temperature", cfg.temperature, strict=True)
    check_range("weight", cfg.weight)
    check_range("ce_weight", cfg.ce_weight)


@dataclass
class SDDRegionConfig(MethodConfig):
    """The scale-decoupling settings both SDD methods share (subclasses add temperature and weights)."""

    scales: tuple[int, ...] = DEFAULT_SCALES
    """Pooling scales; must start with 1. Official ``--M`` default ``[1,2,4]`` (``train.py`` line 184)."""
    complementary_weight: float = COMPLEMENTARY_WEIGHT
    """Weight of complementary regions (paper's beta; ``KD.py`` lines 89-90, ``SDD_DKD.py`` lines 114-115);
    consistent ones get 1."""
    pool_grid: int | None = POOL_GRID
    """Pool the map to this grid first and every scale from it, as the official SPP (4x4); null: pool
    every scale from the map directly."""

    def validate(self) -> None:
        _check_sdd(self)


@dataclass
class SDKDConfig(SDDRegionConfig):
    """SD-KD hyper-parameters; defaults are what the official SDD code runs (its configs set no KD section,
    so mdistiller's ``CFG.KD`` defaults apply: ``mdistiller/engine/cfg.py`` lines 60-64)."""

    temperature: float = 4.0
    """T (``CFG.KD.TEMPERATURE``, cfg.py line 61). Each region's KL is multiplied by T^2."""
    weight: float = 0.9
    """Weight of the SDD term (``CFG.KD.LOSS.KD_WEIGHT``, cfg.py line 64; applied in ``KD.py`` line 155)."""
    ce_weight: float = 0.1
    """Weight of the classification term (``CFG.KD.LOSS.CE_WEIGHT``, cfg.py line 63)."""


@dataclass
class SDDKDConfig(SDDRegionConfig):
    """SD-DKD hyper-parameters; defaults are mdistiller's ``CFG.DKD`` (``engine/cfg.py`` lines 162-167),
    which the official SDD configs override per pair (ImageNet R34->R18: beta 0.5, T 1; R50->MV1: beta 2, T 1)."""

    alpha: float = 1.0
    """Weight of TCKD (``CFG.DKD.ALPHA``, cfg.py line 164)."""
    beta: float = 8.0
    """Weight of NCKD (``CFG.DKD.BETA``, cfg.py line 165)."""
    temperature: float = 4.0
    """T (``CFG.DKD.T``, cfg.py line 166). Both terms are multiplied by T^2."""
    weight: float = 1.0
    """Weight of the SDD term (the official code has none: 1)."""
    ce_weight: float = 1.0
    """Weight of the classification term (``CFG.DKD.CE_WEIGHT``, cfg.py line 163)."""
    warmup_epochs: int = 0
    """Ramp the SDD term in as ``min((epoch + 1) / warmup_epochs, 1)``; 0 = off. The official ImageNet
    ``train.py`` (line 195) fixes ``cfg.warmup = 1.0``, i.e. no warm-up; its CIFAR ``train_origin.py``
    uses ``--warmup 20`` (line 198)."""

    def validate(self) -> None:
        _check_sdd(self)
        check_range("alpha", self.alpha)
        check_range("beta", self.beta)
        if self.warmup_epochs < 0:
            raise ConfigError(f"config key 'method_args.warmup_epochs': must be >= 0, got {self.warmup_epochs}")


# ---------------------------------------------------------------- methods


class _SDDistiller(Distiller):
    """Shared forward: one pass of each model to its final map, region logits through each model's head."""

    def region_loss(self, regions_student, regions_teacher, target) -> torch.Tensor:
        raise NotImplementedError

    def global_loss(self, logits_student, logits_teacher, target) -> torch.Tensor:
        raise NotImplementedError

    def term_factor(self) -> float:
        return 1.0

    @property
    def global_only(self) -> bool:
        """The official ``M == '[1]'`` branch: the plain loss on the models' logits, no regions."""
        return tuple(self.cfg.scales) == (1,)

    def teacher_request(self) -> TeacherRequest:
        return TeacherRequest(logits=True) if self.global_only else TeacherRequest(stages=(FINAL,))

    def compute_teacher(self, images: torch.Tensor) -> TeacherOutputs:
        """Something unusual from the teacher: the logits of its final map's multi-scale regions,
        through its own head (``extra["regions"]``, [B, N, K]); with scales [1], its logits."""
        if self.global_only:
            return super().compute_teacher(images)
        final_map = self.teacher.outputs(images, self.teacher_request()).stages[0]
        cfg = self.cfg
        regions = region_logits(self.teacher.model, final_map, images.shape[-2:], tuple(cfg.scales), cfg.pool_grid)
        return TeacherOutputs(extra={"regions": regions})

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        cfg = self.cfg
        if self.global_only:
            logits = self.student_forward(images).logits
            distill = self.global_loss(logits, teacher.logits, target)
        else:
            out = self.student_forward(images, stages=[FINAL])
            logits = out.logits
            regions_student = region_logits(
                self.student, out.stages[0], images.shape[-2:], tuple(cfg.scales), cfg.pool_grid
            )
            distill = self.region_loss(regions_student, teacher.extra["regions"], target)
        return DistillOutput(
            logits=logits,
            losses={
                "ce": cfg.ce_weight * self.criterion(logits, target),
                "sdd": cfg.weight * self.term_factor() * distill,
            },
        )


@register_method("sd_kd")
class SDKD(_SDDistiller):
    config_cls = SDKDConfig

    def region_loss(self, regions_student, regions_teacher, target):
        cfg = self.cfg
        return sdd_kd_loss(regions_student, regions_teacher, target, cfg.temperature, cfg.complementary_weight)

    def global_loss(self, logits_student, logits_teacher, target):
        return kd_loss(logits_student, logits_teacher, self.cfg.temperature)


@register_method("sd_dkd")
class SDDKD(_SDDistiller):
    config_cls = SDDKDConfig

    def __init__(self, student, teacher, cfg: SDDKDConfig, criterion=None):
        super().__init__(student, teacher, cfg, criterion)
        self.warmup_factor = dkd_warmup_factor(0, cfg.warmup_epochs)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.warmup_factor = dkd_warmup_factor(epoch, self.cfg.warmup_epochs)

    def term_factor(self) -> float:
        return self.warmup_factor

    def region_loss(self, regions_student, regions_teacher, target):
        cfg = self.cfg
        return sdd_dkd_loss(
            regions_student, regions_teacher, target, cfg.alpha, cfg.beta, cfg.temperature, cfg.complementary_weight
        )

    def global_loss(self, logits_student, logits_teacher, target):
        cfg = self.cfg
        return dkd_loss(logits_student, logits_teacher, target, cfg.alpha, cfg.beta, cfg.temperature)
