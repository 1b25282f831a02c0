"""The RSD (Redundancy Suppression Distillation) loss, as the official code computes it.

Both embeddings are standardised per feature over the batch,
``(x - mean) / (std_population + 1e-5)``; the cross-correlation
``C = Zt^T Zs / B`` is driven to the identity:
``sum_i (C_ii - 1)^2 + kappa * sum_{i != j} C_ij^2`` (a sum, not a mean).

A sum over D diagonal and D(D - 1) off-diagonal terms gives lambda and kappa a different meaning at each
teacher width D. ``reduction="mean"`` averages each term over its count instead and multiplies the averages by
the counts at ``reference_dim`` (768, the paper's Swin-T teacher): at D = 768 it is exactly the official sum,
at any other width the two terms keep the weight they have there.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-5
REDUCTIONS = ("sum", "mean")
REFERENCE_DIM = 768  # the width of the paper's Swin-T teacher, where both reductions agree


def batch_standardize(x: torch.Tensor, eps: float = STD_EPS) -> torch.Tensor:
    """Standardise each column of ``x`` [B, D] over the batch: (x - mean) / (population std + eps).

    A column with zero variance (a dead unit, or identical samples) standardises to zeros
    with a zero gradient; plain ``x.std()`` would give a NaN gradient there.
    """
    centered = x - x.mean(dim=0, keepdim=True)
    var = centered.pow(2).mean(dim=0, keepdim=True)
    positive = var > 0
    std = torch.where(positive, torch.sqrt(torch.where(positive, var, torch.ones_like(var))), torch.zeros_like(var))
    return centered / (std + eps)


def rsd_loss(
    z_s: torch.Tensor,
    z_t: torch.Tensor,
    kappa: float = 0.01,
    reduction: str = "sum",
    reference_dim: int = REFERENCE_DIM,
) -> torch.Tensor:
    """Unweighted RSD loss between projected student ``z_s`` [B, D] and teacher ``z_t`` [B, D].

    ``reduction="sum"`` (the official loss) sums the terms; ``"mean"`` averages the diagonal and the off-diagonal
    terms and scales them by their counts at width ``reference_dim``, so the loss equals the sum at that width.
    Computed in float32 (or float64 when given float64) whatever the input dtype or autocast state.
    Raises ValueError for a batch of fewer than 2 samples, where the batch statistics are undefined.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"rsd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reference_dim < 2:
        raise ValueError(f"rsd_loss: reference_dim must be at least 2, got {reference_dim}")
    if z_s.ndim != 2 or z_t.ndim != 2:
        raise ValueError(f"rsd_loss expects 2-D embeddings [B, D], got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    if z_s.shape != z_t.shape:
        raise ValueError(
            f"rsd_loss: student {tuple(z_s.shape)} and teacher {tuple(z_t.shape)} embeddings differ in shape; "
            "project the student to the teacher width first (AADProjector)"
        )
    batch, dim = z_s.shape
    if batch < 2:
        raise ValueError(
            f"rsd_loss needs a batch of at least 2 samples to standardise features over the batch, got {batch}"
        )
    dtype = torch.float64 if z_s.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z_s.device.type, enabled=False):
        s = batch_standardize(z_s.to(dtype))
        t = batch_standardize(z_t.to(dtype))
        corr = t.T @ s / batch
        diag = torch.diagonal(corr)
        on_diag = (diag - 1).pow(2).sum()
        off_diag = (corr - torch.diag_embed(diag)).pow(2).sum()
        if reduction == "mean":
            on_diag = on_diag * (reference_dim / dim)
            # one feature has no off-diagonal term: its (zero) sum stays zero
            off_diag = off_diag * (reference_dim * (reference_dim - 1) / (dim * (dim - 1))) if dim > 1 else off_diag
        return on_diag + kappa * off_diag
