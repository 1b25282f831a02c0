"""Exact copies of model state that a skipped training step puts back, with or without a host sync."""

from __future__ import annotations

from typing import Iterable

import torch


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)  # one multi-tensor kernel on CUDA
    else:
        for target, source in zip(targets, sources):
            target.copy_(source)


class TensorSnapshot:
    """A saved copy of some tensors (BatchNorm buffers, EMA weights), put back bitwise on request.

    The tensors are grouped by device and dtype and each group is saved as one flat tensor, so
    taking and restoring cost a few kernels whatever the number of tensors (a ResNet has about 60
    BatchNorm buffers). :meth:`restore` with a 0-d bool device tensor restores only where it is
    True, choosing with ``torch.where`` on the device: no host sync, and bitwise exact (NaN, inf
    and -0.0 included) where arithmetic blending would not be.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]):
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for tensor in tensors:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
        self.groups = list(groups.values())
        self.saved: list[torch.Tensor | None] = [None] * len(self.groups)
        self.current: list[torch.Tensor | None] = [None] * len(self.groups)  # reused: no allocation per step

    def __len__(self) -> int:
        return sum(len(group) for group in self.groups)

    @staticmethod
    def _flat(group: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        flat = [t.reshape(-1) for t in group]
        return torch.cat(flat) if out is None else torch.cat(flat, out=out)

    def take(self) -> None:
        """Save the current values."""
        self.saved = [self._flat(group, out=saved) for group, saved in zip(self.groups, self.saved)]

    def restore(self, where: torch.Tensor | None = None) -> None:
        """Put the saved values back: always, or (``where``: a 0-d bool tensor on the device) only where it is True."""
        for index, (group, saved) in enumerate(zip(self.groups, self.saved)):
            if saved is None:
                raise RuntimeError("TensorSnapshot.restore before take")
            values = saved
            if where is not None:
                values = self.current[index] = self._flat(group, out=self.current[index])
                torch.where(where, saved, values, out=values)
            _copy_all(group, [part.view(t.shape) for part, t in zip(values.split([t.numel() for t in group]), group)])
