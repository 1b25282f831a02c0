"""The KD loss (Hinton et al., 2015), as the OFA/RSD code computes it.

``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``: the KL divergence is summed over
classes and averaged over the batch (``batchmean``), then multiplied by ``T^2``
(OFA ``distillers/utils.py`` ``kd_loss``, lines 161-166; RSD's copy is identical).
"""

from __future__ import annotations

import torch

__all__ = ["check_logit_pair", "kd_loss", "loss_dtype"]


def check_logit_pair(name: str, logits_student: torch.Tensor, logits_teacher: torch.Tensor) -> None:
    """Raise ValueError unless both logits are [B, K] with the same shape."""
    if logits_student.ndim != 2 or logits_teacher.ndim != 2:
        raise ValueError(
            f"{name} expects 2-D logits [B, K], got {tuple(logits_student.shape)} and {tuple(logits_teacher.shape)}"
        )
    if logits_student.shape != logits_teacher.shape:
        raise ValueError(
            f"{name}: student logits {tuple(logits_student.shape)} and teacher logits "
            f"{tuple(logits_teacher.shape)} differ in shape; teacher and student must have the same classes"
        )


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (never a half type)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Unweighted KD loss between student and teacher logits [B, K]: ``T^2 * batchmean KL(p_t || p_s)``.

    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    """
    check_logit_pair("kd_loss", logits_student, logits_teacher)
    if not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    dtype = loss_dtype(logits_student, logits_teacher)
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        log_p_s = torch.log_softmax(logits_student.to(dtype) / temperature, dim=1)
        log_p_t = torch.log_softmax(logits_teacher.to(dtype) / temperature, dim=1)
        # p_t * (log p_t - log p_s): both logs are finite, so a class whose teacher probability
        # underflows to 0 contributes exactly 0, as F.kl_div's xlogy does.
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
        return kl * temperature**2
