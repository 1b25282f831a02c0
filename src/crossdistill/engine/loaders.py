"""The loaders of a run: what each epoch sees, seeded so that a resume sees the same."""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import multiprocessing.util  # registers its exit function before ours below: ours must run first
import os
import random
import re
import select
import signal
import threading
import time
import weakref
from multiprocessing.context import BaseContext
from typing import Callable

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
    save. The workers' processes are :func:`worker_context`'s, killed at exit if still running."""
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _end_with(main_pid: int) -> None:
    """End this process when process ``main_pid`` ends (a daemon thread that waits on it)."""
    try:
        handle = os.pidfd_open(main_pid)  # Linux >= 5.3: readable once the process has ended
    except ProcessLookupError:  # it ended while this worker was starting
        os._exit(0)
    except (AttributeError, OSError):
        handle = None

    def wait() -> None:
        if handle is not None:
            select.select([handle], [], [])
        else:
            while True:
                time.sleep(2.0)
                try:
                    os.kill(main_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # alive, and another user's (its pid reused): keep waiting
                    pass
        os._exit(0)

    threading.Thread(target=wait, name="crossdistill-main-process-watch", daemon=True).start()


def _init_worker(worker_id: int, main_pid: int) -> None:
    ignore_stop_signals(worker_id)
    if os.getppid() != main_pid:
        _end_with(main_pid)


def worker_init() -> Callable[[int], None]:
    """The ``worker_init_fn`` of the engine's loaders: :func:`ignore_stop_signals`, and a worker that is not the
    main process's child ends with the main process. A forkserver's workers (Python 3.14's default start method
    on Linux) are the forkserver's children: torch's check that a worker's parent lives watches the forkserver,
    which outlived a main process killed with SIGKILL, and its workers ran on for good."""
    return functools.partial(_init_worker, main_pid=os.getpid())


_STARTED_WORKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # worker process -> pid of its starter


class _KilledAtExit:
    """A loader worker's process, killed if still running when the process that started it exits.

    The workers of a loader still open at interpreter exit (one a traceback's reference cycle holds, say) are
    ended by multiprocessing with SIGTERM, and it waits for them: ours ignore SIGTERM, so that exit hung for good."""

    def start(self) -> None:
        super().start()
        _STARTED_WORKERS[self] = os.getpid()


def _kill_workers_left_running() -> None:
    running = [w for w, starter in list(_STARTED_WORKERS.items()) if starter == os.getpid() and w.exitcode is None]
    if running and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers as failed
    for worker in running:
        worker.kill()


atexit.register(_kill_workers_left_running)  # after multiprocessing.util's exit function (imported above): runs first


def _context_of_workers_killed_on_terminate(method: str) -> BaseContext:
    base = multiprocessing.get_context(method)
    name = f"_{method.title()}LoaderWorker"
    # module-level, so that spawn and forkserver, which pickle the process object, find the class by name
    globals()[name] = worker = type(name, (_KilledAtExit, base.Process), {"__module__": __name__})
    return type(f"_{method.title()}LoaderContext", (type(base),), {"Process": worker})()


_WORKER_CONTEXTS = {
    method: _context_of_workers_killed_on_terminate(method) for method in multiprocessing.get_all_start_methods()
}


def worker_context() -> BaseContext:
    """The multiprocessing context of a loader's workers: the start method in effect (``multiprocessing``'s default
    or the one the user set), with processes :class:`_KilledAtExit`."""
    return _WORKER_CONTEXTS[multiprocessing.get_start_method()]


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
        worker_init_fn=worker_init(),
        multiprocessing_context=worker_context() if num_workers > 0 else None,
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
        worker_init_fn=worker_init(),
        multiprocessing_context=worker_context() if num_workers > 0 else None,
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
