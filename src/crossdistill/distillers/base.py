"""The distiller interface every method implements: the contract between a method, its teacher and the engine.

A method is a :class:`Distiller` subclass with a typed :class:`MethodConfig`. It says what it reads
from the teacher (:attr:`Distiller.teacher_outputs`, or :meth:`Distiller.teacher_request` when that
depends on its config), and receives it in :meth:`Distiller.forward`::

    forward(images, target, teacher, indices) -> DistillOutput

``teacher`` is a :class:`~crossdistill.models.TeacherOutputs` holding exactly what was requested
(None for a method without a teacher); ``indices`` are the samples' dataset indices. A method never
runs its teacher in ``forward``: the engine computes the outputs for every method the same way
(inference mode, eval mode, from the teacher cache where the outputs allow, under DDP per rank).
A method that computes something unusual from the teacher overrides :meth:`Distiller.compute_teacher`;
the engine still runs it under inference mode, and never caches what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..models import ModelOutput, Teacher, TeacherOutputs, TeacherRequest, forward_model
from ..registry import Registry


@dataclass
class DistillOutput:
    logits: torch.Tensor
    """The student's logits (for accuracy)."""
    losses: dict[str, torch.Tensor]
    """Named, already-weighted loss terms; the training loss is their sum."""

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())


@dataclass
class MethodConfig:
    """Base of every method's typed config."""

    def validate(self) -> None:  # overridden where values have ranges
        pass


class Distiller(nn.Module):
    """A student, the method's trainable extras (projectors), and a frozen teacher.

    Subclasses set ``config_cls`` and implement :meth:`forward`. The teacher is held as a
    plain attribute (see :class:`~crossdistill.models.Teacher`), so ``parameters()``,
    ``state_dict()`` and a DDP wrapper see only trainable modules; it still follows
    ``.to()`` / ``.cuda()`` / ``.half()`` of the distiller.
    """

    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    needs_teacher: ClassVar[bool] = True
    min_batch_size: ClassVar[int] = 1
    teacher_outputs: ClassVar[tuple[str, ...]] = ()
    """The teacher outputs the method reads on every batch: any of ``"embedding"``, ``"logits"``.
    Stage features, or outputs that depend on the config: override :meth:`teacher_request`."""
    needs_indices: ClassVar[bool] = False
    """Whether :meth:`forward` reads ``indices`` (state keyed by training sample, e.g. CRD's memory bank): the
    engine then delivers the samples' dataset indices with every training batch and calls
    :meth:`bind_training_set` before the run starts."""

    def __init__(
        self, student: nn.Module, teacher: Teacher | None, cfg: MethodConfig, criterion: nn.Module | None = None
    ):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher")
        self.student = student
        self.teacher = teacher
        self.cfg = cfg
        self.criterion = criterion if criterion is not None else nn.CrossEntropyLoss()

    # --- parameters
    def extra_modules(self) -> dict[str, nn.Module]:
        """Trainable modules besides the student (dropped when the student is exported)."""
        return {name: module for name, module in self.named_children() if name not in ("student", "criterion")}

    def extra_parameter_count(self) -> int:
        return sum(p.numel() for m in self.extra_modules().values() for p in m.parameters() if p.requires_grad)

    # --- forward helpers
    def student_forward(self, x: torch.Tensor, **kwargs: Any) -> ModelOutput:
        return forward_model(self.student, x, **kwargs)

    # --- the teacher contract
    def teacher_request(self) -> TeacherRequest:
        """What this method reads from the teacher on every batch (default: :attr:`teacher_outputs`)."""
        return TeacherRequest.of(self.teacher_outputs) if self.teacher is not None else TeacherRequest()

    def compute_teacher(self, images: torch.Tensor) -> TeacherOutputs:
        """The teacher outputs this method reads, for ``images``: what :meth:`teacher_request` asks.

        The engine calls it under ``torch.inference_mode()`` for every batch the teacher cache does not
        cover, and passes the result to :meth:`forward`. Override it only to compute something unusual
        from the teacher (SDD: logits of pooled regions through the teacher's head); the result of an
        override is never cached (:attr:`teacher_cacheable`)."""
        return self.teacher.outputs(images, self.teacher_request())

    @property
    def reads_teacher(self) -> bool:
        """Whether the engine runs a teacher for this method at all (it has one and asks it for something)."""
        return self.teacher is not None and not self.teacher_request().empty

    @property
    def teacher_cacheable(self) -> bool:
        """Whether the engine may store this method's teacher outputs and serve them to later runs: only the
        named outputs (embedding, logits), computed the standard way. Stage features are too large to store."""
        request = self.teacher_request()
        standard = type(self).compute_teacher is Distiller.compute_teacher
        return standard and bool(request.outputs) and not request.stages

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        teacher: TeacherOutputs | None,
        indices: torch.Tensor | None = None,
    ) -> DistillOutput:
        """The loss terms for one batch. ``teacher``: the outputs :meth:`teacher_request` asked for
        (None without a teacher); ``indices``: the samples' dataset indices (None where the caller has none)."""
        raise NotImplementedError

    def bind_training_set(self, targets: Sequence[int], seed: int) -> None:
        """Called by the engine, for a method that :attr:`needs_indices`, once the training set is open and before a
        checkpoint is loaded: ``targets`` are the classes of its samples in index order, ``seed`` the run seed."""

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine before each epoch (0-based); for schedules inside a method (e.g. DKD warm-up)."""

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:
            self.teacher.apply(fn)
        return self


METHODS: Registry[type[Distiller]] = Registry("method")
"""Every method by name; a method module registers its class with ``@register_method("name")``."""
register_method = METHODS.register
