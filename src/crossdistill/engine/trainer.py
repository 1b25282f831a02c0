"""The training loop: one process or DDP under torchrun, AMP, EMA, evaluation, checkpoints, resume."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import RESUME_HINT, write_text_atomic
from ..collectives import all_reduce
from ..config import RunConfig, with_absolute_paths
from ..data import evaluated_split
from ..data.device_augment import DeviceAugment
from ..errors import CrossDistillError
from .checkpointing import Checkpointer, Resumed
from .claim import RunDirClaim
from .distributed import DistEnv, all_ranks_ok, broadcast_from_main, init_distributed, shutdown
from .loaders import build_eval_loader, build_train_loader, epoch_seed, seed_everything, unwrap_worker_error
from .logs import Progress, RunLogger
from .metrics import EpochTotals, MetricsLog, TeacherClassifier, evaluate
from .preemption import Preempted, StopSignal
from .rundir import CHECKPOINT, SUMMARY, inspect_run_dir, resume_command
from .setup import (
    autocast_dtype,
    batch_warning,
    build_run,
    build_scheduler,
    check_run_config,
    count_parameters,
    describe_batch,
    describe_lr,
    describe_weights,
    lr_plan,
    make_mixup,
    optimizer_steps_per_epoch,
    reads_teacher_head,
    teacher_head_classes,
    teacher_size_source,
    untrained_teacher_warning,
    warmup_warning,
)
from .snapshot import TensorSnapshot
from .step import MicroBatch, build_train_step, collect_nonfinite_now
from .teacher_cache import TeacherCache, cache_key, cache_widths

__all__ = ["EpochHook", "RunSummary", "StoppedByHook", "Trainer", "evaluate", "train"]

EpochHook = Callable[[int, dict[str, Any]], bool | None]
"""Called after each epoch with (epoch, its row: lr, train losses, eval_top1 on evaluated epochs, ...), once the
epoch's checkpoint is saved; returning True stops the run there (:class:`StoppedByHook`), e.g. a pruned trial of
a hyper-parameter search. Under DDP rank 0's answer counts."""


class StoppedByHook(Preempted):
    """Raised by the trainer when its epoch hook asked it to stop: the run is unfinished and resumable."""


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
    teacher_top1: float | None = None
    """The teacher's top-1 on the evaluation split, measured before the student trained (None: not measured)."""
    eval_split: str = "test"
    """The split the accuracies are measured on: ``val`` (data.val_fraction, carved out of training) or the
    evaluation split (``test``)."""
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        env: DistEnv | None = None,
        out=None,
        on_epoch: EpochHook | None = None,
    ):
        self.on_epoch = on_epoch
        check_run_config(cfg)  # bad method arguments or data options fail here, before the run directory is touched
        self.cfg = cfg = with_absolute_paths(cfg)
        self.env = env or init_distributed(cfg.train.device)
        self.out = out if out is not None else sys.stdout
        self.logs = RunLogger(cfg, self.env, self.out)  # train.log, step scalars, progress, trackers (rank 0)
        if cfg.train.sync_bn and self.env.distributed and self.env.device.type != "cuda":
            raise CrossDistillError(
                "train.sync_bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); set train.sync_bn=false"
            )
        self.run_dir_claim = RunDirClaim(cfg, self.env, self.print)
        self.run_dir = self.run_dir_claim.run_dir
        self.resume = self.run_dir_claim.claim(resume, overwrite)
        try:
            self._set_up()
        except BaseException:
            self.run_dir_claim.release(failed=True)
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
        self.teacher_eval: dict[str, Any] | None = None
        self.checkpoints = Checkpointer(
            self.run_dir,
            self.env,
            cfg,
            distiller=self.distiller,
            ema=self.ema,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            steps_per_epoch=self.steps_per_epoch,
            data=self.data,
            num_classes=self.num_classes,
            progress=self._progress_to_save,
            log=self.print,
        )
        if resume:
            self._resume(self.checkpoints.load())
        self.run_dir_claim.create(resume, self.epochs_changed_from)
        self.log_file = MetricsLog(self.run_dir, cfg.train.tensorboard) if self.env.is_main else None
        if self.log_file is not None and resume:
            self.log_file.restore(self.history)
        session = "run started"
        if resume:
            session = f"resumed at epoch {self.start_epoch + 1} step {self.start_step} from {self.resumed_from}"
        self.logs.open(self.run_dir, session, metrics=self.log_file)

    def _progress_to_save(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "history": self.history,
            "wall_time_s": self.wall_time(),
            "trackers": self.logs.tracker_ids(),
            "teacher_eval": self.teacher_eval,
        }

    def _resume(self, resumed: Resumed) -> None:
        self.best, self.history = resumed.best, resumed.history
        self.start_epoch, self.start_step = resumed.epoch, resumed.step
        self.resume_partial = resumed.partial_epoch
        self.resumed_from = resumed.path
        self.wall_before = resumed.wall_time_s
        self.epochs_changed_from = resumed.epochs_changed_from
        self.logs.saved_tracker_ids = resumed.trackers
        self.teacher_eval = resumed.teacher_eval

    def latest_checkpoint(self) -> Path:
        """The newest complete checkpoint of the run (epoch or step)."""
        return self.checkpoints.latest()

    # ------------------------------------------------------------ setup
    def _setup_teacher_cache(self) -> TeacherCache | None:
        """The cache of the teacher outputs the method reads, where ``train.teacher_cache`` asks for one and
        they can be stored; else None (the step's teacher runner computes them every step)."""
        cfg, distiller = self.cfg, self.distiller
        cache_dir = cfg.train.teacher_cache
        if not distiller.reads_teacher:
            if cache_dir:
                self.print(f"teacher cache not used: method {cfg.method!r} reads nothing from a teacher")
            return None
        cache = None
        if not cache_dir:
            pass
        elif not distiller.teacher_cacheable:
            self.print(
                f"teacher cache not used: method {cfg.method!r} reads teacher stage features or computes "
                "something else from the teacher (only embeddings and logits are stored); the teacher runs "
                "every step"
            )
        elif cfg.train.mixup > 0 or cfg.train.cutmix > 0:
            self.print(
                "teacher cache not used: with mixup/cutmix the teacher sees batches mixed after loading, "
                "not stored samples; the teacher runs every step"
            )
        else:
            cache = self._open_teacher_cache(cache_dir, distiller.teacher_request().outputs)
        return cache

    def _open_teacher_cache(self, cache_dir: str, outputs: tuple[str, ...]) -> TeacherCache:
        cfg, teacher = self.cfg, self.distiller.teacher
        key = cache_key(
            cfg,
            teacher,
            num_train=len(self.data.train),
            data_mean=self.data.mean,
            data_std=self.data.std,
            device_type=self.device.type,
            amp_dtype=self.amp_dtype,
            channels_last=cfg.train.channels_last,
            store_dtype=cfg.train.teacher_cache_dtype,
        )
        rank = f"[rank {self.env.rank}] " if self.env.distributed else ""
        cache = TeacherCache(
            cache_dir,
            key,
            outputs,
            cache_widths(outputs, teacher, self.num_classes),
            len(self.data.train),
            store_dtype=cfg.train.teacher_cache_dtype,
            is_main=self.env.is_main,
            agree=lambda ok: all_ranks_ok(self.env, ok),
            log=lambda message: self.logs.print(rank + message, every_rank=True),
        )
        self.print(cache.describe())
        return cache

    def _build_loaders(self) -> None:
        cfg, env = self.cfg, self.env
        pin = self.device.type == "cuda"
        workers = cfg.data.num_workers
        self.train_set, self.train_sampler, self.loader_generator, self.train_loader = build_train_loader(
            self.data.train,
            seed=cfg.train.seed,
            batch_size=cfg.train.batch_size,
            num_workers=workers,
            world_size=env.world_size,
            rank=env.rank,
            pin_memory=pin,
            teacher_cache=self.teacher_cache,
            with_indices=self.distiller.needs_indices,
        )
        self.eval_loader = build_eval_loader(
            self.data.eval,
            batch_size=cfg.train.eval_batch_size or cfg.train.batch_size,
            num_workers=workers,
            world_size=env.world_size,
            rank=env.rank,
            pin_memory=pin,
        )
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = optimizer_steps_per_epoch(self.batches_per_epoch, cfg.train)

    def _build_optimisation(self) -> None:
        self.lr_plan = lr_plan(self.cfg, self.env.world_size)
        device_augment = None
        if self.cfg.data.device_augment:
            device_augment = DeviceAugment(self.cfg.data.img_size, self.data.mean, self.data.std)
        self.step_fn = build_train_step(
            self.distiller,
            self.cfg.train,
            self.cfg.optim,
            self.device,
            lr=self.lr_plan.lr,
            distributed=self.env.distributed,
            cache=self.teacher_cache,
            device_augment=device_augment,
        )
        self.model, self.optimizer, self.scaler = self.step_fn.model, self.step_fn.optimizer, self.step_fn.scaler
        self.teacher_runner = self.step_fn.teacher
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.lr_plan, self.steps_per_epoch)

    # ------------------------------------------------------------ loop
    def print(self, *args) -> None:
        """Print on rank 0 (and log in train.log)."""
        self.logs.print(" ".join(str(arg) for arg in args))

    def describe(self) -> None:
        cfg, env = self.cfg, self.env
        teacher = self.distiller.teacher
        self.print(f"run directory: {self.run_dir}")
        self.print(
            f"method {cfg.method}: teacher {cfg.teacher.name if teacher is not None else '-'}"
            f" -> student {cfg.student.name}"
            f" | {self.num_classes} classes | {len(self.data.train)} train / {len(self.data.eval)} eval images"
            f" | eval split: {self._eval_split_described()}"
        )
        self.print(
            f"student {count_parameters(self.student) / 1e6:.2f}M parameters, "
            f"extra trainable {self.distiller.extra_parameter_count() / 1e6:.3f}M"
            + (
                ", teacher inputs re-normalised to its own mean/std"
                if teacher is not None and teacher.renormalizes
                else ""
            )
        )
        self.print(describe_weights(cfg, with_teacher=teacher is not None))
        if teacher is not None:
            self._describe_teacher(teacher)
        warning = untrained_teacher_warning(cfg, self.distiller)
        if warning:
            self.print(warning)
        amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        self.print(
            f"device {self.device} | {describe_batch(cfg.train, env.world_size)} | {describe_lr(cfg, self.lr_plan)} | "
            f"amp {amp} | {self.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs"
        )
        for warning in (batch_warning(cfg, env.world_size), warmup_warning(cfg, self.lr_plan)):
            if warning:
                self.print(warning)

    def _eval_split_described(self) -> str:
        data = self.cfg.data
        if data.val_fraction is None:
            return evaluated_split(data)
        carved = f"{data.val_fraction:g} of {data.train_split}, per class, val_seed {data.val_seed}"
        return f"val ({carved}; not the test split)"

    def _describe_teacher(self, teacher) -> None:
        """What the method uses of the teacher, when that is not all of it: a classifier of other classes, inputs
        resized to the size the teacher was trained at."""
        cfg = self.cfg
        head = teacher_head_classes(teacher)
        if head is not None and head != self.num_classes and not reads_teacher_head(self.distiller):
            self.print(f"teacher head: {head or 'no'} classes, not used by {cfg.method}")
        if teacher.input_size is not None:
            self.print(
                f"teacher inputs resized from {cfg.data.img_size} to {teacher.input_size} px "
                f"({teacher_size_source(cfg.teacher)}); teacher.kwargs.img_size={cfg.data.img_size} runs the teacher "
                "at the data's size"
            )

    def _measure_teacher(self) -> None:
        """Print the teacher's accuracy on the evaluation split before the student trains (one evaluation pass,
        all ranks, kept in the checkpoints: a resumed run prints it without measuring again). Only for a teacher
        with weights whose classifier has the run's classes."""
        teacher, cfg = self.distiller.teacher, self.cfg
        if teacher is None or cfg.teacher is None or not (cfg.teacher.checkpoint or cfg.teacher.pretrained):
            return
        if teacher_head_classes(teacher) != self.num_classes:
            return
        measured = self.teacher_eval is not None
        if not measured:
            result = evaluate(TeacherClassifier(teacher), self.eval_loader, self.device, self.env, self.amp_dtype)
            self.teacher_eval = {**result, "split": evaluated_split(cfg.data)}
        found = self.teacher_eval
        self.print(
            f"teacher: {found['top1']:.1f} % top-1 on {found.get('split', evaluated_split(cfg.data))} "
            f"({found['samples']} images, preprocessed as the student's)"
            + ("; measured at the start of the run" if measured else "")
        )

    def fit(self, stop_after: int | None = None) -> RunSummary:
        """Train to ``train.epochs`` (or only up to epoch ``stop_after``, leaving a resumable checkpoint).

        On SIGTERM/SIGUSR1 it saves a checkpoint at the next step boundary and raises :class:`Preempted`.
        The run directory is unlocked at the end; a run that fails before its first checkpoint removes it.
        """
        try:
            summary = self._fit(stop_after)
        except Preempted as err:
            self.logs.close(failure=err)
            raise
        except CrossDistillError as err:
            unwrapped = unwrap_worker_error(err)
            self.logs.close(failure=unwrapped)
            self.run_dir_claim.release(failed=True)
            if unwrapped is err:
                raise
            raise unwrapped from err
        except BaseException as err:
            self.logs.close(failure=err)
            self.run_dir_claim.release(failed=True)
            if isinstance(err, KeyboardInterrupt):
                raise KeyboardInterrupt(self._interrupted()) from err
            raise
        finally:
            self.run_dir_claim.release()
        self.logs.close(summary=summary.__dict__)
        return summary

    def _interrupted(self) -> str:
        """What a Ctrl-C leaves: the command that continues the run, or that nothing was kept."""
        if inspect_run_dir(self.run_dir).has_checkpoint:
            return f"interrupted; continue from the last checkpoint with: {resume_command(self.run_dir)}"
        return "interrupted before the run's first checkpoint, so nothing was kept: the same command starts it again"

    def _fit(self, stop_after: int | None) -> RunSummary:
        cfg = self.cfg
        if self.resumed_from is not None and self.start_epoch >= cfg.train.epochs:
            return self._finished()
        self.describe()
        self._measure_teacher()
        if self.resumed_from is not None:
            self.print(
                f"resuming from {self.resumed_from} (epoch {self.start_epoch} done"
                + (f", {self.start_step} steps into epoch {self.start_epoch + 1})" if self.start_step else ")")
            )
        self.session_started = time.time()
        self.logs.start_trackers()
        mixup = self._mixup()
        try:
            with StopSignal() as stop:
                end = cfg.train.epochs if stop_after is None else min(stop_after, cfg.train.epochs)
                for epoch in range(self.start_epoch, end):
                    self._run_epoch(epoch, mixup, stop)
                    if epoch + 1 < end and self._stop_requested(stop):
                        raise Preempted(
                            f"stop signal received: saved {self.run_dir / CHECKPOINT} after epoch {epoch + 1}; "
                            f"continue with: {resume_command(self.run_dir)}",
                            str(self.run_dir / CHECKPOINT),
                        )
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
        self.print(
            f"run {self.run_dir} is already finished ({self.start_epoch}/{epochs} epochs trained): nothing "
            f"to do. To train it longer, resume it with train.epochs=N (N > {epochs}; the lr schedule is then "
            "re-planned over N epochs)"
        )
        try:
            saved = json.loads((self.run_dir / SUMMARY).read_text())
            return RunSummary(**{k: v for k, v in saved.items() if k in RunSummary.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return self._summary(self.wall_before)  # killed after its last checkpoint, before its summary

    def _run_epoch(self, epoch: int, mixup, stop: StopSignal) -> None:
        cfg = self.cfg
        train_stats = self.train_one_epoch(epoch, mixup, stop)
        self.checkpoints.refuse_nonfinite_weights(f"after epoch {epoch + 1}", CHECKPOINT)
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
        self.checkpoints.save_epoch(epoch + 1, improved, then=lambda: self._log_row(row))
        self.print(self._format_row(row))
        if self.on_epoch is not None:
            self._call_epoch_hook(epoch + 1, row)

    def _call_epoch_hook(self, epoch: int, row: dict[str, Any]) -> None:
        stop = bool(self.on_epoch(epoch, dict(row)))
        if self.env.distributed:
            stop = broadcast_from_main(self.env, stop)
        if stop and epoch < self.cfg.train.epochs:
            raise StoppedByHook(
                f"stopped after epoch {epoch} at the request of its epoch hook: saved {self.run_dir / CHECKPOINT}; "
                f"continue with: {resume_command(self.run_dir)}",
                str(self.run_dir / CHECKPOINT),
            )

    def _log_row(self, row: dict[str, Any]) -> None:
        """Rank 0, once the epoch's checkpoint is saved: its row to metrics.csv, TensorBoard and the trackers."""
        if self.log_file is not None:
            self.log_file.write(row)
        self.logs.epoch_row(row, int(row["epoch"]) * self.steps_per_epoch)

    def _mixup(self):
        return make_mixup(self.cfg.train, self.num_classes)

    def train_one_epoch(self, epoch: int, mixup=None, stop: StopSignal | None = None) -> dict[str, float]:
        first_step = self._begin_epoch(epoch)
        totals = EpochTotals(self.device, self.resume_partial if first_step else None)
        start = time.time()
        progress = self._progress(epoch, first_step)
        if self.teacher_cache is not None:
            self.teacher_cache.begin_epoch(epoch)
            hits, misses = self.teacher_cache.hits, self.teacher_cache.misses
        batches = iter(self.train_loader)
        for step in range(first_step, self.steps_per_epoch):
            self._train_step(epoch, step, batches, totals, mixup, stop, progress)
        progress.close()
        self.logs.end_epoch()
        if self.teacher_cache is not None:
            self.teacher_cache.close()
            read, computed = self.teacher_cache.hits - hits, self.teacher_cache.misses - misses
            self.print(f"teacher cache, epoch {epoch + 1}: {read} samples read, {computed} computed by the teacher")
        self.train_sampler.skip = 0
        self.start_step = 0
        stats = totals.reduce(self.env)
        stats["_time"] = time.time() - start
        return stats

    def _begin_epoch(self, epoch: int) -> int:
        """Seed the epoch's random streams and position the sampler; returns the step the epoch starts at."""
        cfg = self.cfg
        first_step = 0
        if epoch == self.start_epoch and self.start_step:
            first_step = self.start_step  # RNG state was restored from the mid-epoch checkpoint
        else:
            seed_everything(epoch_seed(cfg.train.seed, epoch, self.env.rank))
        self.loader_generator.manual_seed(epoch_seed(cfg.train.seed, epoch, self.env.rank))
        self.train_sampler.set_epoch(epoch)
        self.train_sampler.skip = first_step * cfg.train.grad_accum_steps * cfg.train.batch_size
        self.train_set.set_epoch(epoch)
        self.distiller.on_epoch_start(epoch, cfg.train.epochs)
        self.model.train()
        return first_step

    def _train_step(
        self, epoch: int, step: int, batches, totals: EpochTotals, mixup, stop: StopSignal | None, progress
    ) -> None:
        """One optimiser step of the loop: the step itself on its next ``train.grad_accum_steps`` loader batches
        (fewer at the end of an epoch whose batch count is not a multiple), the schedule, EMA, totals,
        non-finite steps, checkpoint, stop."""
        global_step = epoch * self.steps_per_epoch + step
        accum = self.cfg.train.grad_accum_steps
        count = min(accum, self.batches_per_epoch - step * accum)
        sizes: list[int] = []  # images of each micro-batch, for the throughput of the step lines
        micro_batches = (self._micro_batch(next(batches), mixup, sizes) for _ in range(count))
        result = self.step_fn.step(micro_batches, count, tag=(epoch, step))
        if result.scaler_skipped is not None:
            totals.skipped += result.scaler_skipped  # the scaler found inf/NaN gradients and skipped this step
        if self.scheduler is not None:  # by position in the run, skipped or not (see TrainStep)
            self.scheduler.step_update(global_step + 1)
        if not result.finite:
            self._on_nonfinite(epoch, step, {k: float(v.detach().float()) for k, v in result.losses.items()})
            totals.skipped += 1
            return
        if self.ema is not None:
            self._update_ema(global_step, result.skipped_on_device)
        totals.add(result)
        self.logs.count_step(result, sum(sizes))
        every = self.cfg.train.checkpoint_every_steps
        last_step = step + 1 == self.steps_per_epoch
        checkpoint_now = bool(every and (global_step + 1) % every == 0 and not last_step)
        progress_now, step_line_now = progress.due(step, last_step), self.logs.step_line_due(global_step)
        report_now = progress_now or step_line_now  # rank 0 syncs for these anyway
        if self.step_fn.pending and collect_nonfinite_now(
            len(self.step_fn.pending),
            self.step_fn.finite_check_every,
            global_step=global_step,
            last_step=last_step,
            checkpoint_now=checkpoint_now,
            report_now=report_now,
            stop_requested=stop is not None and stop.requested,
            watching_stop=stop is not None,
            distributed=self.env.distributed,
        ):
            found = self._collect_nonfinite()  # deferred check: one sync every N steps
            totals.steps -= found
            totals.skipped += found
        if step_line_now:
            self.logs.step_line(epoch, step, global_step, self.optimizer.param_groups[0]["lr"])
        progress.advance(step + 1, totals.running_means() if progress_now else None)
        if checkpoint_now:
            self.checkpoints.save_step(epoch, step + 1, totals.partial())
        if (
            stop is not None
            and not last_step
            and (not self.env.distributed or (global_step + 1) % 10 == 0)
            and self._stop_requested(stop)
        ):
            path = self.checkpoints.save_step(epoch, step + 1, totals.partial())
            progress.close()
            raise Preempted(
                f"stop signal received: saved {path} at epoch {epoch + 1}, step {step + 1}/{self.steps_per_epoch}; "
                f"continue with: {resume_command(self.run_dir)}",
                str(path),
            )

    def _micro_batch(self, batch, mixup, sizes: list[int]) -> MicroBatch:
        """A loader batch on the device, mixed up where asked, with its samples' indices (teacher cache, or a
        method that needs them) and its teacher-cache rows; its image count is appended to ``sizes``."""
        images, target = self.step_fn.to_device(batch[0], batch[1])
        sizes.append(images.shape[0])
        if mixup is not None:
            images, target = mixup(images, target)
        return MicroBatch(
            images,
            target,
            batch[2] if len(batch) >= 3 else None,
            (batch[3], batch[4]) if len(batch) == 5 else None,
        )

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

    def _collect_nonfinite(self) -> int:
        """Report the steps the deferred finiteness check skipped on the device; returns how many."""
        found = self.step_fn.collect_nonfinite()
        for (epoch, step), terms in found:
            self._on_nonfinite(epoch, step, terms)
        return len(found)

    def _on_nonfinite(self, epoch: int, step: int, terms: dict[str, float]) -> None:
        self.nonfinite_steps += 1
        self.print(
            f"warning: non-finite loss or gradient at epoch {epoch + 1}, step {step + 1}: {terms}; step skipped "
            f"({self.nonfinite_steps}/{self.cfg.train.max_nonfinite_steps} allowed)"
        )
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
        return bool(all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item())

    def _progress(self, epoch: int, first_step: int = 0) -> Progress:
        return self.logs.begin_epoch(epoch, first_step, self.steps_per_epoch)

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
            teacher_top1=self.teacher_eval["top1"] if self.teacher_eval is not None else None,
            eval_split=evaluated_split(self.cfg.data),
            history=self.history,
        )
        if self.env.is_main:
            write_text_atomic(self.run_dir / SUMMARY, json.dumps(summary.__dict__, indent=2), hint=RESUME_HINT)
            self.print(
                f"done: last top-1 {summary.last_top1:.2f} | best top-1 {summary.best_top1:.2f} "
                f"(epoch {summary.best_epoch}) | on {summary.eval_split} | {wall:.1f}s | {self.run_dir}"
            )
        return summary


def train(
    cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, out=None, on_epoch: EpochHook | None = None
) -> RunSummary:
    """Train one run described by ``cfg``; returns its summary. Works under torchrun as well. ``on_epoch``: see
    :data:`EpochHook`."""
    env = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, resume=resume, overwrite=overwrite, env=env, out=out, on_epoch=on_epoch).fit()
    finally:
        shutdown(env)
