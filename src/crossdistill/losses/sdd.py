"""The SDD losses (Scale Decoupled Distillation, Wei, Luo, Luo, CVPR 2024), as the official code computes them.

SDD pools the last feature map at several scales (default 1, 2 and 4: 1 + 4 + 16 = 21
regions), passes every region through the classifier to get local logits, and applies a
logit loss to each region of student and teacher. Each region's term is weighted:

* the global region (the scale-1 region, always region 0) has weight 1;
* a local region is **consistent** when the teacher's prediction on it is right exactly
  when the teacher's global prediction is right (both right or both wrong; "right" means
  ``argmax == ground-truth label``); weight 1;
* otherwise it is **complementary** (global right and local wrong, or global wrong and local
  right); weight ``complementary_weight`` (2 in the official code; the paper's beta in
  ``L_SDD = D_con + beta * D_com``).

The loss is ``sum_{b,n} w[b, n] * l[b, n] / (B * N)``: a per-region loss ``l`` (summed
over classes, not averaged over the batch), weighted, summed and divided by the number of
rows ``B * N``. The weights are not renormalised.

Where each piece is in the official code (github shicaiwei123/SDD-CVPR2024):

* pooling: ``mdistiller/models/{cifar,imagenet}/utils.py`` ``SPP``, lines 5-39: the map is
  adaptive-average-pooled to 4x4 and the 2x2 and 1x1 grids are pooled *from that 4x4 grid*;
  the regions are concatenated 1x1, 2x2, 4x4, each grid row-major (``torch.flatten``);
* region logits: the model's own ``fc`` on every pooled vector (e.g. ``models/cifar/resnet.py``
  lines 202-209);
* SD-KD: ``mdistiller/distillers/KD.py`` ``sdd_kd_loss``, lines 16-98 (per-row
  ``T^2 * KL`` summed over classes, line 38; split lines 42-81; weights 1/1/2/2 lines 87-90;
  ``/ target_r.shape[0]`` = ``/ (B * N)``, line 92);
* SD-DKD: ``mdistiller/distillers/SDD_DKD.py`` ``dkd_loss`` (lines 9-36; per row, divided by
  the ``B * N`` rows, lines 20 and 31) and ``multi_dkd`` (lines 39-124; weights lines 112-118,
  then a plain sum).

Differences from the official code, all numerically neutral for finite inputs: the DKD
binary probabilities come from log-sum-exps (as :func:`crossdistill.losses.dkd.dkd_loss`)
instead of ``log`` of summed softmax probabilities, and the non-target distribution drops the
target class instead of subtracting 1000 from its logit. The official code replaces a
non-finite loss by 0 and prints "inf" (``KD.py`` line 94, ``SDD_DKD.py`` line 120); here a
non-finite loss is returned as is, and the engine's ``train.check_finite`` skips the step.

Soft targets [B, K] (mixup/cutmix) give the label by ``argmax``, as the DKD loss does.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .dkd import decouple_target, hard_labels
from .kd import loss_dtype

__all__ = [
    "COMPLEMENTARY_WEIGHT",
    "DEFAULT_SCALES",
    "POOL_GRID",
    "check_scales",
    "complementary_mask",
    "num_regions",
    "region_pool",
    "sdd_dkd_loss",
    "sdd_kd_loss",
    "sdd_region_weights",
]

DEFAULT_SCALES: tuple[int, ...] = (1, 2, 4)
"""Official ``--M`` default ``'[1,2,4]'`` (``train.py`` line 184, ``train_origin.py``)."""
COMPLEMENTARY_WEIGHT = 2.0
"""Weight of complementary regions (``KD.py`` lines 89-90, ``SDD_DKD.py`` lines 114-115)."""
POOL_GRID = 4
"""The official SPP pools every map to 4x4 first and derives the coarser grids from it."""


def check_scales(scales: Sequence[int], pool_grid: int | None = POOL_GRID) -> tuple[int, ...]:
    """Validate ``scales`` (strictly increasing positive ints starting with 1) against ``pool_grid``."""
    scales = tuple(scales)
    if not scales:
        raise ValueError("SDD needs at least one scale, e.g. (1, 2, 4)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"SDD scales must be positive integers, got {scales}")
    if scales[0] != 1:
        raise ValueError(f"SDD scales must start with 1 (region 0 is the global region), got {scales}")
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise ValueError(f"SDD scales must be strictly increasing, got {scales}")
    if pool_grid is not None and (pool_grid < 1 or scales[-1] > pool_grid):
        raise ValueError(f"SDD pool_grid must be >= the largest scale ({scales[-1]}), got {pool_grid}")
    return scales


def num_regions(scales: Sequence[int]) -> int:
    """Number of regions ``sum(s * s)``: 1, 5 and 21 for (1,), (1, 2) and (1, 2, 4)."""
    return sum(s * s for s in scales)


def region_pool(
    feature_map: torch.Tensor, scales: Sequence[int] = DEFAULT_SCALES, pool_grid: int | None = POOL_GRID
) -> torch.Tensor:
    """Multi-scale average pooling of a map [B, C, H, W] -> region vectors [B, N, C].

    Regions are ordered scale by scale (as given), each ``s x s`` grid row-major, so region 0
    is the scale-1 (global) region. With ``pool_grid`` (official: 4) the map is first
    adaptive-average-pooled to ``pool_grid x pool_grid`` and every scale is pooled from that
    grid (official SPP); with ``None`` every scale is pooled from the map directly. The two
    agree when H and W are multiples of ``pool_grid``. Keeps the input dtype.
    """
    if feature_map.ndim != 4:
        raise ValueError(f"region_pool expects a [B, C, H, W] map, got shape {tuple(feature_map.shape)}")
    scales = check_scales(scales, pool_grid)
    source = feature_map if pool_grid is None else F.adaptive_avg_pool2d(feature_map, pool_grid)
    grids = [F.adaptive_avg_pool2d(source, s).flatten(2) for s in scales]  # [B, C, s*s] each
    return torch.cat(grids, dim=2).transpose(1, 2)


def _check_regions(name: str, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> None:
    if student.ndim != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"{name} expects student and teacher region logits of one shape [B, N, K], got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if target.shape[0] != student.shape[0]:
        raise ValueError(f"{name}: {student.shape[0]} samples of region logits but {target.shape[0]} targets")


def complementary_mask(region_logits_teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: True where the teacher's region prediction is right and its global one wrong, or
    the reverse. Region 0 (global) is never complementary."""
    labels = hard_labels(target, region_logits_teacher.shape[-1])
    correct = region_logits_teacher.argmax(dim=-1) == labels[:, None]  # [B, N]
    mask = correct != correct[:, :1]
    mask[:, 0] = False
    return mask


def sdd_region_weights(
    region_logits_teacher: torch.Tensor,
    target: torch.Tensor,
    complementary_weight: float = COMPLEMENTARY_WEIGHT,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """[B, N] weights: ``complementary_weight`` on complementary regions, 1 elsewhere (global included), in
    ``dtype`` (default: the teacher logits' loss dtype; the losses pass theirs, so a float64 loss is not
    rounded to a float32 teacher's precision)."""
    mask = complementary_mask(region_logits_teacher, target)
    ones = torch.ones(mask.shape, dtype=dtype or loss_dtype(region_logits_teacher), device=mask.device)
    return torch.where(mask, ones * complementary_weight, ones)


def _row_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _weighted_mean(per_region: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_region * weights).sum() / per_region.numel()


def sdd_kd_loss(
    region_logits_student: torch.Tensor,
    region_logits_teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
    complementary_weight: float = COMPLEMENTARY_WEIGHT,
) -> torch.Tensor:
    """Unweighted SD-KD loss on region logits [B, N, K] (region 0 global) with targets [B] or [B, K].

    ``sum_{b,n} w[b,n] * T^2 * KL(softmax(t[b,n]/T) || softmax(s[b,n]/T)) / (B * N)``.
    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    """
    _check_regions("sdd_kd_loss", region_logits_student, region_logits_teacher, target)
    if not temperature > 0:
        raise ValueError(f"sdd_kd_loss: temperature must be > 0, got {temperature}")
    dtype = loss_dtype(region_logits_student, region_logits_teacher)
    with torch.autocast(device_type=region_logits_student.device.type, enabled=False):
        zs = region_logits_student.to(dtype) / temperature
        zt = region_logits_teacher.to(dtype) / temperature
        per_region = _row_kl(torch.log_softmax(zt, dim=-1), torch.log_softmax(zs, dim=-1)) * temperature**2
        weights = sdd_region_weights(region_logits_teacher, target, complementary_weight, dtype)
        return _weighted_mean(per_region, weights)


def sdd_dkd_loss(
    region_logits_student: torch.Tensor,
    region_logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    complementary_weight: float = COMPLEMENTARY_WEIGHT,
) -> torch.Tensor:
    """Unweighted SD-DKD loss on region logits [B, N, K] (region 0 global) with targets [B] or [B, K].

    ``sum_{b,n} w[b,n] * T^2 * (alpha * TCKD[b,n] + beta * NCKD[b,n]) / (B * N)``, with the
    ground-truth label of sample ``b`` as the target class of all its regions.
    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    """
    _check_regions("sdd_dkd_loss", region_logits_student, region_logits_teacher, target)
    classes = region_logits_student.shape[-1]
    if classes < 2:
        raise ValueError(f"sdd_dkd_loss needs at least 2 classes, got {classes}")
    if not temperature > 0:
        raise ValueError(f"sdd_dkd_loss: temperature must be > 0, got {temperature}")
    labels = hard_labels(target, classes).to(region_logits_student.device)
    dtype = loss_dtype(region_logits_student, region_logits_teacher)
    with torch.autocast(device_type=region_logits_student.device.type, enabled=False):
        binary_s, other_s = decouple_target(region_logits_student.to(dtype) / temperature, labels)
        binary_t, other_t = decouple_target(region_logits_teacher.to(dtype) / temperature, labels)
        tckd = _row_kl(binary_t, binary_s)
        nckd = _row_kl(torch.log_softmax(other_t, dim=-1), torch.log_softmax(other_s, dim=-1))
        per_region = (alpha * tckd + beta * nckd) * temperature**2
        weights = sdd_region_weights(region_logits_teacher, target, complementary_weight, dtype)
        return _weighted_mean(per_region, weights)
