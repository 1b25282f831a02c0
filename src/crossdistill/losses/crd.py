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

__all__ = ["CRD_EPS", "FULL_BANK_RATIO", "bank_contrast_exp", "contrast_exp", "crd_nce_loss"]

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


FULL_BANK_RATIO = 16
""":func:`bank_contrast_exp` scores the whole bank when it has at most this many rows per scored row (1 + K)."""


def bank_contrast_exp(
    anchor: torch.Tensor, bank: torch.Tensor, sample: torch.Tensor, temperature: float, whole_bank: bool | None = None
) -> torch.Tensor:
    """``contrast_exp(anchor, bank[sample], temperature)`` [B, 1 + K] for anchors [B, D], a memory bank [N, D] and
    the rows each anchor is scored against, ``sample`` [B, 1 + K], computed the cheaper way: with a bank of at most
    ``FULL_BANK_RATIO`` x (1 + K) rows (CIFAR's 50,000 at K = 16,384), one product with the whole bank ([B, N]
    scores, B x N x D multiply-adds) and the sampled scores picked from it; with a larger one (ImageNet's 1.28 M),
    the sampled rows gathered first ([B, 1 + K, D]: memory-bound copies, far slower per element than a matrix
    product). ``whole_bank`` forces one way. The same values up to float rounding."""
    if anchor.ndim != 2 or bank.ndim != 2 or sample.ndim != 2 or bank.shape[1] != anchor.shape[1]:
        raise ValueError(
            f"bank_contrast_exp: anchors {tuple(anchor.shape)}, bank {tuple(bank.shape)} and sampled rows "
            f"{tuple(sample.shape)} do not match ([B, D], [N, D] and [B, 1 + K])"
        )
    if whole_bank is None:
        whole_bank = bank.shape[0] <= FULL_BANK_RATIO * sample.shape[1]
    if not whole_bank:
        return contrast_exp(anchor, bank.index_select(0, sample.reshape(-1)).reshape(*sample.shape, -1), temperature)
    dtype = loss_dtype(anchor, bank)
    # the product keeps the bank for the anchors' gradient: a copy, as the caller may update its bank in place
    # before the backward pass (CRD's memory update does); N x D floats, at most 16 / B of the gathered rows' size
    kept = bank.to(dtype, copy=True) if anchor.requires_grad else bank.to(dtype)
    with torch.autocast(anchor.device.type, enabled=False):
        dots = (anchor.to(dtype) @ kept.T).gather(1, sample)
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
