"""The loaders of a run: what each epoch sees, seeded so that a resume sees the same."""

from __future__ import annotations

import random
import re
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import CrossDistillError
from .preemption import PREEMPTION_SIGNALS
from .sampling import ResumableSampler, SampleSeededDataset
from .teacher_cache import TeacherCache, WithIndex

__all__ = [
    "ShardSampler",
    "build_eval_loader",
    "build_train_loader",
    "epoch_seed",
    "seed_everything",
    "unwrap_worker_error",
]


class ShardSampler(Sampler[int]):
    """Evaluation indices ``rank::world`` (every sample exactly once across ranks, no padding)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: SIGTERM/SIGUSR1 are for the main process, which saves a checkpoint
    and then ends its workers. A scheduler or ``kill -TERM -PGID`` signals the whole process group; a worker it
    killed made the main process fail ("DataLoader worker ... is killed by signal: Terminated") before it could
    save."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, rank): resuming at an epoch boundary is exact."""
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (2**31)


def build_train_loader(
    dataset,
    *,
    seed: int,
    batch_size: int,
    num_workers: int,
    world_size: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    teacher_cache: TeacherCache | None = None,
    with_indices: bool = False,
):
    """The training loader as the engine builds it: ``(train_set, sampler, generator, loader)``.

    Every sample is augmented from its own seed (run seed, epoch, index), the sampler shards and
    shuffles per epoch and can skip into an epoch, the last incomplete batch is dropped. With a
    ``teacher_cache``, items are ``(image, target, index, stored rows, ok)``: the workers read the
    cache (see :class:`~crossdistill.engine.teacher_cache.WithIndex`); else with ``with_indices`` (a method
    that :attr:`~crossdistill.distillers.Distiller.needs_indices`), ``(image, target, index)``.
    """
    train_set = SampleSeededDataset(dataset, seed)
    sampler = ResumableSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    generator = torch.Generator()
    loader = DataLoader(
        WithIndex(train_set, teacher_cache) if teacher_cache is not None or with_indices else train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=ignore_stop_signals,
    )
    return train_set, sampler, generator, loader


def build_eval_loader(
    dataset, *, batch_size: int, num_workers: int, world_size: int = 1, rank: int = 0, pin_memory: bool = False
) -> DataLoader:
    """The evaluation loader: every sample once, sharded ``rank::world`` across processes, in order."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=ignore_stop_signals,
    )


def unwrap_worker_error(err: CrossDistillError) -> CrossDistillError:
    """The error a DataLoader worker raised, as the user should see it.

    torch re-raises a worker's exception in the main process as the same type, with the worker's whole
    traceback as its message ("Caught CrossDistillError in DataLoader worker process 0. Original
    Traceback ..."); the one-line message is after the traceback's last ``<module>.<class>: ``."""
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return err
    kind = type(err)
    last = None
    for last in re.finditer(rf"^{re.escape(f'{kind.__module__}.{kind.__qualname__}')}: ", text, re.M):
        pass
    return kind(text[last.end() :].strip()) if last is not None else err
