"""What a run tells its user: ``RUN_DIR/train.log``, the step scalars, the progress display and the trackers.

Rank 0 alone writes any of it (the other ranks print nothing):

* :class:`RunLog`: every line rank 0 prints, also in ``RUN_DIR/train.log``, time-stamped, appended on resume.
  A run's train.log starts with :data:`~crossdistill.engine.rundir.LOG_HEADER`: that is how ``--overwrite``
  tells it from a user's file of the same name (never written to, never deleted).
* :class:`StepScalars`: every ``train.log_every`` steps, the mean loss terms, gradient norm, lr and images/s
  of the steps since the last line, summed on the device in between (one host sync per line).
* :class:`Progress`: tqdm's bar on a terminal, a line about every :data:`LINE_SECONDS` elsewhere (SLURM logs,
  pipes), where a bar's carriage returns would pile up.
* :class:`Trackers`: MLflow and Weights & Biases through their own libraries (extras, imported only when
  ``train.trackers`` lists them); a tracker that fails is warned about once and left, the run goes on.
* :class:`RunLogger`: the one object the :class:`~crossdistill.engine.trainer.Trainer` talks to.
"""

from __future__ import annotations

import datetime
import importlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from ..config import RunConfig
from ..errors import CrossDistillError, one_line
from ..version import __version__
from .distributed import DistEnv
from .preemption import Preempted
from .rundir import LOG, LOG_HEADER, is_run_log

__all__ = [
    "LINE_SECONDS",
    "Progress",
    "RunLog",
    "RunLogger",
    "StepScalars",
    "Trackers",
    "check_trackers",
    "progress_mode",
]

LINE_SECONDS = 30.0
"""In ``lines`` mode, the least time between two progress lines."""

TRACKER_PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
"""tracker name -> (module to import, the extra that installs it: ``pip install 'crossdistill[extra]'``)."""


def _now() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RunLog:
    """Prints rank 0's lines to ``out`` and appends them, time-stamped, to ``RUN_DIR/train.log``.

    Lines printed before the run directory is ready (:meth:`open`, called once the run is set up and an
    earlier run's files are replaced) are kept and written first. A train.log that a run did not write
    is left alone (this session writes none); a write that fails (a full disk) is warned about once and
    the run goes on without its log file.
    """

    def __init__(self, out: TextIO, enabled: bool):
        self.out, self.enabled = out, enabled
        self.pending: list[str] = []
        self.handle: TextIO | None = None
        self.opened = False
        self.path: Path | None = None

    def print(self, message: str, *, every_rank: bool = False) -> None:
        """Print ``message`` (on rank 0, or on every rank with ``every_rank``); rank 0 also logs it."""
        if self.enabled or every_rank:
            print(message, file=self.out, flush=True)
        self.write(message)

    def write(self, message: str) -> None:
        """Log ``message`` in train.log only (rank 0)."""
        if not self.enabled:
            return
        stamp = _now()
        lines = [f"{stamp} {line}" for line in message.splitlines() or [""]]
        if not self.opened:
            self.pending += lines
            return
        if self.handle is None:
            return
        try:
            self.handle.write("\n".join(lines) + "\n")
            self.handle.flush()
        except OSError as err:
            self._give_up(err)

    def open(self, run_dir: Path, session: str) -> None:
        """Start writing ``run_dir/train.log`` (appending to a run's own), with ``session`` as its first new
        line, then the lines printed so far."""
        if not self.enabled or self.opened:
            return
        self.opened = True
        self.path = path = Path(run_dir) / LOG
        pending, self.pending = self.pending, []
        if path.exists() and not is_run_log(path):
            self.print(
                f"warning: {path} was not written by a run (its first line is not '{LOG_HEADER}'): it is left as "
                "it is and this session writes no train.log; move it away to get one"
            )
            return
        try:
            new = not path.exists()
            self.handle = path.open("a", encoding="utf-8")
            if new:
                self.handle.write(f"{LOG_HEADER}: every line rank 0 of this run printed; a resumed run appends\n")
        except OSError as err:
            self._give_up(err)
            return
        self.write(f"---- {session} (crossdistill {__version__}, {socket.gethostname()} pid {os.getpid()})")
        if self.handle is not None:
            try:
                self.handle.write("".join(line + "\n" for line in pending))
                self.handle.flush()
            except OSError as err:
                self._give_up(err)

    def _give_up(self, err: OSError) -> None:
        self.close()
        print(
            f"warning: cannot write {self.path} ({err.strerror or one_line(err)}); the run goes on without its "
            "log file (checkpoints, metrics.csv and this output are not affected)",
            file=self.out,
            flush=True,
        )

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.handle.close()
            except OSError:
                pass
            self.handle = None


class StepScalars:
    """The means of a run's scalars over every ``every`` steps (rank 0's own batches): the loss terms and the
    gradient norm summed on the device step by step, read with one host sync when a line is due
    (:meth:`due`); images/s over the training time between two lines (evaluation left out)."""

    def __init__(self, every: int, world_size: int, clock: Callable[[], float] = time.perf_counter):
        self.every, self.world_size, self.clock = every, world_size, clock
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: torch.Tensor | float = 0.0
        self.images = 0
        self.seconds = 0.0
        self.since: float | None = None

    def due(self, global_step: int) -> bool:
        return bool(self.every) and (global_step + 1) % self.every == 0

    def start_clock(self) -> None:
        self.since = self.clock()

    def stop_clock(self) -> None:
        if self.since is not None:
            self.seconds += self.clock() - self.since
            self.since = None

    def add(self, result, images: int) -> None:
        """Count one step's :class:`~crossdistill.engine.step.StepResult` of ``images`` samples (no sync); a step
        the deferred finiteness check skipped on the device adds nothing, not even to the count."""
        terms = {**result.losses, "loss": result.loss}
        if result.grad_norm is not None:
            terms["grad_norm"] = result.grad_norm
        ok = result.ok
        for name, value in terms.items():
            value = value.detach().float()
            if ok is not None:
                value = torch.where(ok, value, torch.zeros_like(value))
            self.sums[name] = self.sums.get(name, 0) + value
        self.kept = self.kept + (ok.float() if ok is not None else 1.0)
        self.images += images

    def read(self) -> dict[str, float]:
        """The means since the last read and the throughput (all ranks), then start a new interval: one sync."""
        names = sorted(self.sums)
        tensors = [self.sums[n] for n in names]
        kept_on_device = isinstance(self.kept, torch.Tensor)
        if kept_on_device:
            tensors.append(self.kept)
        sums = torch.stack(tensors).tolist() if tensors else []
        kept = sums.pop() if kept_on_device else self.kept
        now = self.clock()
        seconds = self.seconds + (now - self.since if self.since is not None else 0.0)
        scalars = {name: total / max(kept, 1.0) for name, total in zip(names, sums)}
        scalars["img_per_s"] = self.images * self.world_size / seconds if seconds > 0 else 0.0
        self.sums, self.kept, self.images, self.seconds = {}, 0.0, 0, 0.0
        if self.since is not None:
            self.since = now
        return scalars


def progress_mode(setting: str | bool, out: TextIO) -> str:
    """``train.progress`` resolved to bar, lines or off: auto is a bar when both the output and stderr (where
    the bar is drawn) are terminals, else lines; true and false (older configs) are auto and off."""
    if setting is True or setting == "auto":
        terminal = all(getattr(stream, "isatty", lambda: False)() for stream in (out, sys.stderr))
        return "bar" if terminal else "lines"
    return "off" if setting is False else str(setting)


class Progress:
    """The progress of one epoch on rank 0: a tqdm bar (``bar``), a line about every :data:`LINE_SECONDS`
    (``lines``), or nothing (``off``). :meth:`due` says when the next :meth:`advance` wants the running
    means of the loss terms (one host sync)."""

    def __init__(
        self,
        mode: str,
        out: TextIO,
        *,
        epoch: int,
        epochs: int,
        steps_per_epoch: int,
        first_step: int,
        images_per_step: int,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.mode, self.out, self.clock = mode, out, clock
        self.epoch, self.epochs, self.steps_per_epoch = epoch, epochs, steps_per_epoch
        self.first_step, self.images_per_step = first_step, images_per_step
        self.started = self.last_line = clock()
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=steps_per_epoch,
                initial=first_step,
                desc=f"epoch {epoch + 1}/{epochs}",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def due(self, step: int, last_step: bool) -> bool:
        if self.mode == "bar":
            return step % 20 == 0 or last_step
        if self.mode == "lines":
            return not last_step and self.clock() - self.last_line >= LINE_SECONDS
        return False

    def advance(self, done: int, means: dict[str, str] | None) -> None:
        """``done`` steps of the epoch are done; ``means``: the running means when :meth:`due` said so."""
        if self.bar is not None:
            self.bar.update(1)
            if means is not None:
                self.bar.set_postfix(means)
        elif self.mode == "lines" and means is not None:
            self.last_line = now = self.clock()
            steps, total = done - self.first_step, self.steps_per_epoch
            rate = steps / (now - self.started) if now > self.started else 0.0
            left = total - done
            parts = [f"epoch {self.epoch + 1}/{self.epochs}", f"step {done}/{total} ({100 * done // total}%)"]
            parts += [f"{name} {means[name]}" for name in sorted(means, key=lambda name: name != "loss")]
            if rate > 0:
                later = (self.epochs - self.epoch - 1) * total
                parts.append(f"{rate * self.images_per_step:.0f} img/s")
                parts.append(f"eta {_duration(left / rate)} (epoch), {_duration((left + later) / rate)} (run)")
            print(" | ".join(parts), file=self.out, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------- trackers


def check_trackers(names: list[str]) -> None:
    """Refuse a ``train.trackers`` entry whose library is not installed, before anything is built or written."""
    for name in names:
        module, extra = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise CrossDistillError(
                f"train.trackers lists {name}, but the {module} package is not installed: pip install "
                f"'crossdistill[{extra}]' (or remove {name} from train.trackers)"
            ) from None


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The run config as ``section.key: value`` text (a tracker's parameters)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]  # MLflow's limit on a parameter's value in its older releases
    return flat


class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (not the fluent API: no global active run is touched)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, tags: dict[str, str]):
        self.uri, self.experiment, self.run_name, self.tags = uri, experiment, run_name, tags
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, params: dict[str, str], run_id: str | None) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if "://" not in self.uri or self.uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a folder store without it
        self.client = client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            except Exception:
                pass  # not in this store (moved, deleted): a new MLflow run
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(self.experiment)
        self.run_id = client.create_run(experiment_id, run_name=self.run_name, tags=self.tags).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(self.run_id, params=items[start : start + 100])
        return self.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in metrics.items()])

    def log_epoch(self, row: dict[str, float], epoch: int, global_step: int) -> None:
        self.log(row, epoch)

    def finish(self, summary: dict[str, float], status: str) -> None:
        if summary:
            self.log(summary, 0)
        self.client.set_terminated(self.run_id, status=status)


class WandbTracker:
    """A Weights & Biases run, offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads it)."""

    name = "wandb"

    def __init__(self, folder: Path, project: str, run_name: str):
        self.folder, self.project, self.run_name = folder, project, run_name
        self.run: Any = None

    def start(self, params: dict[str, str], run_id: str | None) -> str:
        import wandb

        self.folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.project,
            name=self.run_name,
            dir=str(self.folder),
            id=run_id,
            resume="allow" if run_id else None,
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            config=params,
            settings=wandb.Settings(console="off", silent=True),
        )
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_epoch(self, row: dict[str, float], epoch: int, global_step: int) -> None:
        self.run.log(row, step=global_step)  # W&B's steps only go forward: the epoch is a value of its own

    def finish(self, summary: dict[str, float], status: str) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class Trackers:
    """The run's trackers, each call guarded: a tracker that raises is warned about once (``warn``) and
    dropped, so a tracking server that goes down neither stops nor silently slows a long run."""

    def __init__(self, trackers: list, warn: Callable[[str], None]):
        self.active, self.warn = list(trackers), warn
        self.ids: dict[str, str] = {}

    def _each(self, what: str, call: Callable[[Any], Any]) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as err:
                self.active.remove(tracker)
                self.warn(
                    f"warning: {tracker.name} tracking failed while {what} ({one_line(err)[:300]}); the run goes on "
                    f"without {tracker.name} (train.log, metrics.csv and TensorBoard are not affected)"
                )

    def start(self, params: dict[str, str], saved_ids: dict[str, str]) -> None:
        def start(tracker) -> None:
            self.ids[tracker.name] = tracker.start(params, saved_ids.get(tracker.name))

        self._each("starting its run", start)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._each(f"logging step {step}", lambda tracker: tracker.log(metrics, step))

    def log_epoch(self, row: dict[str, float], epoch: int, global_step: int) -> None:
        self._each(f"logging epoch {epoch}", lambda tracker: tracker.log_epoch(row, epoch, global_step))

    def finish(self, summary: dict[str, float], status: str) -> None:
        self._each("ending its run", lambda tracker: tracker.finish(summary, status))
        self.active = []


def build_trackers(cfg: RunConfig, run_dir: Path) -> list:
    t, run_dir = cfg.train, run_dir.resolve()
    output_dir = Path(t.output_dir).resolve()
    made = []
    for name in t.trackers:
        if name == "mlflow":
            uri = t.mlflow_uri or (output_dir / "mlruns").as_uri()
            tags = {"crossdistill.run_dir": str(run_dir), "crossdistill.method": cfg.method}
            made.append(MlflowTracker(uri, t.experiment, run_dir.name, tags))
        elif name == "wandb":
            made.append(WandbTracker(output_dir, t.experiment, run_dir.name))
    return made


# ---------------------------------------------------------------- the trainer's side


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class RunLogger:
    """Everything a run reports, on rank 0: its printed lines and train.log, the step scalars (train.log,
    TensorBoard, trackers), the epoch's progress display, and the trackers' runs."""

    def __init__(self, cfg: RunConfig, env: DistEnv, out: TextIO):
        self.cfg, self.env, self.out = cfg, env, out
        self.log = RunLog(out, enabled=env.is_main)
        t = cfg.train
        self.mode = progress_mode(t.progress, out) if env.is_main else "off"
        self.scalars = StepScalars(t.log_every, env.world_size) if env.is_main and t.log_every else None
        self.metrics = None  # the run's MetricsLog (TensorBoard), once open
        self.trackers: Trackers | None = None
        self.saved_tracker_ids: dict[str, str] = {}
        self.epoch_steps = 0

    def print(self, message: str, *, every_rank: bool = False) -> None:
        self.log.print(message, every_rank=every_rank)

    def open(self, run_dir: Path, session: str, metrics=None) -> None:
        self.run_dir, self.metrics = Path(run_dir), metrics
        self.log.open(run_dir, session)

    def start_trackers(self) -> None:
        if not (self.env.is_main and self.cfg.train.trackers):
            return
        self.trackers = Trackers(build_trackers(self.cfg, self.run_dir), self.print)
        self.trackers.start(flat_params(self.cfg.to_dict()), self.saved_tracker_ids)
        if self.trackers.ids:
            self.print("tracking: " + ", ".join(f"{name} run {run_id}" for name, run_id in self.trackers.ids.items()))

    def tracker_ids(self) -> dict[str, str]:
        """The trackers' run ids, kept in the checkpoints: a resumed run continues the same tracker runs."""
        return dict(self.trackers.ids) if self.trackers is not None else dict(self.saved_tracker_ids)

    # ---- per epoch and per step
    def begin_epoch(self, epoch: int, first_step: int, steps_per_epoch: int) -> Progress:
        self.epoch_steps = steps_per_epoch
        if self.scalars is not None:
            self.scalars.start_clock()
        return Progress(
            self.mode,
            self.out,
            epoch=epoch,
            epochs=self.cfg.train.epochs,
            steps_per_epoch=steps_per_epoch,
            first_step=first_step,
            images_per_step=self.cfg.train.batch_size * self.env.world_size,
        )

    def end_epoch(self) -> None:
        if self.scalars is not None:
            self.scalars.stop_clock()

    def count_step(self, result, images: int) -> None:
        if self.scalars is not None:
            self.scalars.add(result, images)

    def step_line_due(self, global_step: int) -> bool:
        return self.scalars is not None and self.scalars.due(global_step)

    def step_line(self, epoch: int, step: int, global_step: int, lr: float) -> None:
        """Write the step scalars of the interval ending at ``global_step`` (one host sync)."""
        scalars = self.scalars.read()
        scalars["lr"] = lr
        done = global_step + 1
        parts = [f"step {done} (epoch {epoch + 1}, {step + 1}/{self.epoch_steps})"]
        first, last = ("loss",), ("grad_norm", "lr", "img_per_s")
        ordered = [*first, *sorted(set(scalars) - {*first, *last}), *last]
        for name in (n for n in ordered if n in scalars):
            value = scalars[name]
            parts.append(f"{value:.0f} img/s" if name == "img_per_s" else f"{name} {value:.4g}")
        self.log.write(" | ".join(parts))
        if self.metrics is not None:
            self.metrics.write_step(scalars, done)
        if self.trackers is not None:
            self.trackers.log({f"step/{k}": v for k, v in scalars.items()}, done)

    def epoch_row(self, row: dict[str, Any], global_step: int) -> None:
        if self.trackers is not None:
            self.trackers.log_epoch(_numbers(row), int(row["epoch"]), global_step)

    # ---- the end
    def close(self, summary: dict[str, Any] | None = None, failure: BaseException | None = None) -> None:
        """End the trackers' runs (finished, failed or killed) and train.log, recording ``failure``'s message."""
        if failure is not None and self.env.is_main:
            stopped = isinstance(failure, (KeyboardInterrupt, Preempted))
            text = one_line(failure) or type(failure).__name__
            self.log.write(("stopped: " if stopped else "error: ") + text)
            status = "KILLED" if stopped else "FAILED"
        else:
            status = "FINISHED"
        if self.trackers is not None:
            self.trackers.finish(_numbers(summary or {}), status)
            self.saved_tracker_ids, self.trackers = dict(self.trackers.ids), None
        self.log.close()
