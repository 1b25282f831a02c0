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
from typing import Any

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
        if "weights only" not in str(err).lower():
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


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CrossDistillError(
                f"no space left on the device while writing {path}; the previous version of this file is intact. "
                "Free some space (or move train.output_dir) and resume with --resume."
            ) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
