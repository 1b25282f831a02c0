"""The AT loss (activation-based attention transfer, Zagoruyko & Komodakis, ICLR 2017), as the official code
computes it, with one step for models whose grids differ.

For one stage, on feature maps ``f`` ([B, C, H, W]):

* attention map: ``a = mean over channels of |f|^p`` ([B, H, W]), flattened and L2-normalised per sample
  (``F.normalize``, eps 1e-12);
* ``loss = mean over samples and positions of (a_s - a_t)^2``.

The official code (``szagoruyko/attention-transfer`` ``utils.at_loss``, the same in mdistiller's
``distillers/AT.py``) writes ``f.pow(p)``; for the default ``p = 2`` that is ``|f|^p``, and ``|f|^p`` is the
paper's definition for any ``p``. The paper writes the loss as ``beta/2 * sum_j |a_s/|a_s| - a_t/|a_t||_p``;
the code (and the ``beta = 1000`` its experiments use) takes the mean of the squared differences above,
``beta * sum over stages``: the distiller applies that weight and sum.

Across architectures the two grids may differ (a ResNet stage at 56x56 against a ViT's 14x14 patches).
The student's attention map is resized to the teacher's grid before it is normalised (the comparison
happens on the teacher's grid, as for FitNet): by area averaging where neither side grows (an average of
the energy ``|f|^p`` over each teacher cell), else bilinearly (``align_corners=False``). mdistiller instead
average-pools the larger *feature map* (student or teacher) to the smaller square grid before squaring;
the official code has equal grids only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd import loss_dtype

__all__ = ["at_loss", "attention_map", "resize_attention"]


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W]: the mean over channels of ``|f|^p`` (not normalised)."""
    return feat.abs().pow(p).mean(dim=1)


def resize_attention(attention: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W]: area averaging where neither side grows, else bilinear (module docstring)."""
    if tuple(attention.shape[-2:]) == tuple(size):
        return attention
    shrinks = attention.shape[-2] >= size[0] and attention.shape[-1] >= size[1]
    mode = {"mode": "area"} if shrinks else {"mode": "bilinear", "align_corners": False}
    return F.interpolate(attention.unsqueeze(1), size=tuple(size), **mode).squeeze(1)


def at_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Unweighted AT loss of one stage between a student and a teacher feature map ([B, C, H, W] each; channels
    and grids may differ, the batch may not).

    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    """
    if student_feat.ndim != 4 or teacher_feat.ndim != 4:
        raise ValueError(
            f"at_loss expects feature maps [B, C, H, W], got {tuple(student_feat.shape)} and "
            f"{tuple(teacher_feat.shape)}; turn token features into maps first (crossdistill.models.aligners)"
        )
    if student_feat.shape[0] != teacher_feat.shape[0]:
        raise ValueError(f"at_loss: student batch {student_feat.shape[0]} and teacher batch {teacher_feat.shape[0]}")
    if not p >= 1:  # below 1, |f|^p has an infinite slope at the zeros a ReLU produces: NaN gradients
        raise ValueError(f"at_loss: p must be >= 1, got {p}")
    dtype = loss_dtype(student_feat, teacher_feat)
    with torch.autocast(device_type=student_feat.device.type, enabled=False):
        a_t = attention_map(teacher_feat.to(dtype), p)
        a_s = resize_attention(attention_map(student_feat.to(dtype), p), a_t.shape[-2:])
        a_s, a_t = F.normalize(a_s.flatten(1), dim=1), F.normalize(a_t.flatten(1), dim=1)
        return (a_s - a_t).pow(2).mean()
