"""The training loop: one process or DDP under torchrun, AMP, EMA, evaluation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import RESUME_HINT, load_weights_file, remove_torn_files, save_atomic, write_text_atomic
from ..config import RunConfig, with_absolute_paths
from ..errors import CrossDistillError
from .distributed import (DistEnv, all_ranks_ok, all_reduce_sum, barrier, broadcast_from_main, init_distributed,
                          shutdown)
from .loaders import build_eval_loader, build_train_loader, epoch_seed, seed_everything, unwrap_worker_error
from .metrics import MetricsLog, topk_correct
from .preemption import Preempted, StopSignal
from .rundir import (BEST, CHECKPOINT, CHECKPOINT_FORMAT, CONFIG, LATEST, STEP_DIR, SUMMARY, RunDirLock,
                     inspect_run_dir, remove_run_files, step_checkpoints)
from .setup import autocast_dtype, build_run, check_run_config, count_parameters
from .snapshot import TensorSnapshot
from .step import build_train_step, collect_nonfinite_now
from ..data.device_augment import DeviceAugment
from ..version import __version__
from .teacher_cache import TeacherCache, cache_key, cache_widths

__all__ = ["RunSummary", "Trainer", "evaluate", "train"]


@dataclass
class RunSummary:
    run_dir: str
    epochs: int
    last_top1: float
    best_top1: float
    best_epoch: int
    last_top5: float
    ema_last_top1: float | None = None
    ema_best_top1: float | None = None
    wall_time_s: float = 0.0
    extra_parameters: int = 0
    student_parameters: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gathered_rng_states(env: DistEnv) -> list[dict[str, Any]] | None:
    """Every rank's RNG state, in rank order (all ranks must call it); None in one process."""
    if not env.distributed:
        return None
    states: list[Any] = [None] * env.world_size
    torch.distributed.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_run_name(cfg: RunConfig) -> str:
    teacher = cfg.teacher.name if cfg.teacher is not None else "none"
    return f"{cfg.method}-{teacher}-{cfg.student.name}".replace(os.sep, "_")  # hf-hub:org/name: one folder


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / (cfg.train.run_name or default_run_name(cfg))


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")
"""Optimiser group options that choose a kernel, not the maths: this run's choice, not the checkpoint's."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping the kernel choice of ``optimizer`` (fused or not):
    torch copies the checkpoint's flags into the groups, so a checkpoint written with a non-fused optimiser
    (another device, an older version) would silently turn fusion, and skipping steps on the device, off."""
    chosen = [{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen):
        group.update(flags)


class Trainer:
    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, env: DistEnv | None = None,
                 out=None):
        check_run_config(cfg)  # bad method arguments or data options fail here, before the run directory is touched
        self.cfg = cfg = with_absolute_paths(cfg)
        self.env = env or init_distributed(cfg.train.device)
        self.out = out if out is not None else sys.stdout
        if cfg.train.sync_bn and self.env.distributed and self.env.device.type != "cuda":
            raise CrossDistillError("train.sync_bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                                    "set train.sync_bn=false")
        self.run_dir = run_dir_of(cfg)
        self.run_lock = RunDirLock(self.run_dir) if self.env.is_main else None
        self.started_over_run = False  # the folder of an earlier run: removed again if this one fails at once
        self.resume = self._check_run_dir(resume, overwrite)
        try:
            self._set_up()
        except BaseException:
            self._release_run_dir(failed=True)
            raise

    def _set_up(self) -> None:
        cfg, resume = self.cfg, self.resume
        seed_everything(cfg.train.seed + self.env.rank)
        built = build_run(cfg, self.env.world_size)
        self.data, self.num_classes = built.data, built.num_classes
        self.device = self.env.device
        self.amp_dtype = autocast_dtype(cfg.train.amp, self.device)
        self.distiller = built.distiller
        self.student = self.distiller.student
        self.teacher_cache = self._setup_teacher_cache()
        self._build_loaders()
        self._build_optimisation()
        self.ema = None
        if cfg.train.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.student, decay=cfg.train.ema_decay, device=self.device)
        self.ema_snapshot: TensorSnapshot | None = None
        self.start_epoch, self.start_step = 0, 0
        self.resume_partial: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.nonfinite_steps = 0
        self.best = {"top1": -1.0, "epoch": -1, "ema_top1": -1.0}
        self.history: list[dict[str, Any]] = []
        self.wall_before = 0.0  # seconds of training in earlier sessions of this run (resumed)
        self.session_started: float | None = None
        self.epochs_changed_from: int | None = None
        if resume:
            self._load_checkpoint()
        self._create_run_dir(resume)
        self.log_file = MetricsLog(self.run_dir, cfg.train.tensorboard) if self.env.is_main else None
        if self.log_file is not None and resume:
            self.log_file.truncate_after(self.start_epoch)

    # ------------------------------------------------------------ setup
    def _setup_teacher_cache(self) -> TeacherCache | None:
        """The cache of the teacher outputs the method reads, where ``train.teacher_cache`` asks for one and
        they can be stored; else None (the step's teacher runner computes them every step)."""
        cfg, distiller = self.cfg, self.distiller
        cache_dir = cfg.train.teacher_cache
        if distiller.teacher is None or distiller.teacher_request().empty:
            if cache_dir:
                self.print(f"teacher cache not used: method {cfg.method!r} reads nothing from a teacher")
            return None
        cache = None
        if not cache_dir:
            pass
        elif not distiller.teacher_cacheable:
            self.print(f"teacher cache not used: method {cfg.method!r} reads teacher stage features or computes "
                       "something else from the teacher (only embeddings and logits are stored); the teacher runs "
                       "every step")
        elif cfg.train.mixup > 0 or cfg.train.cutmix > 0:
            self.print("teacher cache not used: with mixup/cutmix the teacher sees batches mixed after loading, "
                       "not stored samples; the teacher runs every step")
        else:
            cache = self._open_teacher_cache(cache_dir, distiller.teacher_request().outputs)
        return cache

    def _open_teacher_cache(self, cache_dir: str, outputs: tuple[str, ...]) -> TeacherCache:
        cfg, teacher = self.cfg, self.distiller.teacher
        key = cache_key(cfg, teacher, num_train=len(self.data.train), data_mean=self.data.mean,
                        data_std=self.data.std, device_type=self.device.type, amp_dtype=self.amp_dtype,
                        channels_last=cfg.train.channels_last, store_dtype=cfg.train.teacher_cache_dtype)
        rank = f"[rank {self.env.rank}] " if self.env.distributed else ""
        cache = TeacherCache(cache_dir, key, outputs, cache_widths(outputs, teacher, self.num_classes),
                             len(self.data.train), store_dtype=cfg.train.teacher_cache_dtype, is_main=self.env.is_main,
                             agree=lambda ok: all_ranks_ok(self.env, ok),
                             log=lambda message: print(rank + message, file=self.out, flush=True))
        self.print(cache.describe())
        return cache

    def _check_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Lock the run directory (rank 0) and decide what to do with what it holds, before anything is built
        or written. Returns whether to resume from a checkpoint (else the run starts from the beginning: what
        an earlier run wrote there is replaced once this one is set up, see :meth:`_create_run_dir`)."""
        decision: dict[str, Any] = {}
        if self.env.is_main:
            try:
                decision = {"resume": self._claim_run_dir(resume, overwrite)}
            except CrossDistillError as err:
                decision = {"error": str(err)}
        decision = broadcast_from_main(self.env, decision)
        if "error" in decision:
            raise CrossDistillError(decision["error"])
        return decision["resume"]

    def _claim_run_dir(self, resume: bool, overwrite: bool) -> bool:
        found = inspect_run_dir(self.run_dir)
        if found.exists and not found.is_run and not found.empty:
            raise CrossDistillError(
                f"{self.run_dir} is not a crossdistill run directory (it holds {found.describe_foreign()}) and is "
                "left as it is; choose another train.run_name / train.output_dir (an empty or new directory)")
        self.run_lock.acquire()
        self.started_over_run = found.is_run
        try:
            contents = inspect_run_dir(self.run_dir, own_lock=True)
            if contents.impostors and not (resume and contents.has_checkpoint):
                names = ", ".join(p.relative_to(self.run_dir).as_posix() for p in contents.impostors[:3])
                raise CrossDistillError(
                    f"{self.run_dir} holds {names} under the name of a file a run writes, but not as a run writes it "
                    "(unreadable, or another tool's file): a run would replace it. Move it out of the directory, "
                    "or choose another train.run_name / train.output_dir")
            if contents.has_checkpoint:
                if resume:
                    return True
                if overwrite:
                    return False
                raise CrossDistillError(
                    f"run directory {self.run_dir} already holds a run; pass --resume to continue it, "
                    "--overwrite to replace it, or choose another train.run_name / train.output_dir")
            if found.is_run or contents.is_run:
                self.print(f"{self.run_dir} holds no checkpoint (an earlier attempt stopped before its first one): "
                           "starting the run from the beginning")
                return False
            if resume:
                raise CrossDistillError(f"nothing to resume: no checkpoint in {self.run_dir}")
            return False
        except CrossDistillError:
            self._release_run_dir(failed=True)
            raise

    def _release_run_dir(self, failed: bool = False) -> None:
        """Unlock the run directory. After a failure before the run's first checkpoint, also remove what it
        wrote (and the folders it made): a failed run leaves no run directory behind, and the same command
        starts it again."""
        lock = self.run_lock
        if lock is None or not lock.held:
            return
        remove_run_dir = False
        if failed:
            try:
                contents = inspect_run_dir(self.run_dir)
                if not contents.has_checkpoint:
                    remove_run_files(contents)
                    remove_run_dir = self.started_over_run
            except (OSError, CrossDistillError):
                pass  # the failure being raised is the one to report
        lock.release(remove_created=failed)
        if remove_run_dir:
            try:
                self.run_dir.rmdir()
            except OSError:
                pass  # it holds files a run does not write: they stay

    def _create_run_dir(self, resume: bool) -> None:
        """Called once everything is built: a run that fails on bad input leaves no directory behind."""
        if resume:
            if self.env.is_main:
                torn = remove_torn_files(self.run_dir) + remove_torn_files(self.run_dir / STEP_DIR)
                if torn:
                    self.print(f"removed {len(torn)} unfinished checkpoint write(s) of the interrupted run: "
                               + ", ".join(p.name for p in torn))
                if self.epochs_changed_from is not None:
                    self._record_epochs()
            return
        barrier(self.env)
        if self.env.is_main:
            contents = inspect_run_dir(self.run_dir)
            removed = remove_run_files(contents)
            if removed:
                self.print(f"removed the {len(removed)} file(s) of the earlier run in {self.run_dir}")
            if contents.foreign:
                self.print(f"kept what a run does not write in {self.run_dir}: {contents.describe_foreign()}")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config(self.run_dir / CONFIG)
        barrier(self.env)

    def _record_epochs(self) -> None:
        """Write the changed ``train.epochs`` into the run's config.yaml (the rest of it stays as it was)."""
        path = self.run_dir / CONFIG
        try:
            saved = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            saved = None
        if isinstance(saved, dict) and isinstance(saved.get("train"), dict):
            saved["train"]["epochs"] = self.cfg.train.epochs
            write_text_atomic(path, yaml.safe_dump(saved, sort_keys=False))
        else:
            self._write_config(path)

    def _write_config(self, path: Path) -> None:
        write_text_atomic(path, self.cfg.to_yaml(),
                          hint="Free some space (or choose another train.output_dir) and run the command again.")

    def _build_loaders(self) -> None:
        cfg, env = self.cfg, self.env
        pin = self.device.type == "cuda"
        workers = cfg.data.num_workers
        self.train_set, self.train_sampler, self.loader_generator, self.train_loader = build_train_loader(
            self.data.train, seed=cfg.train.seed, batch_size=cfg.train.batch_size, num_workers=workers,
            world_size=env.world_size, rank=env.rank, pin_memory=pin, teacher_cache=self.teacher_cache,
        )
        self.eval_loader = build_eval_loader(
            self.data.eval, batch_size=cfg.train.eval_batch_size or cfg.train.batch_size, num_workers=workers,
            world_size=env.world_size, rank=env.rank, pin_memory=pin,
        )
        self.steps_per_epoch = len(self.train_loader)

    def _build_optimisation(self) -> None:
        from timm.scheduler import create_scheduler_v2

        o, t = self.cfg.optim, self.cfg.train
        self.effective_batch = t.batch_size * self.env.world_size
        self.lr_factor = 1.0
        if o.scale_lr == "linear":
            self.lr_factor = self.effective_batch / t.reference_batch
        lr, min_lr, warmup_lr = o.lr * self.lr_factor, o.min_lr * self.lr_factor, o.warmup_lr * self.lr_factor
        device_augment = None
        if self.cfg.data.device_augment:
            device_augment = DeviceAugment(self.cfg.data.img_size, self.data.mean, self.data.std)
        self.step_fn = build_train_step(self.distiller, t, o, self.device, lr=lr, distributed=self.env.distributed,
                                        cache=self.teacher_cache, device_augment=device_augment)
        self.model, self.optimizer, self.scaler = self.step_fn.model, self.step_fn.optimizer, self.step_fn.scaler
        self.teacher_runner = self.step_fn.teacher
        self.scheduler = None
        if o.sched != "none":
            try:
                self.scheduler, _ = create_scheduler_v2(
                    self.optimizer, sched=o.sched, num_epochs=t.epochs, decay_epochs=o.decay_epochs,
                    decay_rate=o.decay_rate, min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=o.warmup_epochs,
                    cooldown_epochs=0, updates_per_epoch=self.steps_per_epoch,
                )
            except (ValueError, AssertionError) as err:
                raise CrossDistillError(f"optim.sched={o.sched!r}: {err}") from None
            if self.scheduler is None:
                raise CrossDistillError(f"optim.sched={o.sched!r} is not a timm scheduler (cosine, step, ...)")

    # ------------------------------------------------------------ checkpoints
    def _state(self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly: ``epoch`` epochs done, plus ``step`` steps of the next."""
        return {
            "format": CHECKPOINT_FORMAT,
            "crossdistill_version": __version__,
            "epoch": epoch,
            "step": step,
            "global_step": epoch * self.steps_per_epoch + step,
            "partial_epoch": partial or {},
            "student": self.student.state_dict(),
            "extras": {name: m.state_dict() for name, m in self.distiller.extra_modules().items()},
            "student_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "best": dict(self.best),
            "history": self.history,
            "config": self.cfg.to_dict(),
            "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "classes": list(self.data.classes),
            "num_classes": self.num_classes,
            "world_size": self.env.world_size,
            "wall_time_s": self.wall_time(),
        }

    def _write_latest(self, path: Path, epoch: int, step: int) -> None:
        pointer = {"file": str(path.relative_to(self.run_dir)), "epoch": epoch, "step": step,
                   "global_step": epoch * self.steps_per_epoch + step}
        write_text_atomic(self.run_dir / LATEST, json.dumps(pointer), hint=self._disk_full_hint())

    def _has_checkpoint(self) -> bool:
        return (self.run_dir / CHECKPOINT).exists() or bool(step_checkpoints(self.run_dir / STEP_DIR))

    def _disk_full_hint(self) -> str:
        if self._has_checkpoint():
            return RESUME_HINT
        return ("Free some space (or move train.output_dir) and run the same command again "
                "(the run has no checkpoint yet: it starts from the beginning).")

    def _on_main_then_agree(self, write) -> None:
        """Run ``write`` on the main rank, then let every rank learn whether it succeeded: a failure there
        (a full disk) stops every rank instead of leaving the others waiting in the next collective."""
        error = None
        if self.env.is_main:
            try:
                write()
            except Exception as err:
                error = err
        if not all_ranks_ok(self.env, error is None):
            if error is not None:
                raise error
            raise CrossDistillError(f"writing to {self.run_dir} failed on rank 0 (see its message)")

    def _refuse_nonfinite_weights(self, when: str, file: str) -> None:
        """Stop every rank before writing ``file`` when the student, its extra modules or the EMA hold inf/NaN
        (weights or buffers): a run that diverged must not end as a success, and the last good checkpoint stays."""
        named = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        for module_name, module in self.distiller.extra_modules().items():
            named.update({f"{module_name}.{k}": v for k, v in module.state_dict().items()})
        if self.ema is not None:
            named.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        floating = [(k, v) for k, v in named.items() if v.is_floating_point()]
        finite = torch.stack([torch.isfinite(v).all() for _, v in floating]).tolist() if floating else []
        bad = [name for (name, _), ok in zip(floating, finite) if not ok]
        if all_ranks_ok(self.env, not bad):
            return
        if not bad:
            raise CrossDistillError(f"stopping: another rank holds non-finite weights {when} (see its message)")
        if self._has_checkpoint():
            kept = f"the last good checkpoint is kept in {self.run_dir}"
            example = f"crossdistill train --resume {self.run_dir} optim.clip_grad=1.0"
        else:
            kept, example = "the run has no checkpoint yet", "the same command with optim.clip_grad=1.0"
        raise CrossDistillError(
            f"stopping: non-finite weights {when} (inf/NaN in {len(bad)} tensor(s): {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); {file} was not written and {kept}. The training diverged: "
            f"lower optim.lr or set optim.clip_grad (e.g. {example})"
        )

    def _save(self, epoch: int, improved: bool, row: dict[str, Any] | None = None) -> None:
        """End-of-epoch checkpoint (last.pt, and best.pt when the top-1 improved), then the metrics row."""
        def write() -> None:
            state = self._state(epoch)
            save_atomic(state, self.run_dir / CHECKPOINT, hint=self._disk_full_hint())
            self._write_latest(self.run_dir / CHECKPOINT, epoch, 0)
            if improved:
                keys = ("format", "epoch", "student", "student_ema", "config", "normalization", "classes", "num_classes")
                save_atomic({k: state[k] for k in keys}, self.run_dir / BEST, hint=self._disk_full_hint())
            if row is not None and self.log_file is not None:
                self.log_file.write(row)

        self._on_main_then_agree(write)

    def _save_step(self, epoch: int, step: int, partial: dict[str, Any]) -> Path:
        """Mid-epoch checkpoint under checkpoints/, keeping the newest ``train.keep_step_checkpoints``."""
        folder = self.run_dir / STEP_DIR
        path = folder / f"step-{epoch * self.steps_per_epoch + step:09d}.pt"
        self._refuse_nonfinite_weights(f"at epoch {epoch + 1}, step {step}", str(path.relative_to(self.run_dir)))
        per_rank = gathered_rng_states(self.env)  # mid-epoch: each rank continues its own random streams

        def write() -> None:
            state = self._state(epoch, step, partial)
            if per_rank is not None:
                state["rng_per_rank"] = per_rank
            save_atomic(state, path, hint=self._disk_full_hint())
            self._write_latest(path, epoch, step)
            for old in step_checkpoints(folder)[: -self.cfg.train.keep_step_checkpoints]:
                old.unlink(missing_ok=True)

        self._on_main_then_agree(write)
        return path

    def latest_checkpoint(self) -> Path:
        """The newest complete checkpoint of the run (epoch or step)."""
        candidates = []
        pointer = self.run_dir / LATEST
        if pointer.exists():
            try:
                candidates.append(self.run_dir / json.loads(pointer.read_text())["file"])
            except (ValueError, KeyError):
                pass
        candidates += step_checkpoints(self.run_dir / STEP_DIR)[::-1]
        candidates.append(self.run_dir / CHECKPOINT)
        for path in candidates:
            if path.exists():
                return path
        raise CrossDistillError(f"nothing to resume: no checkpoint in {self.run_dir}")

    def _load_checkpoint(self) -> None:
        path = self.latest_checkpoint()
        state = load_weights_file(path)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CrossDistillError(f"{path} is not a crossdistill run checkpoint (format {state.get('format')!r})")
        saved_world = int(state.get("world_size", self.env.world_size))
        if int(state.get("step", 0)) and saved_world != self.env.world_size:
            raise CrossDistillError(
                f"{path} was written in the middle of an epoch by {saved_world} process(es), and this run has "
                f"{self.env.world_size}: the samples already trained on are counted per process, so a mid-epoch "
                f"resume needs the same number. Resume with {saved_world} process(es), or delete "
                f"{self.run_dir / STEP_DIR} and {self.run_dir / LATEST} to restart from the last epoch-end "
                f"checkpoint ({CHECKPOINT}).")
        self.student.load_state_dict(state["student"])
        extras = self.distiller.extra_modules()
        if set(extras) != set(state["extras"]):
            raise CrossDistillError(
                f"{path} holds modules {sorted(state['extras'])} but method {self.cfg.method!r} has {sorted(extras)}: "
                "the config changed since the checkpoint was written"
            )
        for name, module in extras.items():
            module.load_state_dict(state["extras"][name])
        if self.ema is not None and state.get("student_ema") is not None:
            self.ema.module.load_state_dict(state["student_ema"])
        saved_epochs = int(((state.get("config") or {}).get("train") or {}).get("epochs", self.cfg.train.epochs))
        done = int(state["epoch"])
        if saved_epochs != self.cfg.train.epochs and self.cfg.train.epochs <= done:
            raise CrossDistillError(
                f"train.epochs={self.cfg.train.epochs}, but the run in {self.run_dir} has already trained {done} of its "
                f"{saved_epochs} epochs; resume it with its own train.epochs ({saved_epochs}), or a larger value to "
                "train it longer")
        load_optimizer_state(self.optimizer, state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None and saved_epochs == self.cfg.train.epochs:
            self.scheduler.load_state_dict(state["scheduler"])  # else: re-planned below
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank")
        set_rng_state(per_rank[self.env.rank] if per_rank and len(per_rank) == self.env.world_size else state["rng"])
        self.best = dict(state["best"])
        self.history = list(state.get("history", []))
        self.start_epoch = int(state["epoch"])
        self.start_step = int(state.get("step", 0))
        self.resume_partial = dict(state.get("partial_epoch") or {})
        self.resumed_from = path
        self.wall_before = float(state.get("wall_time_s", 0.0))
        if saved_epochs != self.cfg.train.epochs:
            self._replan_schedule(saved_epochs)

    def _replan_schedule(self, saved_epochs: int) -> None:
        """``train.epochs`` changed on resume: the lr schedule continues as if planned for the new length."""
        before = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step(self.start_epoch)  # epoch-based schedules
            self.scheduler.step_update(self.start_epoch * self.steps_per_epoch + self.start_step)  # per-step ones
        epochs = self.cfg.train.epochs
        self.epochs_changed_from = saved_epochs
        self.print(f"train.epochs changed from {saved_epochs} to {epochs}: the run continues after epoch "
                   f"{self.start_epoch} with its lr schedule ({self.cfg.optim.sched}) re-planned over {epochs} epochs "
                   f"(lr {before:g} -> {self.optimizer.param_groups[0]['lr']:g}); config.yaml records "
                   f"train.epochs={epochs}")

    # ------------------------------------------------------------ loop
    def print(self, *args) -> None:
        if self.env.is_main:
            print(*args, file=self.out, flush=True)

    def describe(self) -> None:
        cfg, env = self.cfg, self.env
        teacher = self.distiller.teacher
        self.print(f"run directory: {self.run_dir}")
        self.print(
            f"method {cfg.method}: teacher {cfg.teacher.name if teacher is not None else '-'} -> student {cfg.student.name}"
            f" | {self.num_classes} classes | {len(self.data.train)} train / {len(self.data.eval)} eval images"
        )
        self.print(
            f"student {count_parameters(self.student) / 1e6:.2f}M parameters, "
            f"extra trainable {self.distiller.extra_parameter_count() / 1e6:.3f}M"
            + (f", teacher inputs re-normalised to its own mean/std" if teacher is not None and teacher.renormalizes else "")
        )
        if teacher is not None and self.cfg.teacher is not None and not (self.cfg.teacher.checkpoint or self.cfg.teacher.pretrained):
            self.print("warning: the teacher has neither checkpoint nor pretrained weights: it is randomly initialised")
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        lr = cfg.optim.lr * self.lr_factor
        scaled = f" = {cfg.optim.lr:g} x {self.effective_batch}/{cfg.train.reference_batch}" if self.lr_factor != 1 else ""
        self.print(
            f"device {self.device} x {env.world_size} process(es) | per-process batch {cfg.train.batch_size} | "
            f"effective batch {self.effective_batch} | lr {lr:g}{scaled} ({cfg.optim.opt}, "
            f"{cfg.optim.sched}) | amp {amp} | {self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs"
        )
        reference = cfg.train.reference_batch
        if reference is not None and reference != self.effective_batch and cfg.optim.scale_lr == "none":
            self.print(
                f"warning: effective batch {self.effective_batch} differs from the recipe's reference {reference} "
                f"({cfg.train.batch_size} per process x {env.world_size}); the learning rate is not rescaled. "
                f"Run on {reference // cfg.train.batch_size} processes to match it, or pass optim.scale_lr=linear "
                f"(lr {cfg.optim.lr:g} -> {cfg.optim.lr * self.effective_batch / reference:g})."
            )

    def fit(self, stop_after: int | None = None) -> RunSummary:
        """Train to ``train.epochs`` (or only up to epoch ``stop_after``, leaving a resumable checkpoint).

        On SIGTERM/SIGUSR1 it saves a checkpoint at the next step boundary and raises :class:`Preempted`.
        The run directory is unlocked at the end; a run that fails before its first checkpoint removes it.
        """
        try:
            return self._fit(stop_after)
        except Preempted:
            raise
        except CrossDistillError as err:
            self._release_run_dir(failed=True)
            unwrapped = unwrap_worker_error(err)
            if unwrapped is err:
                raise
            raise unwrapped from err
        except BaseException:
            self._release_run_dir(failed=True)
            raise
        finally:
            self._release_run_dir()

    def _fit(self, stop_after: int | None) -> RunSummary:
        cfg = self.cfg
        if self.resumed_from is not None and self.start_epoch >= cfg.train.epochs:
            return self._finished()
        self.describe()
        if self.resumed_from is not None:
            self.print(f"resuming from {self.resumed_from} (epoch {self.start_epoch} done"
                       + (f", {self.start_step} steps into epoch {self.start_epoch + 1})" if self.start_step else ")"))
        started = self.session_started = time.time()
        mixup = self._mixup()
        try:
            with StopSignal() as stop:
                end = cfg.train.epochs if stop_after is None else min(stop_after, cfg.train.epochs)
                for epoch in range(self.start_epoch, end):
                    self._run_epoch(epoch, mixup, stop)
                    if epoch + 1 < end and self._stop_requested(stop):
                        raise Preempted(
                            f"stop signal received: saved {self.run_dir / CHECKPOINT} after epoch {epoch + 1}; "
                            f"continue with: crossdistill train --resume {self.run_dir}", str(self.run_dir / CHECKPOINT))
        finally:
            if self.log_file is not None:
                self.log_file.close()
        return self._summary(self.wall_time())

    def wall_time(self) -> float:
        """Seconds this run has trained, over all its sessions (resumes) so far."""
        session = time.time() - self.session_started if self.session_started is not None else 0.0
        return self.wall_before + session

    def _finished(self) -> RunSummary:
        """A resumed run that has trained all its epochs: say so and keep its summary."""
        epochs = self.cfg.train.epochs
        self.print(f"run {self.run_dir} is already finished ({self.start_epoch}/{epochs} epochs trained): nothing "
                   f"to do. To train it longer, resume it with train.epochs=N (N > {epochs}; the lr schedule is then "
                   "re-planned over N epochs)")
        try:
            saved = json.loads((self.run_dir / SUMMARY).read_text())
            return RunSummary(**{k: v for k, v in saved.items() if k in RunSummary.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return self._summary(self.wall_before)  # killed after its last checkpoint, before its summary

    def _run_epoch(self, epoch: int, mixup, stop: StopSignal) -> None:
        cfg = self.cfg
        train_stats = self.train_one_epoch(epoch, mixup, stop)
        self._refuse_nonfinite_weights(f"after epoch {epoch + 1}", CHECKPOINT)
        epoch_time = train_stats.pop("_time")
        row: dict[str, Any] = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **train_stats}
        improved = False
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            evaluation = evaluate(self.student, self.eval_loader, self.device, self.env, self.amp_dtype)
            row.update({"eval_top1": evaluation["top1"], "eval_top5": evaluation["top5"]})
            if evaluation["top1"] > self.best["top1"]:
                self.best.update(top1=evaluation["top1"], epoch=epoch + 1)
                improved = True
            if self.ema is not None:
                ema_eval = evaluate(self.ema.module, self.eval_loader, self.device, self.env, self.amp_dtype)
                row.update({"ema_top1": ema_eval["top1"], "ema_top5": ema_eval["top5"]})
                self.best["ema_top1"] = max(self.best["ema_top1"], ema_eval["top1"])
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1, row.get("eval_top1"))
        row["epoch_time_s"] = round(epoch_time, 2)
        self.history.append(row)
        self._save(epoch + 1, improved, row)
        self.print(self._format_row(row))

    def _mixup(self):
        t = self.cfg.train
        if t.mixup <= 0 and t.cutmix <= 0:
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob, switch_prob=t.mixup_switch_prob,
                     label_smoothing=t.label_smoothing, num_classes=self.num_classes)

    def train_one_epoch(self, epoch: int, mixup=None, stop: StopSignal | None = None) -> dict[str, float]:
        cfg, device = self.cfg, self.device
        first_step = 0
        if epoch == self.start_epoch and self.start_step:
            first_step = self.start_step  # RNG state was restored from the mid-epoch checkpoint
        else:
            seed_everything(epoch_seed(cfg.train.seed, epoch, self.env.rank))
        self.loader_generator.manual_seed(epoch_seed(cfg.train.seed, epoch, self.env.rank))
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.skip = first_step * cfg.train.batch_size
        self.train_set.set_epoch(epoch)
        self.distiller.on_epoch_start(epoch, cfg.train.epochs)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        if first_step:
            sums = {k: torch.tensor(v, device=device) for k, v in self.resume_partial.get("sums", {}).items()}
            steps = int(self.resume_partial.get("steps", 0))
        skipped = torch.zeros((), device=device)
        start = time.time()
        progress = self._progress(epoch, first_step)
        every = cfg.train.checkpoint_every_steps
        if self.teacher_cache is not None:
            self.teacher_cache.begin_epoch(epoch)
            hits, misses = self.teacher_cache.hits, self.teacher_cache.misses
        for step, batch in enumerate(self.train_loader, start=first_step):
            global_step = epoch * self.steps_per_epoch + step
            images, target = self.step_fn.to_device(batch[0], batch[1])
            if mixup is not None:
                images, target = mixup(images, target)
            cached = self.teacher_cache is not None
            result = self.step_fn(images, target, batch[2] if cached else None, tag=(epoch, step),
                                  prefetched=(batch[3], batch[4]) if cached and len(batch) == 5 else None)
            output, loss, grad_norm = result.output, result.loss, result.grad_norm
            if result.scaler_skipped is not None:
                skipped += result.scaler_skipped  # the scaler found inf/NaN gradients and skipped this step
            if self.scheduler is not None:  # by position in the run, skipped or not (see TrainStep)
                self.scheduler.step_update(global_step + 1)
            if not result.finite:
                self._on_nonfinite(epoch, step, {k: float(v.detach().float()) for k, v in output.losses.items()})
                skipped += 1
                continue
            if self.ema is not None:
                self._update_ema(global_step, result.skipped_on_device)
            terms = {**output.losses, "loss": loss}
            if grad_norm is not None:
                terms["grad_norm"] = grad_norm
            for name, value in terms.items():
                value = value.detach().float()
                if result.ok is not None:  # deferred finiteness check: a skipped step adds nothing
                    value = torch.where(result.ok, value, torch.zeros_like(value))
                sums[name] = sums.get(name, 0) + value
            steps += 1
            last_step = step + 1 == self.steps_per_epoch
            checkpoint_now = bool(every and (global_step + 1) % every == 0 and not last_step)
            report_now = progress is not None and (step % 20 == 0 or last_step)
            if self.step_fn.pending and collect_nonfinite_now(
                    len(self.step_fn.pending), self.step_fn.finite_check_every, global_step=global_step,
                    last_step=last_step, checkpoint_now=checkpoint_now, report_now=report_now,
                    stop_requested=stop is not None and stop.requested, watching_stop=stop is not None,
                    distributed=self.env.distributed):
                found = self._collect_nonfinite()  # deferred check: one sync every N steps
                steps -= found
                skipped += found
            if progress is not None:
                progress.update(1)
                if report_now:
                    progress.set_postfix({k: f"{v.item() / max(steps, 1):.4g}" for k, v in sums.items()
                                          if k != "grad_norm"})
            if checkpoint_now:
                self._save_step(epoch, step + 1, self._partial(sums, steps))
            if (stop is not None and not last_step and (not self.env.distributed or (global_step + 1) % 10 == 0)
                    and self._stop_requested(stop)):
                path = self._save_step(epoch, step + 1, self._partial(sums, steps))
                if progress is not None:
                    progress.close()
                raise Preempted(
                    f"stop signal received: saved {path} at epoch {epoch + 1}, step {step + 1}/{self.steps_per_epoch}; "
                    f"continue with: crossdistill train --resume {self.run_dir}", str(path))
        if progress is not None:
            progress.close()
        if self.teacher_cache is not None:
            self.teacher_cache.close()
            read, computed = self.teacher_cache.hits - hits, self.teacher_cache.misses - misses
            self.print(f"teacher cache, epoch {epoch + 1}: {read} samples read, {computed} computed by the teacher")
        self.train_sampler.skip = 0
        self.start_step = 0
        names = sorted(sums)
        totals = torch.stack([torch.as_tensor(sums[n], device=device) for n in names] + [skipped])
        all_reduce_sum(totals, self.env)
        counted = max(steps, 1) * self.env.world_size
        means = (totals[:-1] / counted).tolist()
        stats = {f"train_{n}": v for n, v in zip(names, means)}
        stats["skipped_steps"] = int(totals[-1].item())
        stats["_time"] = time.time() - start
        return stats

    def _update_ema(self, global_step: int, skipped: torch.Tensor | None) -> None:
        """Move the EMA towards the student, unless the device skipped this step (``skipped``, a 0-d bool
        tensor): then it is put back exactly as it was, with no host sync."""
        if skipped is None:
            self.ema.update(self.student, step=global_step)
            return
        if self.ema_snapshot is None:
            self.ema_snapshot = TensorSnapshot(self.ema.module.state_dict().values())
        self.ema_snapshot.take()
        self.ema.update(self.student, step=global_step)
        self.ema_snapshot.restore(where=skipped)

    @staticmethod
    def _partial(sums: dict[str, torch.Tensor], steps: int) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in sums.items()}, "steps": steps}

    def _collect_nonfinite(self) -> int:
        """Report the steps the deferred finiteness check skipped on the device; returns how many."""
        found = self.step_fn.collect_nonfinite()
        for (epoch, step), terms in found:
            self._on_nonfinite(epoch, step, terms)
        return len(found)

    def _on_nonfinite(self, epoch: int, step: int, terms: dict[str, float]) -> None:
        self.nonfinite_steps += 1
        self.print(f"warning: non-finite loss or gradient at epoch {epoch + 1}, step {step + 1}: {terms}; step skipped "
                   f"({self.nonfinite_steps}/{self.cfg.train.max_nonfinite_steps} allowed)")
        if self.nonfinite_steps > self.cfg.train.max_nonfinite_steps:
            raise CrossDistillError(
                f"stopping: {self.nonfinite_steps} non-finite steps (last at epoch {epoch + 1}, step {step + 1}, "
                f"loss terms {terms}). Lower optim.lr, set optim.clip_grad, or check the data; the last good "
                f"checkpoint is kept in {self.run_dir}"
            )

    def _stop_requested(self, stop: StopSignal) -> bool:
        if not self.env.distributed:
            return stop.requested
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _progress(self, epoch: int, first_step: int = 0):
        if not (self.env.is_main and self.cfg.train.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                    leave=False, dynamic_ncols=True, file=sys.stderr)

    @staticmethod
    def _format_row(row: dict[str, Any]) -> str:
        parts = [f"epoch {row['epoch']}"]
        for key, value in row.items():
            if key == "epoch":
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        return " | ".join(parts)

    def _summary(self, wall: float) -> RunSummary:
        evaluated = [r for r in self.history if "eval_top1" in r]
        last = evaluated[-1] if evaluated else {}
        summary = RunSummary(
            run_dir=str(self.run_dir),
            epochs=self.cfg.train.epochs,
            last_top1=last.get("eval_top1", math.nan),
            last_top5=last.get("eval_top5", math.nan),
            best_top1=self.best["top1"],
            best_epoch=self.best["epoch"],
            ema_last_top1=last.get("ema_top1"),
            ema_best_top1=self.best["ema_top1"] if self.ema is not None else None,
            wall_time_s=round(wall, 2),  # all sessions of the run (resumes included)
            extra_parameters=self.distiller.extra_parameter_count(),
            student_parameters=count_parameters(self.student),
            history=self.history,
        )
        if self.env.is_main:
            write_text_atomic(self.run_dir / SUMMARY, json.dumps(summary.__dict__, indent=2), hint=RESUME_HINT)
            self.print(
                f"done: last top-1 {summary.last_top1:.2f} | best top-1 {summary.best_top1:.2f} "
                f"(epoch {summary.best_epoch}) | {wall:.1f}s | {self.run_dir}"
            )
        return summary


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, env: DistEnv | None = None,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of ``model`` on ``loader`` (sharded across ranks under DDP)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        top1, top5 = topk_correct(logits.float(), target)
        counts += torch.stack([top1, top5, torch.tensor(target.shape[0], device=device)]).double()
    if env is not None:
        all_reduce_sum(counts, env)
    model.train(was_training)
    total = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / total, "top5": 100.0 * counts[1].item() / total,
            "samples": int(counts[2].item())}


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, out=None) -> RunSummary:
    """Train one run described by ``cfg``; returns its summary. Works under torchrun as well."""
    env = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, resume=resume, overwrite=overwrite, env=env, out=out).fit()
    finally:
        shutdown(env)
