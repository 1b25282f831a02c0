"""The DIST loss (Huang et al., NeurIPS 2022), as the OFA/RSD code computes it.

With ``Y = softmax(z / tau)`` for student and teacher ([B, K]):

* inter-class relation: ``1 - mean_b pearson(Y_s[b, :], Y_t[b, :])`` (each sample's
  prediction over the classes);
* intra-class relation: ``1 - mean_c pearson(Y_s[:, c], Y_t[:, c])`` (each class's
  scores over the batch);
* ``loss = tau^2 * (beta * inter + gamma * intra)``.

``pearson(a, b) = <a - mean(a), b - mean(b)> / (|a - mean(a)| * |b - mean(b)| + 1e-8)``
(OFA ``distillers/dist.py`` lines 31-53; RSD's copy is identical).

Pearson correlation is invariant to a positive affine map of either argument, i.e. of
the *probabilities*. Through the softmax the loss is invariant to adding a constant to
each sample's logits, but not to scaling the logits (that sharpens the probabilities).
"""

from __future__ import annotations

import torch

from .kd import check_logit_pair, loss_dtype

__all__ = ["dist_loss", "pearson_correlation"]

PEARSON_EPS = 1e-8


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Row-wise Pearson correlation of ``a`` and ``b`` [N, D] -> [N], with ``eps`` added to the norm product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
) -> torch.Tensor:
    """Unweighted DIST loss ``tau^2 * (beta * inter + gamma * intra)`` on logits [B, K].

    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    With a batch of one sample the intra-class term is the constant 1 (no batch relation).
    """
    check_logit_pair("dist_loss", logits_student, logits_teacher)
    if not tau > 0:
        raise ValueError(f"dist_loss: tau must be > 0, got {tau}")
    dtype = loss_dtype(logits_student, logits_teacher)
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        y_s = torch.softmax(logits_student.to(dtype) / tau, dim=1)
        y_t = torch.softmax(logits_teacher.to(dtype) / tau, dim=1)
        inter = 1 - pearson_correlation(y_s, y_t).mean()
        intra = 1 - pearson_correlation(y_s.T, y_t.T).mean()
        return (beta * inter + gamma * intra) * tau**2
