"""The engine's side of the teacher contract: every method's teacher outputs computed the same way.

A method declares what it reads from the teacher
(:meth:`~crossdistill.distillers.Distiller.teacher_request`); for each batch the engine gets it
with a :class:`TeacherRunner` and passes it to the method's ``forward``. The runner runs the frozen
teacher in eval mode under ``torch.inference_mode()`` (cheaper than ``no_grad``: no version
counters, no view tracking), under the step's autocast, and clones the outputs out of inference
mode (inference tensors cannot be saved for backward). Where the method's outputs are cacheable,
it reads them from the loader's prefetched cache rows or the :class:`~.teacher_cache.TeacherCache`,
running the teacher only for rows not stored yet. Under DDP each rank runs its own runner on its
own batch; the teacher is never wrapped.
"""

from __future__ import annotations

import torch

from ..models import TeacherOutputs
from .teacher_cache import TeacherCache, prefetched_outputs


class TeacherRunner:
    """The teacher outputs ``distiller`` reads, for one batch at a time."""

    def __init__(self, distiller, cache: TeacherCache | None = None, compile: bool = False):
        if distiller.teacher is None:
            raise ValueError(f"{type(distiller).__name__} has no teacher to run")
        if cache is not None and not distiller.teacher_cacheable:
            raise ValueError(f"{type(distiller).__name__}'s teacher outputs are not cacheable")
        self.distiller = distiller
        self.request = distiller.teacher_request()
        self.cache = cache
        self._compute = torch.compile(distiller.compute_teacher) if compile else distiller.compute_teacher

    def compute(self, images: torch.Tensor) -> TeacherOutputs:
        """Run the teacher: eval mode, inference mode; the outputs returned as ordinary tensors."""
        model = self.distiller.teacher.model
        if model.training:
            model.eval()
        with torch.inference_mode():
            out = self._compute(images)
        return out.map(torch.Tensor.clone)

    def __call__(self, images: torch.Tensor, indices: torch.Tensor | None = None, prefetched=None) -> TeacherOutputs:
        """The outputs for this batch: the cache rows the loader brought (``prefetched``: (rows, ok)),
        else read from the cache (``indices``: the samples' dataset indices; missing rows computed
        and stored), else computed by the teacher."""
        cache = self.cache
        if prefetched is not None and bool(torch.as_tensor(prefetched[1]).all()):  # ok flags: a host tensor
            if cache is not None:
                cache.hits += images.shape[0]
            return prefetched_outputs(prefetched[0], images.device)
        if cache is not None and indices is not None:
            return cache.lookup(indices, images, self.compute)
        return self.compute(images)


__all__ = ["TeacherRunner"]
