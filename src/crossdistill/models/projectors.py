"""Trainable modules that map student features to the teacher's space (dropped after training)."""

from __future__ import annotations

from torch import nn


class AADProjector(nn.Sequential):
    """RSD's Architecture-Agnostic Decoupler, as in the official code:
    ``Linear(Ds, g*Ds, bias=False) -> BatchNorm1d(g*Ds) -> GELU -> Linear(g*Ds, Dt, bias=False)``,
    linear weights trunc-normal (std 0.02), BatchNorm at its defaults.
    """

    def __init__(self, student_dim: int, teacher_dim: int, gamma: int = 2):
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"AADProjector widths must be positive, got {student_dim} -> {teacher_dim}")
        if int(gamma) != gamma or gamma < 1:
            raise ValueError(f"AADProjector gamma must be an integer >= 1, got {gamma}")
        hidden = int(gamma) * student_dim
        super().__init__(
            nn.Linear(student_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.GELU(),
            nn.Linear(hidden, teacher_dim, bias=False),
        )
        self.student_dim, self.teacher_dim, self.gamma = student_dim, teacher_dim, int(gamma)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
