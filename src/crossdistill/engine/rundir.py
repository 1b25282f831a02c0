"""Run directories: what a run writes there, one writer at a time (a lock), and nothing else touched.

A run directory holds only what :class:`~crossdistill.engine.Trainer` writes (:func:`run_entries`).
Anything else found there was put by someone else: it is never deleted, and a non-empty directory
holding no run is refused rather than used.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..errors import CrossDistillError

CONFIG = "config.yaml"
CHECKPOINT = "last.pt"
BEST = "best.pt"
LATEST = "latest.json"
SUMMARY = "summary.json"
STEP_DIR = "checkpoints"
LOCK = ".crossdistill.lock"
METRICS = ("metrics.csv", "metrics.csv.old")
LOG = "train.log"
LOG_HEADER = "# crossdistill train.log"
"""The start of the first line of every train.log a run writes: how a run tells its log from a user's file."""
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG, CHECKPOINT, BEST, LATEST, SUMMARY, *METRICS, LOG, LOCK)
"""Files a run writes at the top of its directory (besides the temporary files of atomic writes)."""
CHECKPOINT_FORMAT = "crossdistill-run/1"
"""The ``format`` entry of every checkpoint a run writes (last.pt, best.pt, checkpoints/step-*.pt)."""
STEP_FILE = re.compile(r"step-\d{9}\.pt")


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``, quoted for a shell (spaces, quotes in the path)."""
    return f"crossdistill train --resume {shlex.quote(str(run_dir))}"


def step_checkpoints(folder: Path) -> list[Path]:
    """The step checkpoints a run wrote in ``folder`` (``step-NNNNNNNNN.pt``), oldest first; a user's
    ``step-mine.pt`` beside them is not one of them (never read, pruned or counted)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_FILE.fullmatch(p.name) and p.is_file())


RUN_CONFIG_KEYS = frozenset({"student", "teacher", "method", "method_args", "num_classes", "data", "optim", "train"})


def _is_temporary(name: str) -> bool:
    """A temporary file of an atomic write (``.last.pt.x1y2.tmp``, ``.latest.json.tmp``), left by a kill."""
    return name.endswith(".tmp") and (
        name.startswith(".step-")
        or any(name.startswith(f".{target}.") for target in (CHECKPOINT, BEST, LATEST, CONFIG, SUMMARY))
    )


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.yaml as a run saves it (every top-level key of a run config), not a user's file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and set(data) == RUN_CONFIG_KEYS


def _is_run_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint a run wrote (its ``format`` entry), not another tool's file of the same
    name. Memory-mapped and weights-only: nothing in the file runs, and the tensors are not read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file, a pickle with objects, truncated...: not ours
        return False
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def _json_with(path: Path, keys: frozenset[str]) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and keys <= set(data)


def _first_line_starts_with(path: Path, start: str) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith(start)
    except OSError:
        return False


def _is_metrics_table(path: Path) -> bool:
    return _first_line_starts_with(path, "epoch,")


def is_run_log(path: Path) -> bool:
    """Whether ``path`` is a train.log a run wrote (its first line starts with :data:`LOG_HEADER`)."""
    return _first_line_starts_with(path, LOG_HEADER)


RUN_FILE_CONTENTS = {
    CHECKPOINT: _is_run_checkpoint,
    BEST: _is_run_checkpoint,
    CONFIG: _is_run_config,
    LATEST: lambda path: _json_with(path, frozenset({"file", "epoch", "step"})),
    SUMMARY: lambda path: _json_with(path, frozenset({"run_dir", "last_top1", "best_top1"})),
    **{name: _is_metrics_table for name in METRICS},
    LOG: is_run_log,
}
"""How to tell a file a run wrote from a user's file that happens to have its name: only the former is ever deleted."""


def _own_folder_entries(folder: Path, owned) -> tuple[list[Path], list[Path]]:
    """(entries of ``folder`` a run wrote, the others)."""
    ours, others = [], []
    for entry in sorted(folder.iterdir()):
        (ours if entry.is_file() and owned(entry) else others).append(entry)
    return ours, others


@dataclass
class RunDirContents:
    """What a run directory holds, split into what a run wrote and everything else."""

    path: Path
    exists: bool = False
    ours: list[Path] = field(default_factory=list)
    """Files a run writes (checkpoints, config, metrics, TensorBoard events, lock, torn temporary files)."""
    foreign: list[Path] = field(default_factory=list)
    """Everything else: never deleted."""
    impostors: list[Path] = field(default_factory=list)
    """Files (among ``foreign``) with the name of a file a run writes but other content: a run would replace them."""
    has_checkpoint: bool = False
    is_run: bool = False
    """A crossdistill run (even one stopped before its first checkpoint) was started here."""

    @property
    def empty(self) -> bool:
        return not self.ours and not self.foreign

    def describe_foreign(self, limit: int = 5) -> str:
        names = [p.relative_to(self.path).as_posix() + ("/" if p.is_dir() else "") for p in self.foreign]
        return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def inspect_run_dir(path: Path, own_lock: bool = False) -> RunDirContents:
    """Sort the contents of ``path`` (a candidate run directory) into what a run wrote and the rest.
    ``own_lock``: the lock file is this process's, not a sign that a run was started here before."""
    contents = RunDirContents(Path(path))
    if not path.exists():
        return contents
    if not path.is_dir():
        raise CrossDistillError(
            f"the run directory {path} is a file, not a directory; choose another train.run_name / train.output_dir"
        )
    contents.exists = True
    for entry in sorted(path.iterdir()):
        name = entry.name
        if entry.is_symlink():
            contents.foreign.append(entry)  # whatever it points at was not written here
        elif entry.is_dir() and name in (STEP_DIR, TENSORBOARD_DIR):
            if name == STEP_DIR:

                def owned(path: Path) -> bool:
                    return (
                        STEP_FILE.fullmatch(path.name) is not None
                        and _is_run_checkpoint(path)
                        or _is_temporary(path.name)
                    )
            else:

                def owned(path: Path) -> bool:
                    return path.name.startswith("events.out.tfevents.")

            ours, others = _own_folder_entries(entry, owned)
            contents.ours += ours
            contents.foreign += others
            if name == STEP_DIR:
                contents.impostors += [p for p in others if STEP_FILE.fullmatch(p.name)]
            if not others and not ours:
                contents.ours.append(entry)  # an empty folder a run made
            if name == STEP_DIR and any(p.suffix == ".pt" and not _is_temporary(p.name) for p in ours):
                contents.has_checkpoint = True
        elif entry.is_file() and (name in RUN_FILES or _is_temporary(name)):
            if name in RUN_FILE_CONTENTS and not RUN_FILE_CONTENTS[name](entry):
                contents.foreign.append(entry)
                contents.impostors.append(entry)
                continue
            contents.ours.append(entry)
            contents.has_checkpoint |= name == CHECKPOINT
        else:
            contents.foreign.append(entry)
    names = {p.name for p in contents.ours if p.parent == path}
    if CONFIG in names and any(p.name == CHECKPOINT or p.parent.name == STEP_DIR for p in contents.impostors):
        contents.has_checkpoint = True  # a run whose checkpoint is unreadable or replaced: loading it says how
    contents.is_run = contents.has_checkpoint or bool(
        names & ({CONFIG, LATEST} if own_lock else {CONFIG, LOCK, LATEST})
    )
    return contents


def remove_run_files(contents: RunDirContents) -> list[Path]:
    """Delete what a run wrote in the directory (except its lock), folders left empty by that; returns the deleted."""
    removed = []
    for path in contents.ours:
        if path.name == LOCK and path.parent == contents.path:
            continue
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    for folder in (contents.path / STEP_DIR, contents.path / TENSORBOARD_DIR):
        try:
            folder.rmdir()  # only when empty: a folder holding someone else's files stays
        except OSError:
            pass
    return removed


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def _holder_of(fd: int) -> str:
    """`` (pid 4242 on node1)``: who holds the lock file open as ``fd`` (as its holder wrote it), or ``""``."""
    try:
        pid, host = os.pread(fd, 200, 0).decode(errors="replace").split()[:2]
        return f" (pid {pid} on {host})"
    except (OSError, ValueError):
        return ""


def run_dir_in_use(run_dir: Path, holder: str) -> CrossDistillError:
    return CrossDistillError(
        f"run directory {run_dir} is in use by another crossdistill process{holder}: "
        "a run directory has one writer. Wait for that run to end (or stop it), or choose "
        "another train.run_name / train.output_dir"
    )


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the lock of ``run_dir`` (see :func:`_holder_of`), or None when no process does. Creates and
    writes nothing: the lock file is opened read-only and locked shared for an instant."""
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _holder_of(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _blocked_by_file(run_dir: Path) -> str | None:
    """The message for a run directory that cannot be created because it, or a folder above it, is a file."""
    blocker = next((p for p in [run_dir, *run_dir.parents] if p.exists() and not p.is_dir()), None)
    if blocker is None:
        return None
    return (
        f"cannot create the run directory {run_dir}: {blocker} is a file, not a directory; "
        "choose another train.output_dir / train.run_name"
    )


def check_creatable(run_dir: Path) -> None:
    """Raise what :class:`RunDirLock` would when it cannot create or write ``run_dir``, without trying to."""
    blocked = _blocked_by_file(run_dir)
    if blocked:
        raise CrossDistillError(blocked)
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CrossDistillError(
            f"cannot write the run directory {run_dir}: {os.strerror(errno.EACCES)}; choose a writable train.output_dir"
        )


class RunDirLock:
    """An exclusive ``fcntl.flock`` on ``RUN_DIR/.crossdistill.lock``: one process writes a run directory.

    The lock dies with the process (a killed run leaves no stale lock, only the file, which the next run
    takes over); a released lock removes its file. Creating the lock creates the run directory (and any
    missing parent); :meth:`release` with ``remove_created`` removes those again when they are empty, so
    a run that fails during set-up leaves nothing behind.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.created: list[Path] = []
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.created = _missing_parents(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(10):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    holder = _holder_of(fd)
                    os.close(fd)
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        self.release(remove_created=True)
                        raise run_dir_in_use(self.run_dir, holder) from None
                    raise
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
                os.close(fd)  # the previous holder removed the file between our open and our lock: again
            else:
                raise OSError(errno.EAGAIN, "could not lock", str(self.path))
            self.fd = fd
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except CrossDistillError:
            raise
        except OSError as err:
            self.release(remove_created=True)
            raise CrossDistillError(self._cannot_write(err)) from None

    def _cannot_write(self, err: OSError) -> str:
        return _blocked_by_file(self.run_dir) or (
            f"cannot write the run directory {self.run_dir}: {err.strerror or err}; choose a writable train.output_dir"
        )

    def release(self, remove_created: bool = False) -> None:
        """Unlock and remove the lock file; with ``remove_created``, also the folders :meth:`acquire` created
        (when they are empty)."""
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still holding it: see the inode check in acquire
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
        if remove_created:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:
                    break
            self.created = []

    @property
    def held(self) -> bool:
        return self.fd is not None
