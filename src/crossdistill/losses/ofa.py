"""The OFA (One-for-All KD, Hao et al., NeurIPS 2023) loss, as the official code computes it.

With ``p_s = softmax(z_s / T)``, ``p_t = softmax(z_t / T)`` and ``m`` the one-hot mask of the
target class (the argmax of a soft / mixup / smoothed target)::

    L = mean_b  sum_c  -[(p_t + m)^eps - m]_c * log p_s,c

The weights are ``(1 + p_t,y)^eps - 1`` on the target class and ``p_t,c^eps`` on the others;
``eps > 1`` strengthens the target class. For ``eps = 1`` the weights are ``p_t`` and the loss is
the soft-target cross-entropy ``-sum_c p_t,c log p_s,c = KL(p_t || p_s) + H(p_t)`` (plain KD at
temperature T without the T^2 factor, plus the teacher entropy, which has no gradient), whatever
the target. There is no T^2 factor.

``log p_s`` is computed with ``log_softmax`` rather than the official ``torch.log(softmax(.))``:
the two agree to float32 rounding (relative differences ~1e-7) wherever the official form is
finite, and ``log_softmax`` stays finite when a class probability underflows to 0 (logit gaps
above ~100 in fp32), where ``torch.log`` gives ``-inf`` and the loss becomes ``inf`` or NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dkd import hard_labels


def ofa_target_mask(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot [B, K] mask of the target class: ``target`` is class indices [B] or a soft label [B, K]
    (mixup/cutmix/label smoothing), whose argmax is taken, as in the official code."""
    labels = hard_labels(target, num_classes)
    # scatter rather than F.one_hot, which checks the labels' range on the host: a GPU sync per step
    return torch.zeros(labels.shape[0], num_classes, dtype=torch.long, device=labels.device).scatter_(
        1, labels[:, None], 1
    )


def ofa_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target_mask: torch.Tensor,
    eps: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Unweighted OFA loss of student logits [B, K] against teacher logits [B, K].

    ``target_mask`` is the one-hot [B, K] mask of the target class (see :func:`ofa_target_mask`).
    Computed in float32 (float64 when the student logits are float64) whatever the autocast state.
    The teacher side carries no gradient in practice (the teacher runs under no_grad), but the
    function does not detach it.
    """
    if logits_student.ndim != 2 or logits_student.shape != logits_teacher.shape:
        raise ValueError(
            f"ofa_loss expects student and teacher logits of the same shape [B, K], got "
            f"{tuple(logits_student.shape)} and {tuple(logits_teacher.shape)}"
        )
    if target_mask.shape != logits_student.shape:
        raise ValueError(
            f"ofa_loss: target_mask {tuple(target_mask.shape)} must match the logits {tuple(logits_student.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"ofa_loss: temperature must be > 0, got {temperature}")
    dtype = torch.float64 if logits_student.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        log_p_s = F.log_softmax(logits_student.to(dtype) / temperature, dim=1)
        p_t = F.softmax(logits_teacher.to(dtype) / temperature, dim=1)
        mask = target_mask.to(dtype)
        weight = (p_t + mask).pow(eps) - mask
        return (-(weight * log_p_s)).sum(dim=-1).mean()
