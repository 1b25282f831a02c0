"""Claiming a run directory: locked and judged before anything is built, (re)created once everything is,
released at the end; a run that fails before its first checkpoint leaves no run directory behind.

What a run directory holds, and the lock, are :mod:`~crossdistill.engine.rundir`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import yaml

from ..checkpoint import remove_torn_files, write_text_atomic
from ..config import RunConfig
from ..errors import CrossDistillError
from .distributed import DistEnv, barrier, broadcast_from_main
from .rundir import (
    CONFIG,
    STEP_DIR,
    RunDirContents,
    RunDirLock,
    check_creatable,
    inspect_run_dir,
    lock_holder,
    remove_run_files,
    run_dir_in_use,
)

__all__ = ["RunDirClaim", "default_run_name", "judge_run_dir", "preview_run_dir", "refuse_foreign", "run_dir_of"]


def default_run_name(cfg: RunConfig) -> str:
    teacher = cfg.teacher.name if cfg.teacher is not None else "none"
    return f"{cfg.method}-{teacher}-{cfg.student.name}".replace(os.sep, "_")  # hf-hub:org/name: one folder


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / (cfg.train.run_name or default_run_name(cfg))


def refuse_foreign(found: RunDirContents) -> None:
    """Refuse a directory that holds files but no run: nothing of it is used, locked or deleted."""
    if found.exists and not found.is_run and not found.empty:
        raise CrossDistillError(
            f"{found.path} is not a crossdistill run directory (it holds {found.describe_foreign()}) and is "
            "left as it is; choose another train.run_name / train.output_dir (an empty or new directory)"
        )


def judge_run_dir(
    found: RunDirContents, contents: RunDirContents, resume: bool, overwrite: bool
) -> tuple[bool, str | None]:
    """What a run started with ``resume`` / ``overwrite`` does with its directory: whether it resumes from a
    checkpoint, and a line to print when it starts over an earlier attempt; a directory it must not use raises.
    ``found``: the directory before this process locked it; ``contents``: since (the same for a mere look)."""
    run_dir = contents.path
    if contents.impostors and not (resume and contents.has_checkpoint):
        names = ", ".join(p.relative_to(run_dir).as_posix() for p in contents.impostors[:3])
        raise CrossDistillError(
            f"{run_dir} holds {names} under the name of a file a run writes, but not as a run writes it "
            "(unreadable, or another tool's file): a run would replace it. Move it out of the directory, "
            "or choose another train.run_name / train.output_dir"
        )
    if contents.has_checkpoint:
        if resume:
            return True, None
        if overwrite:
            return False, None
        raise CrossDistillError(
            f"run directory {run_dir} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another train.run_name / train.output_dir"
        )
    if found.is_run or contents.is_run:
        return False, (
            f"{run_dir} holds no checkpoint (an earlier attempt stopped before its first one): "
            "starting the run from the beginning"
        )
    if resume:
        raise CrossDistillError(f"nothing to resume: no checkpoint in {run_dir}")
    return False, None


def preview_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> str:
    """What a run of ``cfg`` would do with its run directory, in a few words, judged as :class:`RunDirClaim`
    judges it but without locking, creating or changing anything; a directory the run would refuse raises."""
    run_dir = run_dir_of(cfg)
    found = inspect_run_dir(run_dir)
    refuse_foreign(found)
    check_creatable(run_dir)
    held_by = lock_holder(run_dir)
    if held_by is not None:
        raise run_dir_in_use(run_dir, held_by)
    resumes, note = judge_run_dir(found, found, resume, overwrite)
    if resumes:
        return "holds a run: --resume continues it from its newest checkpoint, which --dry-run does not load"
    if note:
        return note.removeprefix(f"{run_dir} ")
    if found.has_checkpoint:
        return "holds a run: --overwrite replaces what it wrote, once the new run is set up"
    return "exists and is empty" if found.exists else "new: the run creates it"


class RunDirClaim:
    """The run directory of ``cfg`` as one run holds it (rank 0 locks and writes; every rank learns the outcome)."""

    def __init__(self, cfg: RunConfig, env: DistEnv, log: Callable[[str], None]):
        self.cfg, self.env, self.log = cfg, env, log
        self.run_dir = run_dir_of(cfg)
        self.lock = RunDirLock(self.run_dir) if env.is_main else None
        self.started_over_run = False  # the folder of an earlier run: removed again if this one fails at once

    def claim(self, resume: bool, overwrite: bool) -> bool:
        """Lock the run directory (rank 0) and decide what to do with what it holds, before anything is built
        or written. Returns whether to resume from a checkpoint (else the run starts from the beginning: what
        an earlier run wrote there is replaced once this one is set up, see :meth:`create`)."""
        decision: dict[str, Any] = {}
        if self.env.is_main:
            try:
                decision = {"resume": self._claim_on_main(resume, overwrite)}
            except CrossDistillError as err:
                decision = {"error": str(err)}
        decision = broadcast_from_main(self.env, decision)
        if "error" in decision:
            raise CrossDistillError(decision["error"])
        return decision["resume"]

    def _claim_on_main(self, resume: bool, overwrite: bool) -> bool:
        found = inspect_run_dir(self.run_dir)
        refuse_foreign(found)
        self.lock.acquire()
        self.started_over_run = found.is_run
        try:
            resumes, note = judge_run_dir(found, inspect_run_dir(self.run_dir, own_lock=True), resume, overwrite)
        except CrossDistillError:
            self.release(failed=True)
            raise
        if note:
            self.log(note)
        return resumes

    def release(self, failed: bool = False) -> None:
        """Unlock the run directory. After a failure before the run's first checkpoint, also remove what it
        wrote (and the folders it made): a failed run leaves no run directory behind, and the same command
        starts it again."""
        lock = self.lock
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

    def create(self, resume: bool, epochs_changed_from: int | None = None) -> None:
        """Called once everything is built: a run that fails on bad input leaves no directory behind."""
        if resume:
            if self.env.is_main:
                torn = remove_torn_files(self.run_dir) + remove_torn_files(self.run_dir / STEP_DIR)
                if torn:
                    self.log(
                        f"removed {len(torn)} unfinished checkpoint write(s) of the interrupted run: "
                        + ", ".join(p.name for p in torn)
                    )
                if epochs_changed_from is not None:
                    self._record_epochs()
            return
        barrier(self.env)
        if self.env.is_main:
            contents = inspect_run_dir(self.run_dir)
            removed = remove_run_files(contents)
            if removed:
                self.log(f"removed the {len(removed)} file(s) of the earlier run in {self.run_dir}")
            if contents.foreign:
                self.log(f"kept what a run does not write in {self.run_dir}: {contents.describe_foreign()}")
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
        write_text_atomic(
            path,
            self.cfg.to_yaml(),
            hint="Free some space (or choose another train.output_dir) and run the command again.",
        )
