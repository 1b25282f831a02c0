"""The CRD loss (Tian et al., ICLR 2020, "Contrastive Representation Distillation"), as the CRD and OFA code compute it.

For an anchor embedding ``v`` (L2-normalised, [D]) and ``1 + K`` rows ``m_0 .. m_K`` of the *other* side's memory
bank (``m_0``: the anchor's own sample, the positive; ``m_1 .. m_K``: K samples of other classes, the negatives)::

    P_j = exp(<v, m_j> / T) / Z                                   (contrast_exp, divided by Z)

``Z`` is a normalisation constant the caller fixes once, on the first batch (``mean(exp(<v, m>/T)) * N``, N the
training-set size), so that ``P`` approximates ``exp(<v, m>/T) / sum over the N samples``. The NCE loss with a
uniform noise distribution ``Pn = 1/N`` over the samples (``crd_nce_loss``)::

    h(P) = P / (P + K * Pn + eps)
    loss = -( sum_i log h(P_i0) + sum_i sum_{j>=1} log(1 - h(P_ij)) ) / B

with ``1 - h(P) = K * Pn / (P + K * Pn + eps)`` written as the code writes it (eps = 1e-7 in the denominator only).
CRD sums this loss over both directions (student anchor against the teacher bank, teacher anchor against the
student bank).
"""

from __future__ import annotations

import torch

from .kd import loss_dtype

__all__ = ["CRD_EPS", "contrast_exp", "crd_nce_loss"]

CRD_EPS = 1e-7
"""The code's eps in the NCE denominators."""


def contrast_exp(anchor: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """``exp(<anchor_i, rows_ij> / T)`` [B, 1 + K] for anchors [B, D] and memory rows [B, 1 + K, D] (not yet
    divided by Z). Computed in float32 (float64 when given float64) whatever the input dtype or autocast state."""
    if anchor.ndim != 2 or rows.ndim != 3 or rows.shape[0] != anchor.shape[0] or rows.shape[2] != anchor.shape[1]:
        raise ValueError(
            f"contrast_exp: anchors {tuple(anchor.shape)} and memory rows {tuple(rows.shape)} do not match "
            "([B, D] and [B, 1 + K, D])"
        )
    dtype = loss_dtype(anchor, rows)
    with torch.autocast(anchor.device.type, enabled=False):
        dots = torch.bmm(rows.to(dtype), anchor.to(dtype).unsqueeze(2)).squeeze(2)
        return torch.exp(dots / temperature)


def crd_nce_loss(probs: torch.Tensor, num_data: int, eps: float = CRD_EPS) -> torch.Tensor:
    """The NCE loss of the module doc for ``probs`` [B, 1 + K] (column 0 the positive, already divided by Z),
    with the uniform noise probability ``1 / num_data``."""
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"crd_nce_loss: expected scores [B, 1 + K] with K >= 1, got {tuple(probs.shape)}")
    dtype = loss_dtype(probs)
    with torch.autocast(probs.device.type, enabled=False):
        probs = probs.to(dtype)
        noise = (probs.shape[1] - 1) / float(num_data)  # K * Pn
        positive, negatives = probs[:, 0], probs[:, 1:]
        log_positive = torch.log(positive / (positive + noise + eps))
        log_negatives = torch.log(noise / (negatives + noise + eps))
        return -(log_positive.sum() + log_negatives.sum()) / probs.shape[0]
