"""The frozen teacher (eval mode always, no autograd, inputs re-normalised to its own statistics),
what a method asks of it (:class:`TeacherRequest`) and what it gets (:class:`TeacherOutputs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import StageIndex, embedding_dim, forward_model

OUTPUTS = ("embedding", "logits")
"""The teacher outputs a method can read by name (and the teacher cache can store)."""


@dataclass(frozen=True)
class TeacherRequest:
    """What a method reads from the teacher on every batch; the engine computes exactly this."""

    embedding: bool = False
    """The pre-logits embedding, [B, D]."""
    logits: bool = False
    """The logits, [B, K]."""
    stages: tuple[StageIndex, ...] = ()
    """Stage features (adapter stage indices, :data:`~crossdistill.models.FINAL` for the final map)."""

    @classmethod
    def of(cls, outputs: Iterable[str]) -> "TeacherRequest":
        """The request for the named outputs (any of :data:`OUTPUTS`)."""
        names = tuple(outputs)
        unknown = [name for name in names if name not in OUTPUTS]
        if unknown:
            raise ValueError(f"unknown teacher output(s) {unknown}; a method can read {OUTPUTS} and stages")
        return cls(embedding="embedding" in names, logits="logits" in names)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The named outputs requested, in :data:`OUTPUTS` order."""
        return tuple(name for name in OUTPUTS if getattr(self, name))

    @property
    def empty(self) -> bool:
        return not (self.embedding or self.logits or self.stages)


@dataclass
class TeacherOutputs:
    """The teacher's outputs for one batch, as a method receives them (ordinary tensors, no autograd)."""

    embedding: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    stages: list[torch.Tensor] = field(default_factory=list)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """What a method that computes something unusual from the teacher adds (SDD: region logits)."""

    def map(self, fn) -> "TeacherOutputs":
        """The same outputs with ``fn`` applied to every tensor (a clone, a device move)."""
        keep = lambda t: None if t is None else fn(t)  # noqa: E731
        return TeacherOutputs(
            embedding=keep(self.embedding),
            logits=keep(self.logits),
            stages=[fn(t) for t in self.stages],
            extra={k: fn(v) for k, v in self.extra.items()},
        )


class Teacher:
    """Wraps a teacher model. Deliberately not an ``nn.Module``: it never enters the student's
    parameters, optimiser, DDP wrapper or checkpoint.

    ``data_mean/std`` is the normalisation the data pipeline applies (the student's);
    ``model_mean/std`` the one the teacher was trained with. When they differ, inputs are
    mapped ``x_t = (x * data_std + data_mean - model_mean) / model_std`` before the forward.
    ``input_size``: the square size a teacher built for one input size takes (ViT, Swin at the
    size it was trained at); inputs of another size are resized to it (bilinear) before the forward.
    """

    def __init__(
        self,
        model: nn.Module,
        data_mean: Sequence[float] | None = None,
        data_std: Sequence[float] | None = None,
        model_mean: Sequence[float] | None = None,
        model_std: Sequence[float] | None = None,
        input_size: int | None = None,
    ):
        self.model = model.eval().requires_grad_(False)
        self.dim = embedding_dim(model)
        self.input_size = input_size
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

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The batch ``x`` as the teacher takes it: re-normalised, and resized to its ``input_size``."""
        x = self.normalize(x)
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
        return x

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, request: TeacherRequest) -> TeacherOutputs:
        """What ``request`` asks for on the batch ``x`` (one forward, eval mode, no autograd).

        Methods do not call this: the engine does, under ``torch.inference_mode()``, and passes the
        result to the method's ``forward`` (see :class:`~crossdistill.distillers.Distiller`)."""
        if self.model.training:
            self.model.eval()
        out = forward_model(self.model, self.prepare(x), logits=request.logits, stages=request.stages)
        return TeacherOutputs(
            embedding=out.embedding if request.embedding else None, logits=out.logits, stages=list(out.stages)
        )
