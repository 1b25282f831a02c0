"""The frozen teacher: eval mode always, no autograd, inputs re-normalised to its own statistics."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .adapter import ModelOutput, StageIndex, embedding_dim, forward_model


class Teacher:
    """Wraps a teacher model. Deliberately not an ``nn.Module``: it never enters the student's
    parameters, optimiser, DDP wrapper or checkpoint.

    ``data_mean/std`` is the normalisation the data pipeline applies (the student's);
    ``model_mean/std`` the one the teacher was trained with. When they differ, inputs are
    mapped ``x_t = (x * data_std + data_mean - model_mean) / model_std`` before the forward.
    """

    def __init__(
        self,
        model: nn.Module,
        data_mean: Sequence[float] | None = None,
        data_std: Sequence[float] | None = None,
        model_mean: Sequence[float] | None = None,
        model_std: Sequence[float] | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.dim = embedding_dim(model)
        self._scale: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None
        if None not in (data_mean, data_std, model_mean, model_std) and (
            tuple(data_mean) != tuple(model_mean) or tuple(data_std) != tuple(model_std)
        ):
            dm, ds = torch.tensor(data_mean), torch.tensor(data_std)
            tm, ts = torch.tensor(model_mean), torch.tensor(model_std)
            self._scale = (ds / ts).view(1, -1, 1, 1)
            self._shift = ((dm - tm) / ts).view(1, -1, 1, 1)

    @property
    def renormalizes(self) -> bool:
        return self._scale is not None

    def apply(self, fn) -> "Teacher":
        """Apply a tensor function (device or dtype move) to the teacher, as ``nn.Module._apply`` does."""
        self.model._apply(fn)
        if self._scale is not None:
            self._scale, self._shift = fn(self._scale), fn(self._shift)
        return self

    def to(self, *args, **kwargs) -> "Teacher":
        self.model.to(*args, **kwargs)
        if self._scale is not None:
            device = next(self.model.parameters()).device
            self._scale, self._shift = self._scale.to(device), self._shift.to(device)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            return x
        return x * self._scale.to(x.dtype) + self._shift.to(x.dtype)

    @torch.no_grad()
    def __call__(
        self, x: torch.Tensor, *, logits: bool = False, stages: Sequence[StageIndex] | None = None
    ) -> ModelOutput:
        if self.model.training:
            self.model.eval()
        return forward_model(self.model, self.normalize(x), logits=logits, stages=stages)
