"""Process-group setup for one process or ``torchrun`` (DDP, gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..collectives import all_reduce, broadcast_object
from ..collectives import barrier as barrier_of_all
from ..errors import CrossDistillError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CrossDistillError(f"train.device={preference} but no CUDA GPU is visible; use train.device=cpu")
        return torch.device(preference if ":" in preference else f"cuda:{local_rank}")
    if preference == "cpu":
        return torch.device("cpu")
    raise CrossDistillError(f"train.device must be auto, cpu, cuda or cuda:N, got {preference!r}")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    return all_reduce(tensor) if env.distributed else tensor


def all_ranks_ok(env: DistEnv, ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a barrier that also carries a flag)."""
    if not env.distributed:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=env.device)
    return bool(all_reduce(flag, op=dist.ReduceOp.MIN).item())


def barrier(env: DistEnv) -> None:
    if env.distributed:
        barrier_of_all()


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_from_main(env: DistEnv, obj):
    """Rank 0's ``obj`` on every rank (a picklable object; all ranks must call it)."""
    if not env.distributed:
        return obj
    return broadcast_object(obj, env.device, src=0)
