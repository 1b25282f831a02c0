"""The checkpoints of a run: what one holds, saving it (atomically, rank 0), latest.json, finding and loading
the newest one, the random-number state, and the lr schedule re-planned when ``train.epochs`` changes on resume.

Files: ``last.pt`` after every epoch, ``best.pt`` (weights only) when the top-1 improved, ``checkpoints/step-N.pt``
in the middle of an epoch (the newest ``train.keep_step_checkpoints`` kept), and ``latest.json`` naming the
newest of them. Resume is exact: a checkpoint holds everything the next step depends on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import RESUME_HINT, load_weights_file, save_atomic, write_text_atomic
from ..collectives import all_gather_objects
from ..config import RUNTIME_KEYS, RunConfig
from ..errors import CrossDistillError, one_line, shorten
from ..version import __version__
from .distributed import DistEnv, all_ranks_ok
from .rundir import BEST, CHECKPOINT, CHECKPOINT_FORMAT, LATEST, STEP_DIR, resume_command, step_checkpoints

__all__ = ["Checkpointer", "Resumed", "gathered_rng_states", "load_optimizer_state", "rng_state", "set_rng_state"]

BEST_KEYS = ("format", "epoch", "student", "student_ema", "config", "normalization", "classes", "num_classes")
"""What ``best.pt`` keeps of a full checkpoint: the weights and what is needed to use them."""

SHOWN_ERROR_CHARS = 240
MAY_CHANGE_ON_RESUME = RUNTIME_KEYS | {
    # where and how the run executes, not what it learns
    "data.root",
    "data.download",
    "data.skip_corrupt",
    "data.device_augment",
    "student.checkpoint",
    "student.checkpoint_ema",
    "student.pretrained",
    "teacher.checkpoint",
    "train.amp",
    "train.channels_last",
    "train.compile",
    "train.sync_bn",
    "train.teacher_cache",
    "train.teacher_cache_dtype",
    "train.eval_every",
    "train.checkpoint_every_steps",
    "train.keep_step_checkpoints",
    "train.check_finite",
    "train.finite_check_every",
    "train.max_nonfinite_steps",
    # changed on purpose: a longer run (its schedule re-planned), another process count (checked mid-epoch),
    # gradient clipping to recover a diverged run from its last good checkpoint (refuse_nonfinite_weights)
    "optim.clip_grad",
    "train.epochs",
    "train.batch_size",
    "train.grad_accum_steps",
}
"""Config keys a resumed run may change; any other change would train the rest of the run as another experiment
than the one its config.yaml records (and optimiser settings would not even apply: the checkpoint's state wins)."""
ANY_CASE = frozenset({"optim.opt"})
"""Keys whose values name the same thing in any case (timm lowercases optimiser names: AdamW is adamw)."""


def config_differences(saved: dict[str, Any], now: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """``key: old -> new`` for each ``section.key`` (a top-level key alone) in both configs (``to_dict()``) whose
    values differ, but those in ``ignore``. Free-form dicts (kwargs, method_args) compare whole; a key one config
    lacks (written by another version) is not compared."""

    def keys(cfg: dict[str, Any]) -> dict[str, Any]:
        plain = json.loads(json.dumps(cfg, default=str))  # tuples and lists alike, as config.yaml holds them
        out: dict[str, Any] = {}
        for section, value in plain.items():
            if isinstance(value, dict) and section != "method_args":
                out.update({f"{section}.{key}": item for key, item in value.items()})
            else:
                out[section] = value
        return {key: item.lower() if key in ANY_CASE and isinstance(item, str) else item for key, item in out.items()}

    old, new = keys(saved), keys(now)
    return [
        f"{key}: {shorten(old[key], 60)} -> {shorten(new[key], 60)}"
        for key in new
        if key in old and key not in ignore and old[key] != new[key]
    ]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gathered_rng_states(env: DistEnv) -> list[dict[str, Any]] | None:
    """Every rank's RNG state, in rank order (all ranks must call it); None in one process."""
    if not env.distributed:
        return None
    return all_gather_objects(rng_state(), env.device)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


@dataclass
class Resumed:
    """Where a loaded checkpoint leaves the run (the models, optimiser, schedule, scaler and RNG are restored)."""

    path: Path
    epoch: int
    """Epochs done."""
    step: int
    """Steps done into the next epoch (a mid-epoch checkpoint), else 0."""
    partial_epoch: dict[str, Any]
    best: dict[str, Any]
    history: list[dict[str, Any]]
    wall_time_s: float
    epochs_changed_from: int | None
    """The run's earlier ``train.epochs`` when this run changed it (the lr schedule is re-planned), else None."""
    trackers: dict[str, str] = field(default_factory=dict)
    """The experiment trackers' run ids (``train.trackers``): the resumed run continues them."""
    teacher_eval: dict[str, Any] | None = None
    """The teacher's accuracy on the evaluation split, measured at the start of the run (None: not measured)."""


class Checkpointer:
    """Saves and loads the checkpoints of the run in ``run_dir``: rank 0 writes, every rank learns whether it worked.

    ``progress`` returns what the loop knows that a checkpoint keeps: ``best``, ``history``, ``wall_time_s``,
    ``teacher_eval`` (and ``trackers``, the experiment trackers' run ids).
    """

    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        cfg: RunConfig,
        *,
        distiller,
        ema,
        optimizer,
        scheduler,
        scaler,
        steps_per_epoch: int,
        data,
        num_classes: int,
        progress: Callable[[], dict[str, Any]],
        log: Callable[[str], None],
    ):
        self.run_dir, self.env, self.cfg = run_dir, env, cfg
        self.distiller, self.student, self.ema = distiller, distiller.student, ema
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.steps_per_epoch = steps_per_epoch
        self.data, self.num_classes = data, num_classes
        self.progress, self.log = progress, log

    # ------------------------------------------------------------ saving
    def state(self, epoch: int, step: int = 0, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly: ``epoch`` epochs done, plus ``step`` steps of the next."""
        progress = self.progress()
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
            "best": dict(progress["best"]),
            "history": progress["history"],
            "config": self.cfg.to_dict(),
            "normalization": {"mean": list(self.data.mean), "std": list(self.data.std)},
            "classes": list(self.data.classes),
            "num_classes": self.num_classes,
            "world_size": self.env.world_size,
            "wall_time_s": progress["wall_time_s"],
            "trackers": dict(progress.get("trackers") or {}),
            "teacher_eval": progress.get("teacher_eval"),
        }

    def save_epoch(self, epoch: int, improved: bool, then: Callable[[], None] | None = None) -> None:
        """End-of-epoch checkpoint (last.pt, and best.pt when the top-1 improved), then ``then`` (on rank 0)."""

        def write() -> None:
            state = self.state(epoch)
            save_atomic(state, self.run_dir / CHECKPOINT, hint=self.disk_full_hint())
            self.write_latest(self.run_dir / CHECKPOINT, epoch, 0)
            if improved:
                save_atomic({k: state[k] for k in BEST_KEYS}, self.run_dir / BEST, hint=self.disk_full_hint())
            if then is not None:
                then()

        self.on_main_then_agree(write)

    def save_step(self, epoch: int, step: int, partial: dict[str, Any]) -> Path:
        """Mid-epoch checkpoint under checkpoints/, keeping the newest ``train.keep_step_checkpoints``."""
        folder = self.run_dir / STEP_DIR
        path = folder / f"step-{epoch * self.steps_per_epoch + step:09d}.pt"
        self.refuse_nonfinite_weights(f"at epoch {epoch + 1}, step {step}", str(path.relative_to(self.run_dir)))
        per_rank = gathered_rng_states(self.env)  # mid-epoch: each rank continues its own random streams

        def write() -> None:
            state = self.state(epoch, step, partial)
            if per_rank is not None:
                state["rng_per_rank"] = per_rank
            save_atomic(state, path, hint=self.disk_full_hint())
            self.write_latest(path, epoch, step)
            for old in step_checkpoints(folder)[: -self.cfg.train.keep_step_checkpoints]:
                old.unlink(missing_ok=True)

        self.on_main_then_agree(write)
        return path

    def write_latest(self, path: Path, epoch: int, step: int) -> None:
        pointer = {
            "file": str(path.relative_to(self.run_dir)),
            "epoch": epoch,
            "step": step,
            "global_step": epoch * self.steps_per_epoch + step,
        }
        write_text_atomic(self.run_dir / LATEST, json.dumps(pointer), hint=self.disk_full_hint())

    def has_checkpoint(self) -> bool:
        return (self.run_dir / CHECKPOINT).exists() or bool(step_checkpoints(self.run_dir / STEP_DIR))

    def disk_full_hint(self) -> str:
        if self.has_checkpoint():
            return RESUME_HINT
        return (
            "Free some space (or move train.output_dir) and run the same command again "
            "(the run has no checkpoint yet: it starts from the beginning)."
        )

    def on_main_then_agree(self, write: Callable[[], None]) -> None:
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

    def refuse_nonfinite_weights(self, when: str, file: str) -> None:
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
        if self.has_checkpoint():
            kept = f"the last good checkpoint is kept in {self.run_dir}"
            example = f"{resume_command(self.run_dir)} optim.clip_grad=1.0"
        else:
            kept, example = "the run has no checkpoint yet", "the same command with optim.clip_grad=1.0"
        raise CrossDistillError(
            f"stopping: non-finite weights {when} (inf/NaN in {len(bad)} tensor(s): {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); {file} was not written and {kept}. The training diverged: "
            f"lower optim.lr or set optim.clip_grad (e.g. {example})"
        )

    # ------------------------------------------------------------ loading
    def latest(self) -> Path:
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

    def load(self) -> Resumed:
        """Restore the newest checkpoint into the models, optimiser, schedule, scaler and RNG; where the run resumes."""
        path = self.latest()
        state = self._read(path)
        changes = config_differences(state.get("config") or {}, self.cfg.to_dict(), MAY_CHANGE_ON_RESUME)
        if changes:
            raise CrossDistillError(
                f"the run in {self.run_dir} started with another config: {'; '.join(changes)}. A resumed run "
                "continues the experiment its config.yaml records (the checkpoint's optimiser state would even "
                "override optim.* values): resume it without these changes, or train them as a new run (another "
                "train.run_name)"
            )
        try:
            self._load_weights(state, path)
        except (RuntimeError, ValueError, KeyError) as err:
            raise self._does_not_fit(path, state, one_line(err)) from err
        epochs = self.cfg.train.epochs
        saved_epochs = int(((state.get("config") or {}).get("train") or {}).get("epochs", epochs))
        done = int(state["epoch"])
        if saved_epochs != epochs and epochs <= done:
            raise CrossDistillError(
                f"train.epochs={epochs}, but the run in {self.run_dir} has already trained {done} of its "
                f"{saved_epochs} epochs; resume it with its own train.epochs ({saved_epochs}), or a larger value to "
                "train it longer"
            )
        try:
            load_optimizer_state(self.optimizer, state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise self._does_not_fit(path, state, f"its optimiser state: {one_line(err)}") from err
        if self.scheduler is not None and state.get("scheduler") is not None and saved_epochs == epochs:
            self.scheduler.load_state_dict(state["scheduler"])  # else: re-planned below
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank")
        set_rng_state(per_rank[self.env.rank] if per_rank and len(per_rank) == self.env.world_size else state["rng"])
        resumed = Resumed(
            path=path,
            epoch=done,
            step=int(state.get("step", 0)),
            partial_epoch=dict(state.get("partial_epoch") or {}),
            best=dict(state["best"]),
            history=list(state.get("history", [])),
            wall_time_s=float(state.get("wall_time_s", 0.0)),
            epochs_changed_from=saved_epochs if saved_epochs != epochs else None,
            trackers=dict(state.get("trackers") or {}),
            teacher_eval=state["teacher_eval"] if isinstance(state.get("teacher_eval"), dict) else None,
        )
        if resumed.epochs_changed_from is not None:
            self._replan_schedule(resumed)
        if not resumed.step and int(resumed.best.get("epoch", -1)) == done:
            self.on_main_then_agree(lambda: self._restore_best(state, done))
        return resumed

    def _does_not_fit(self, path: Path, state: dict[str, Any], reason: str) -> CrossDistillError:
        """A checkpoint this run's model or optimiser cannot take although the config that builds them is the one
        it was written with (checked before): another version built them otherwise."""
        if len(reason) > SHOWN_ERROR_CHARS:
            reason = reason[: SHOWN_ERROR_CHARS - 3] + "..."
        written_by = state.get("crossdistill_version", "an unknown version")
        return CrossDistillError(
            f"{path} does not fit this run's model or optimiser ({reason}), although their config is the one it was "
            f"written with: was it written by another version (crossdistill {written_by}, this is {__version__}; "
            "or another timm)? Resume it with the versions it was written with, or train a new run (another "
            "train.run_name)"
        )

    def _restore_best(self, state: dict[str, Any], epoch: int) -> None:
        """Write best.pt from ``state`` (the end of ``epoch``, its best epoch) unless best.pt holds that epoch: a
        kill after last.pt was saved but before best.pt was left best.pt one improvement behind what last.pt,
        the summary and ``export --weights best`` take it to be."""
        path = self.run_dir / BEST
        try:
            current = int(load_weights_file(path).get("epoch", -1)) if path.exists() else None
        except CrossDistillError:
            current = None
        if current != epoch:
            save_atomic({k: state[k] for k in BEST_KEYS}, path, hint=self.disk_full_hint())
            self.log(f"{BEST} restored from {CHECKPOINT}: the run was stopped before it recorded epoch {epoch}")

    def _read(self, path: Path) -> dict[str, Any]:
        """The checkpoint at ``path``, refused when it is not a run checkpoint or cannot resume with this many ranks."""
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
                f"checkpoint ({CHECKPOINT})."
            )
        saved_accum = int(((state.get("config") or {}).get("train") or {}).get("grad_accum_steps", 1))
        accum = self.cfg.train.grad_accum_steps
        if int(state.get("step", 0)) and saved_accum != accum:
            raise CrossDistillError(
                f"{path} was written in the middle of an epoch with train.grad_accum_steps={saved_accum}, and this "
                f"run has {accum}: the batches already trained on are counted in optimiser steps of {saved_accum}, so "
                f"a mid-epoch resume needs the same value. Resume with train.grad_accum_steps={saved_accum}, or delete "
                f"{self.run_dir / STEP_DIR} and {self.run_dir / LATEST} to restart from the last epoch-end "
                f"checkpoint ({CHECKPOINT})."
            )
        return state

    def _load_weights(self, state: dict[str, Any], path: Path) -> None:
        """The student, the method's extra modules and the EMA, from ``state``."""
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

    def _replan_schedule(self, resumed: Resumed) -> None:
        """``train.epochs`` changed on resume: the lr schedule continues as if planned for the new length."""
        before = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step(resumed.epoch)  # epoch-based schedules
            self.scheduler.step_update(resumed.epoch * self.steps_per_epoch + resumed.step)  # per-step ones
        epochs = self.cfg.train.epochs
        self.log(
            f"train.epochs changed from {resumed.epochs_changed_from} to {epochs}: the run continues after epoch "
            f"{resumed.epoch} with its lr schedule ({self.cfg.optim.sched}) re-planned over {epochs} epochs "
            f"(lr {before:g} -> {self.optimizer.param_groups[0]['lr']:g}); config.yaml records "
            f"train.epochs={epochs}"
        )
