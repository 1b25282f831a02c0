"""Reading and writing checkpoint files safely.

A checkpoint file is untrusted input: ``.pth``/``.pt`` files are read with
``torch.load(weights_only=True)`` (no code runs while unpickling) and
``.safetensors`` files with safetensors. Writes are atomic: a temporary file in
the same directory, flushed and fsynced, then renamed over the target, so a
crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from .errors import SHOWN_CHARS, CrossDistillError, one_line


# Plain attribute containers that timm's CheckpointSaver stores beside the weights (the run's
# argparse arguments): the official OFA/RSD teacher files hold one. Rebuilding them runs no code.
SAFE_GLOBALS = (argparse.Namespace,)


def _allowed_globals():
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(list(SAFE_GLOBALS))
    torch.serialization.add_safe_globals(list(SAFE_GLOBALS))  # torch 2.4: no context manager
    return contextlib.nullcontext()


def _refusal_reason(err: Exception) -> str:
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    named = [line for line in lines if "Unsupported global" in line or "GLOBAL" in line]
    return (named or [line for line in lines if line] or ["unsupported object"])[0]


def _reason(err: Exception) -> str:
    """A library's error text shortened to one line (torch's and safetensors' can span several)."""
    return one_line(err)[:SHOWN_CHARS]


def load_weights_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint or state-dict file without executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise CrossDistillError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CrossDistillError(f"{path}: not a readable safetensors file ({_reason(err)})") from None
    try:
        with _allowed_globals():
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower() or "unsupported operand" in str(err).lower():  # bytes, not objects
            raise CrossDistillError(
                f"{path}: not a readable checkpoint (corrupt or not a torch file): {_reason(err)}"
            ) from None
        raise CrossDistillError(
            f"{path}: refused to load: the file holds Python objects other than tensors and plain "
            f"containers, which could execute code ({_refusal_reason(err)}). "
            "Re-save it as a plain state dict or as .safetensors."
        ) from None
    except Exception as err:  # torch.load raises many types on foreign or truncated files
        raise CrossDistillError(
            f"{path}: not a readable checkpoint (truncated or not a torch file?): {type(err).__name__}: {_reason(err)}"
        ) from None
    if not isinstance(obj, dict):
        raise CrossDistillError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    return obj


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TORN_PATTERN = ".*.pt.*.tmp"
"""What :func:`save_atomic` leaves behind when the process is killed mid-write (never read)."""


def remove_torn_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted, in ``folder``; returns them."""
    removed = []
    for path in sorted(Path(folder).glob(TORN_PATTERN)):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
RESUME_HINT = "Free some space (or move train.output_dir) and resume with --resume."


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from or while handling, is a full disk or quota.

    torch's writer turns the OSError of a full disk into ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``, raised while the OSError is handled: it is found there."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def no_space_error(path: str | Path, hint: str = RESUME_HINT) -> CrossDistillError:
    """The one-line error for a write to ``path`` that found the disk full (call it before anything is removed)."""
    kept = ("the previous version of this file is intact" if Path(path).exists() else "the file was not written")
    return CrossDistillError(f"no space left on the device while writing {path}; {kept}. {hint}")


def _open_temporary(fd: int, tmp: str) -> BinaryIO:
    """The handle an atomic write writes through (tests put a full disk behind it)."""
    return os.fdopen(fd, "wb")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], *, hint: str = RESUME_HINT) -> None:
    """Call ``write(handle)`` to fill a temporary file beside ``path``, then fsync and rename it over ``path``:
    a crash leaves the old file or the new one, never a torn one. A full disk (however it shows: an
    OSError, torch's RuntimeError) is one line naming ``path`` and ending with ``hint``, and the old file stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with _open_temporary(fd, tmp) as handle:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and is_disk_full(err):
            raise no_space_error(path, hint) from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_atomic(obj: Any, path: str | Path, *, hint: str = RESUME_HINT) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename); a full disk is one line, see :func:`write_atomic`."""
    write_atomic(path, lambda handle: torch.save(obj, handle), hint=hint)


def write_text_atomic(path: str | Path, text: str, *, hint: str = RESUME_HINT) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; a full disk is one line, see :func:`write_atomic`."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")), hint=hint)
