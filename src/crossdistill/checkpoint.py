"""Reading and writing checkpoint files safely.

A checkpoint file is untrusted input: ``.pth``/``.pt`` files are read with
``torch.load(weights_only=True)`` (no code runs while unpickling) and
``.safetensors`` files with safetensors. Writes are atomic, through
:mod:`crossdistill.files` (a temporary file in the same directory, flushed and
fsynced, then renamed over the target): a crash leaves either the old file or the
new one, never a torn one. The names here default the full-disk advice to a run's
(``RESUME_HINT``).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from . import files
from .errors import SHOWN_CHARS, CrossDistillError, one_line
from .files import NO_SPACE_ERRNOS, is_disk_full  # noqa: F401  (re-exported: the engine and export use them)

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


RESUME_HINT = "Free some space (or move train.output_dir) and resume with --resume."


def no_space_error(path: str | Path, hint: str = RESUME_HINT, err: BaseException | None = None) -> CrossDistillError:
    """The one-line error for a write to ``path`` that found no room (see ``files.no_space_error``)."""
    return files.no_space_error(path, hint, err)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], *, hint: str = RESUME_HINT) -> None:
    """Call ``write(handle)`` to fill ``path`` atomically; a full disk is one line ending with ``hint``, see
    :func:`crossdistill.files.write_atomic`."""
    files.write_atomic(path, write, hint=hint)


def save_atomic(obj: Any, path: str | Path, *, hint: str = RESUME_HINT) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename); a full disk is one line."""
    files.write_atomic(path, lambda handle: torch.save(obj, handle), hint=hint)


def write_text_atomic(path: str | Path, text: str, *, hint: str = RESUME_HINT) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; a full disk is one line, see :func:`write_atomic`."""
    files.write_text_atomic(path, text, hint=hint)
