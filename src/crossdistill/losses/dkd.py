"""The DKD loss (Decoupled Knowledge Distillation, Zhao et al., CVPR 2022), as the OFA/RSD code computes it.

With ``p = softmax(z / T)`` and ``g`` the target class:

* TCKD: KL between the binary distributions ``[p_g, 1 - p_g]`` of teacher and student;
* NCKD: KL between the distributions over the non-target classes, ``softmax(z / T)``
  restricted to the classes ``!= g`` (OFA masks the target logit with ``-1000``; here it
  is removed, which is the same distribution without the offset);
* both are averaged over the batch (``batchmean``) and multiplied by ``T^2``;
* ``loss = alpha * TCKD + beta * NCKD``.

(OFA ``distillers/dkd.py`` ``dkd_loss``, lines 37-59; RSD's copy is identical.)
The binary probabilities are taken from log-sum-exps rather than ``log`` of summed
softmax probabilities, so a target probability that underflows gives no ``log(0)``.

Soft targets [B, K] (mixup/cutmix, smoothed labels) give the target class by
``argmax``, as the OFA distiller does (``label.max(1)[1]``, ``distillers/dkd.py`` line 23).
"""

from __future__ import annotations

import torch

from .kd import check_logit_pair, loss_dtype

__all__ = ["decouple_target", "dkd_loss", "dkd_warmup_factor", "hard_labels"]


def hard_labels(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices [B] from hard labels [B] or soft labels [B, K] (argmax over classes)."""
    if target.ndim == 2:
        if target.shape[1] != num_classes:
            raise ValueError(f"soft targets have {target.shape[1]} classes, the logits {num_classes}")
        return target.argmax(dim=1)
    if target.ndim != 1:
        raise ValueError(f"targets must be class indices [B] or soft labels [B, K], got shape {tuple(target.shape)}")
    if target.is_floating_point():
        raise ValueError(f"class-index targets must be integers, got {target.dtype}")
    return target.long()


def _batchmean_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """batchmean KL(p || q) from log-probabilities (rows are distributions)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def decouple_target(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log [p_target, p_rest] [..., 2], non-target logits [..., K-1]) of temperature-scaled logits
    [B, ..., K] with class indices ``labels`` [B] (the same target for every row of a sample).

    The non-target logits keep their class order. They are gathered with computed column indices
    rather than ``masked_select``: a masked selection has a data-dependent size, which on a GPU makes
    the host wait for the device on every call (four times per DKD loss).
    """
    classes = logits.shape[-1]
    label = labels.to(logits.device).view(-1, *([1] * (logits.ndim - 1))).expand(*logits.shape[:-1], 1)
    target_logit = logits.gather(-1, label)
    columns = torch.arange(classes - 1, device=logits.device).expand(*logits.shape[:-1], classes - 1)
    other = logits.gather(-1, columns + (columns >= label).long())  # skip the target's column
    binary = torch.cat([target_logit, torch.logsumexp(other, dim=-1, keepdim=True)], dim=-1)
    return torch.log_softmax(binary, dim=-1), other


def dkd_loss(
    logits_student: torch.Tensor,
    logits_teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Unweighted DKD loss ``alpha * TCKD + beta * NCKD`` on logits [B, K] with targets [B] or [B, K].

    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    """
    check_logit_pair("dkd_loss", logits_student, logits_teacher)
    batch, classes = logits_student.shape
    if classes < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got {classes}")
    if target.shape[0] != batch:
        raise ValueError(f"dkd_loss: {batch} logits but {target.shape[0]} targets")
    if not temperature > 0:
        raise ValueError(f"dkd_loss: temperature must be > 0, got {temperature}")
    labels = hard_labels(target, classes)
    dtype = loss_dtype(logits_student, logits_teacher)
    with torch.autocast(device_type=logits_student.device.type, enabled=False):
        binary_s, other_s = decouple_target(logits_student.to(dtype) / temperature, labels)
        binary_t, other_t = decouple_target(logits_teacher.to(dtype) / temperature, labels)
        tckd = _batchmean_kl(binary_t, binary_s)
        nckd = _batchmean_kl(torch.log_softmax(other_t, dim=1), torch.log_softmax(other_s, dim=1))
        return (alpha * tckd + beta * nckd) * temperature**2


def dkd_warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """The DKD warm-up multiplier for 0-based ``epoch``: ``min((epoch + 1) / warmup_epochs, 1)``.

    This is the original DKD code's schedule (mdistiller ``distillers/DKD.py`` line 72,
    ``min(epoch / warmup, 1.0)`` with 1-based epochs; ``CFG.DKD.WARMUP = 20`` in
    ``engine/cfg.py`` line 167). ``warmup_epochs = 0`` disables it (factor 1 from the
    start), which is what the OFA/RSD code does: its DKD has no warm-up.
    """
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)
