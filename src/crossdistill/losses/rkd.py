"""The RKD loss (Park et al., CVPR 2019, "Relational Knowledge Distillation"), as the OFA code computes it.

On a batch of embeddings ``e_1 .. e_B`` of each model (the widths of student and teacher may differ: only
relations between samples are compared):

* distance potential: ``d_ij = |e_i - e_j|`` for ``i != j`` (0 on the diagonal), divided by its mean over the
  ``B(B-1)`` pairs ``i != j``. The squared distance is computed as ``|e_i|^2 + |e_j|^2 - 2 e_i.e_j``, clamped
  below at ``eps`` before the square root (``squared``: no root), as OFA's ``_pdist``: so every pair
  ``i != j`` is positive, and the mean over them is OFA's "mean of the positive distances" (``d[d > 0]``,
  which here needs no data-dependent indexing);
* angle potential: ``a_ijk = <u_ij, u_ik>`` with ``u_ij = (e_j - e_i) / |e_j - e_i|`` (the cosine of the angle at
  ``e_i`` between ``e_j`` and ``e_k``; a zero difference gives a zero vector), over all ``B^3`` triples;
* ``loss = distance_weight * smoothL1(d_s, d_t) + angle_weight * smoothL1(a_s, a_t)``, each smooth-L1 (Huber,
  beta 1) averaged over its entries (OFA ``distillers/rkd.py``; the paper sums over pairs, the code averages).

The teacher's potentials are targets: no gradient flows into the teacher embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kd import loss_dtype

__all__ = ["rkd_angles", "rkd_distances", "rkd_loss"]

RKD_EPS = 1e-12


def check_relation_batch(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Raise ValueError unless both are [B, D] batches (widths may differ) of the same B >= 2."""
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(f"{name} expects 2-D embeddings [B, D], got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ")
    if student.shape[0] < 2:
        raise ValueError(f"{name} relates samples of a batch: it needs at least 2, got {student.shape[0]}")


def rkd_distances(embedding: torch.Tensor, squared: bool = False, eps: float = RKD_EPS) -> torch.Tensor:
    """[B, D] -> [B, B] pairwise distances (0 on the diagonal) divided by their mean over the pairs ``i != j``."""
    b = embedding.shape[0]
    norms = embedding.pow(2).sum(dim=1)
    dist = (norms.unsqueeze(1) + norms.unsqueeze(0) - 2 * embedding @ embedding.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=embedding.device)
    dist = torch.where(off_diagonal, dist, torch.zeros((), dtype=dist.dtype, device=dist.device))
    return dist / (dist.sum() / (b * (b - 1)))


def rkd_angles(embedding: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B, B, B]: entry (i, j, k) is the cosine of the angle at ``e_i`` between ``e_j`` and ``e_k``."""
    unit = F.normalize(embedding.unsqueeze(0) - embedding.unsqueeze(1), p=2, dim=2)  # unit[i, j] ~ e_j - e_i
    return unit @ unit.transpose(1, 2)


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    squared: bool = False,
    eps: float = RKD_EPS,
) -> torch.Tensor:
    """``distance_weight * L_distance + angle_weight * L_angle`` between student and teacher embeddings [B, D].

    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state; the teacher
    side is detached. Raises ValueError for a batch of fewer than 2 samples (no pair to relate).
    """
    check_relation_batch("rkd_loss", student, teacher)
    if not eps > 0:
        raise ValueError(f"rkd_loss: eps must be > 0, got {eps}")
    dtype = loss_dtype(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        student, teacher = student.to(dtype), teacher.detach().to(dtype)
        loss_distance = F.smooth_l1_loss(rkd_distances(student, squared, eps), rkd_distances(teacher, squared, eps))
        loss_angle = F.smooth_l1_loss(rkd_angles(student), rkd_angles(teacher))
        return distance_weight * loss_distance + angle_weight * loss_angle
