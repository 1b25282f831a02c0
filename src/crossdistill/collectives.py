"""Every collective crossdistill runs, differentiable ones included.

Gloo runs a collective on its own worker threads. Such a thread keeps the Python object of each tensor it was
given until it drops its work, after the work completed and after the caller may have moved on; that drop takes
the GIL. One that lands while the interpreter shuts down ends the process with "terminate called without an
active exception" (SIGABRT) after a run that succeeded. So each collective here returns only once the worker
threads have let go of its CPU tensors, and the object collectives pickle into tensors of their own: torch's
allocate tensors this cannot wait for.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "RELEASE_WAIT_S",
    "all_gather",
    "all_gather_no_grad",
    "all_gather_objects",
    "all_gather_with_grad",
    "all_reduce",
    "barrier",
    "broadcast_object",
    "world_size",
]

RELEASE_WAIT_S = 10.0  # at most this long per collective; a tensor another thread keeps is not waited for forever


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _python_references(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [sys.getrefcount(tensor) for tensor in tensors]


def _released(collective: Callable[[], Any], tensors: Sequence[torch.Tensor]) -> None:
    """Run ``collective`` on ``tensors``, then wait until no other thread holds their Python objects."""
    held = [tensor for tensor in tensors if tensor.device.type == "cpu"]
    before = _python_references(held)
    collective()
    deadline = time.monotonic() + RELEASE_WAIT_S
    while any(now > then for now, then in zip(_python_references(held), before)) and time.monotonic() < deadline:
        time.sleep(1e-4)  # releases the GIL, which the worker thread needs to drop them


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``tensor`` reduced in place over all ranks (all must call it); returns it."""
    _released(lambda: dist.all_reduce(tensor, op=op), [tensor])
    return tensor


def barrier() -> None:
    dist.barrier()


def all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape on all), in rank order."""
    source = x.contiguous()
    parts = [torch.empty_like(source) for _ in range(dist.get_world_size())]
    _released(lambda: dist.all_gather(parts, source), [source, *parts])
    return parts


def _to_bytes(obj: Any, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _from_bytes(payload: torch.Tensor) -> Any:
    return pickle.loads(payload.cpu().numpy().tobytes())


def all_gather_objects(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order; ``device``: where the process group's tensors live."""
    payload = _to_bytes(obj, device)
    sizes = [int(size) for size in all_gather(torch.tensor([payload.numel()], dtype=torch.int64, device=device))]
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    return [_from_bytes(part[:size]) for part, size in zip(all_gather(padded), sizes)]


def broadcast_object(obj: Any, device: torch.device, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (all must call it; the others' ``obj`` is ignored)."""
    mine = dist.get_rank() == src
    payload = _to_bytes(obj, device) if mine else None
    size = torch.tensor([payload.numel() if mine else 0], dtype=torch.int64, device=device)
    _released(lambda: dist.broadcast(size, src=src), [size])
    if not mine:
        payload = torch.empty(int(size), dtype=torch.uint8, device=device)
    _released(lambda: dist.broadcast(payload, src=src), [payload])
    return _from_bytes(payload)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward pass sums every rank's gradient for this rank's rows.

    Every rank computes the same loss on the gathered batch, so the summed gradient of a
    rank's rows is ``world_size`` times the single-process one; DDP's gradient averaging
    divides it back, so parameter gradients equal those of one process on the whole batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(all_gather(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = all_reduce(grad.contiguous())
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from all ranks (rank order); gradients flow back to each rank's rows.

    Every rank must pass the same batch size (the engine's training loader drops the last,
    incomplete batch, so it does). Without a process group this returns ``x``.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    return torch.cat(all_gather(x), dim=0)
