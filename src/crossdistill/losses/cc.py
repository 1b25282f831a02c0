"""The CC loss (correlation congruence, Peng et al., ICCV 2019), as the OFA code computes it.

On the embedded student and teacher features ``f_s, f_t`` ([B, D], each side through its own trainable
linear embedding to a common width), with ``delta_i = |f_s[i] - f_t[i]|`` (element-wise)::

    loss = mean over i = 1 .. B-1 of  sum_d delta_i[d] * delta_{i+1}[d]

OFA ``distillers/correlation.py`` (the same function as ``Correlation`` in CRD's ``distiller_zoo/CC.py``, which
CRD's author restructured from code Peng et al. shared). This differs from the paper's formula: the paper
builds, on each side separately, the B x B correlation matrix of the batch (a kernel, e.g. a Taylor-expanded
Gaussian RBF, of every pair of samples) and takes ``|psi(F_t) - psi(F_s)|^2 / B^2``. The code relates only
consecutive samples of the batch (in loader order), compares the two sides sample by sample through the
absolute differences of their embeddings, and has no kernel. We follow the code, which produced the
reference numbers. The loss is >= 0 and 0 when the embedded features agree on every sample (or the
differences of consecutive samples are orthogonal). Both arguments take gradients: the teacher's
embedding layer trains too.
"""

from __future__ import annotations

import torch

from .kd import loss_dtype
from .rkd import check_relation_batch

__all__ = ["cc_loss"]


def cc_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Unweighted CC loss between embedded student and teacher features [B, D] of the same shape, B >= 2.

    Computed in float32 (float64 when given float64) whatever the input dtype or autocast state.
    """
    check_relation_batch("cc_loss", student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"cc_loss: embedded student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features differ "
            "in shape; embed both to the same width first"
        )
    dtype = loss_dtype(student, teacher)
    with torch.autocast(device_type=student.device.type, enabled=False):
        delta = (student.to(dtype) - teacher.to(dtype)).abs()
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
