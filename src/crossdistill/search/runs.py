"""The runs of a sweep or a study: each a normal run config (the base config with overrides applied by the config's
own code), one run directory each, skipped when finished, resumed when interrupted, and claimed by the engine's
run-directory lock so that two workers (processes, or machines sharing the output directory) never train one run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import RunConfig, apply_overrides, build_config, read_yaml
from ..distillers import METHODS, Distiller
from ..engine import RunSummary, Trainer
from ..engine.claim import run_dir_of
from ..engine.distributed import init_distributed, shutdown
from ..engine.preemption import EXIT_PREEMPTED, PREEMPTION_SIGNALS, Preempted
from ..engine.rundir import SUMMARY, inspect_run_dir, lock_holder
from ..engine.setup import check_run_config
from ..engine.trainer import EpochHook
from ..errors import CrossDistillError, one_line

TEACHER_CACHE_DIR = "teacher_cache"
"""The teacher cache every run of a sweep or study shares by default: ``<train.output_dir>/teacher_cache``."""


@dataclass(frozen=True)
class RunSpec:
    """One run: its name (a folder of the sweep's directory) and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


@dataclass
class Base:
    """The base run config of a sweep or study: the raw config (file + command-line overrides) and where its runs go."""

    data: dict[str, Any]
    name: str
    """The sweep or study name: the folder of ``train.output_dir`` its runs (and outputs) go to."""
    output_dir: Path

    @property
    def folder(self) -> Path:
        return self.output_dir / self.name

    def config(self, overrides: Sequence[str]) -> RunConfig:
        """The run config of ``overrides`` applied to the base, checked as a run checks it before it starts."""
        cfg = build_config(apply_overrides(self.data, list(overrides)))
        check_run_config(cfg)
        return cfg


def read_base(config: str, overrides: Sequence[str], name: str | None, teacher_cache: bool = True) -> Base:
    """The base config of a sweep or study from its file and ``overrides``; its runs show no progress bar (their
    log is in each run's train.log) and share one teacher cache by default (see :func:`default_teacher_cache`)."""
    data = apply_overrides(read_yaml(config), [*overrides, "train.progress=off"])
    cfg = build_config(data)
    check_run_config(cfg)
    sweep = name or Path(config).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=,-]*", sweep):
        raise CrossDistillError(f"name {sweep!r}: use letters, digits and _ . + = , - (it names a folder)")
    output_dir = Path(cfg.train.output_dir).expanduser().absolute()
    if teacher_cache:
        data = apply_overrides(data, default_teacher_cache(cfg, output_dir))
    return Base(data=data, name=sweep, output_dir=output_dir)


def default_teacher_cache(cfg: RunConfig, output_dir: Path) -> list[str]:
    """``train.teacher_cache=<output_dir>/teacher_cache`` when the config sets none and its method's teacher outputs
    can be cached: runs that share teacher, data, augmentation and seed then run the teacher once between them."""
    if cfg.train.teacher_cache or cfg.teacher is None or cfg.train.mixup > 0 or cfg.train.cutmix > 0:
        return []
    method = METHODS.get(cfg.method)
    standard = method.teacher_request is Distiller.teacher_request and method.compute_teacher is (
        Distiller.compute_teacher
    )
    if not (standard and method.teacher_outputs):
        return []
    return [f"train.teacher_cache={output_dir / TEACHER_CACHE_DIR}"]


def read_summary(run_dir: Path) -> RunSummary | None:
    """The summary of a finished run (its summary.json), or None."""
    try:
        saved = json.loads((run_dir / SUMMARY).read_text())
        return RunSummary(**{k: v for k, v in saved.items() if k in RunSummary.__dataclass_fields__})
    except (OSError, ValueError, TypeError):
        return None


def train_once(cfg: RunConfig, *, out=None, on_epoch: EpochHook | None = None) -> tuple[str, RunSummary | None]:
    """Train ``cfg``'s run unless it is finished: ``("finished", summary)`` when it already was, ``("trained",
    summary)`` when this call trained (or resumed) it, ``("busy", None)`` when another process holds it."""
    run_dir = run_dir_of(cfg)
    summary = read_summary(run_dir)
    if summary is not None:
        return "finished", summary
    resume = inspect_run_dir(run_dir).has_checkpoint
    env = init_distributed(cfg.train.device)
    try:
        trainer = Trainer(cfg, resume=resume, env=env, out=out, on_epoch=on_epoch)
        summary = trainer.fit()
        # another worker finished it between our look and our claim: the resumed run had nothing left to train
        done_before = trainer.resumed_from is not None and trainer.start_epoch >= cfg.train.epochs
        return ("finished" if done_before else "trained"), summary
    except CrossDistillError:
        if lock_holder(run_dir) is not None:
            return "busy", None
        summary = read_summary(run_dir)  # another worker finished it between our look and our claim
        if summary is not None:
            return "finished", summary
        raise
    finally:
        shutdown(env)


# ---------------------------------------------------------------- parsing


def split_values(text: str) -> list[str]:
    """``0.1,0.2,[1, 2]`` -> ``['0.1', '0.2', '[1, 2]']``: commas inside brackets or braces belong to a value."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if any(not value for value in values):
        raise CrossDistillError(f"{text!r}: an empty value between commas; give values as v1,v2,v3")
    return values


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(value) for value in split_values(text)]
    except ValueError:
        raise CrossDistillError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise CrossDistillError(f"--seeds {text!r} names a seed twice")
    return seeds


def folder_name(values: Sequence[tuple[str, str]]) -> str:
    """A run's folder name from its (key, value) pairs: ``kappa=0.01,seed=0`` (the last part of each key, the whole
    key where two would read the same), with characters a folder name cannot hold replaced."""
    last = [key.rsplit(".", 1)[-1] for key, _ in values]
    parts = []
    for (key, value), short in zip(values, last):
        label = short if last.count(short) == 1 else key
        parts.append(f"{label}={value}")
    name = re.sub(r"[^A-Za-z0-9_.+=,\-\[\]]", "_", ",".join(parts))
    return name[:200]


# ---------------------------------------------------------------- workers


INTERRUPTED = (
    "interrupted; run the same command again to continue (finished runs are kept, and a run with a checkpoint "
    "resumes from it)"
)


def start_workers(target: Callable[..., None], args: tuple, workers: int) -> None:
    """Run ``target(*args, worker, workers)`` in ``workers`` processes (spawn; in this process when 1), each with
    ``cores // workers`` torch threads; a worker that fails makes this one fail after all have ended."""
    if workers < 1:
        raise CrossDistillError(f"--workers {workers}: must be >= 1")
    if workers == 1:
        _set_threads(1)
        try:
            target(*args, 0, 1)
        except Preempted as stop:  # its run's advice (crossdistill train --resume RUN) would leave the search
            raise Preempted(
                f"stop signal received: saved {stop.checkpoint}; run the same command again to continue (the "
                "stopped run resumes from there)",
                stop.checkpoint,
            ) from None
        except KeyboardInterrupt:  # as above: Ctrl-C's advice is the search's own command
            raise KeyboardInterrupt(INTERRUPTED) from None
        return
    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus()
    processes = [
        context.Process(target=_worker_main, args=(target, args, i, workers, worker_gpu(gpus, i)))
        for i in range(workers)
    ]

    def forward(signum, frame) -> None:
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    # A stop signal sent to this process alone (``kill PID``, a scheduler that signals only the job's main process)
    # would otherwise end it and leave its workers training on, unseen: each worker saves its run and stops instead.
    previous = (
        {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
        if threading.current_thread() is threading.main_thread()
        else {}
    )
    try:
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join()
        except KeyboardInterrupt:
            for process in processes:
                process.join()
            raise KeyboardInterrupt(INTERRUPTED) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stopped = [p.exitcode for p in processes if p.exitcode != 0]
    if stopped and all(code == EXIT_PREEMPTED for code in stopped):
        raise Preempted(
            "stopped by a signal (SIGTERM/SIGUSR1): each run in training saved a checkpoint; run the same command "
            "again to continue",
            checkpoint="",
        )
    failed = [f"worker {i} (exit code {p.exitcode})" for i, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise CrossDistillError(
            f"{', '.join(failed)} stopped with an error (its message is above); run the same command again to "
            "continue: finished runs are kept"
        )


def available_cores() -> int:
    """The CPU threads this command may use: the cores this process may run on (its affinity: what SLURM's
    --cpus-per-task or taskset grant, not the whole machine), or fewer where ``OMP_NUM_THREADS`` says so."""
    try:
        granted = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this platform
        granted = os.cpu_count() or 1
    try:
        given = int(os.environ.get("OMP_NUM_THREADS", "").strip().split(",")[0])  # "4,2": OpenMP's nested form
    except ValueError:
        return granted
    return min(given, granted) if given > 0 else granted


def _set_threads(workers: int) -> None:
    torch.set_num_threads(max(1, available_cores() // workers))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (all of them when it is unset)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_gpu(gpus: Sequence[str], worker: int) -> str | None:
    """The GPU of worker ``worker``: the visible GPUs in turn (workers share them when there are more workers)."""
    return gpus[worker % len(gpus)] if gpus else None


def _worker_main(target: Callable[..., None], args: tuple, worker: int, workers: int, gpu: str | None = None) -> None:
    if gpu is not None:  # before CUDA starts in this (spawned) process: its runs see one GPU, as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _set_threads(workers)
    try:
        target(*args, worker, workers)
    except CrossDistillError as err:
        print(f"crossdistill: error: worker {worker}: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as stop:  # SIGTERM/SIGUSR1 (a SLURM preemption reaches every process): its run is saved
        print(f"crossdistill: worker {worker}: {stop}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        sys.exit(130)


def run_specs(base: Base, specs: Sequence[RunSpec], worker: int, workers: int) -> None:
    """One worker's loop over every run of a sweep (starting at its own offset): train what is neither finished
    nor held by another worker, one line per run."""
    tag = f"worker {worker}: " if workers > 1 else ""
    order = list(specs[worker:]) + list(specs[:worker])
    with open(os.devnull, "w") as quiet:
        for spec in order:
            cfg = base.config(spec.overrides)
            status, summary = train_once(cfg, out=quiet)
            if status == "busy":
                line = "in training by another worker: skipped"
            else:
                done = "already finished" if status == "finished" else "trained"
                line = (
                    f"{done}: last top-1 {summary.last_top1:.2f} | best {summary.best_top1:.2f} on "
                    f"{summary.eval_split} ({summary.wall_time_s:.0f}s)"
                )
            print(f"{tag}{spec.name}: {line}", flush=True)
