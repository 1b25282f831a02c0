"""The FitNet hint loss (Romero et al., 2015), as the OFA/RSD code computes it.

``F.mse_loss(aligned_student, teacher)`` with the default ``reduction='mean'``: the squared
error averaged over *every* element (batch, channels/tokens and positions), one value per
stage (OFA ``distillers/fitnet.py``, line 48; RSD ``distillers/fitnet.py``, line 127). The
distiller sums the stages and applies the weight; this function is unweighted.
"""

from __future__ import annotations

import torch

__all__ = ["fitnet_loss"]


def fitnet_loss(student_feat_aligned: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Unweighted FitNet loss: mean squared error between an aligned student feature and the teacher's.

    Both tensors must have the same shape (the aligner's job; no broadcasting). The teacher
    feature is a target: pass it detached (the frozen teacher gives it without autograd).
    Computed in float32 (float64 when either input is float64) whatever the input dtype or
    autocast state.
    """
    if student_feat_aligned.shape != teacher_feat.shape:
        raise ValueError(
            f"fitnet_loss: aligned student feature {tuple(student_feat_aligned.shape)} and teacher feature "
            f"{tuple(teacher_feat.shape)} differ in shape; align the student feature to the teacher's first "
            "(crossdistill.models.aligners)"
        )
    if student_feat_aligned.numel() == 0:
        raise ValueError(f"fitnet_loss: empty features {tuple(student_feat_aligned.shape)}")
    dtype = torch.float64 if torch.float64 in (student_feat_aligned.dtype, teacher_feat.dtype) else torch.float32
    with torch.autocast(device_type=student_feat_aligned.device.type, enabled=False):
        diff = student_feat_aligned.to(dtype) - teacher_feat.to(dtype)
        return diff.pow(2).mean()
