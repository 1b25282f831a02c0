"""Writing files atomically: the one helper every writer of the toolkit goes through.

A write goes to a temporary file (or folder) beside the target, is flushed and fsynced, then renamed
over the target with ``os.replace``: a crash, a ``kill -9`` or a full disk leaves the old file or the
new one under the target's name, never a torn one. The temporary is removed when the write fails;
only a kill can leave one behind (``.<name>.<random>.tmp``, never read). A full disk or quota, or a file
larger than the file system or ``ulimit -f`` allows, however a library reports it, becomes one line
(:func:`no_space_error`) that names the file and says whether its previous version is intact.

* :func:`write_atomic`: the caller writes through a binary handle (``torch.save``, ``np.savez``);
* :func:`write_bytes_atomic`, :func:`write_text_atomic`: bytes or UTF-8 text already in memory;
* :func:`write_path_atomic`: for libraries that insist on a path (ONNX export, ``save_config_for_hf``,
  ``np.lib.format.open_memmap``); its ``exclusive`` mode creates the file only if it is absent and never
  replaces one another process created meanwhile.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import CrossDistillError, exception_chain

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""What a write that found no room raises: a full disk, a full quota, a file past the largest the file system
(FAT32: 4 GiB) or the process's limit (``ulimit -f``, with SIGXFSZ ignored) allows."""
RERUN_HINT = "Free some space (or write to another disk) and run the command again."
"""The full-disk advice of a command that only writes its output (a report, a plot): nothing to resume."""


class NoSpaceError(CrossDistillError):
    """A write found no room (see :data:`NO_SPACE_ERRNOS`); the message is one line, see :func:`no_space_error`."""

    path: Path | None = None
    """The file it was writing."""


def _no_space_errno(err: BaseException) -> int | None:
    for raised in exception_chain(err):
        if isinstance(raised, OSError) and raised.errno in NO_SPACE_ERRNOS:
            return raised.errno
    return None


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from or while handling, found no room (a full disk or quota,
    a file too large: :data:`NO_SPACE_ERRNOS`).

    torch's writer turns the OSError of a full disk into ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos``, raised while the OSError is handled: it is found there."""
    return _no_space_errno(err) is not None


def no_space_error(path: str | Path, hint: str, err: BaseException | None = None) -> NoSpaceError:
    """The one-line error for a write to ``path`` that found no room, ``err`` what it raised (call it before
    anything is removed)."""
    kept = "the previous version of this file is intact" if Path(path).exists() else "the file was not written"
    why = "no space left on the device"
    if err is not None and _no_space_errno(err) == errno.EFBIG:
        why = "the file grew past the largest this file system or the process's file-size limit (ulimit -f) allows"
    error = NoSpaceError(f"{why} while writing {path}; {kept}. {hint}")
    error.path = Path(path)
    return error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_temporary(fd: int, tmp: str) -> BinaryIO:
    """The handle :func:`write_atomic` writes through (tests put a full disk behind it)."""
    return os.fdopen(fd, "wb")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot open a directory)."""
    try:
        _fsync_file(folder)
    except OSError:
        pass


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object], *, hint: str) -> None:
    """Call ``write(handle)`` to fill a temporary file beside ``path``, then fsync and rename it over ``path``.

    A full disk (however it shows: an OSError, torch's RuntimeError) is a :class:`NoSpaceError` naming
    ``path`` and ending with ``hint``; the previous file stays and the temporary file is removed."""
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
            raise no_space_error(path, hint, err) from None
        raise
    _fsync_directory(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes, *, hint: str) -> None:
    """Write ``data`` to ``path`` atomically; see :func:`write_atomic`."""
    write_atomic(path, lambda handle: handle.write(data), hint=hint)


def write_text_atomic(path: str | Path, text: str, *, hint: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"), hint=hint)


def write_path_atomic(path: str | Path, write: Callable[[Path], object], *, hint: str, exclusive: bool = False) -> bool:
    """Call ``write(target)`` for a library that writes to a path, then move what it wrote to ``path`` atomically.

    ``target`` has ``path``'s own name, inside a fresh temporary folder beside ``path``
    (``.<name>.<random>.tmp/``): a library that picks its format from the suffix, or that writes
    companions named after the file (ONNX external data ``model.onnx.data``), works unchanged. Every
    file it writes is fsynced and renamed into ``path``'s folder, companions first and ``path`` last;
    the temporary folder is then removed (also when anything fails). A full disk is a
    :class:`NoSpaceError`, as in :func:`write_atomic`.

    ``exclusive``: create ``path`` only if it does not exist (``os.link``, atomic): a file that exists,
    or that another process creates meanwhile, is never replaced, and the call returns False (True when
    it created ``path``). The library must then write ``path`` alone.
    """
    path = Path(path)
    folder = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        target = folder / path.name
        write(target)
        if not target.is_file():
            raise FileNotFoundError(errno.ENOENT, f"the writer did not create {path.name}", str(target))
        written = sorted(p for p in folder.iterdir() if p != target) + [target]
        if exclusive and len(written) > 1:
            raise ValueError(f"an exclusive write of {path} wrote other files too: {[p.name for p in written]}")
        for file in written:
            _fsync_file(file)
        if exclusive:
            try:
                os.link(target, path)
            except FileExistsError:
                return False
        else:
            for file in written:
                os.replace(file, path.parent / file.name)
    except BaseException as err:
        if isinstance(err, Exception) and is_disk_full(err):
            raise no_space_error(path, hint, err) from None
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    _fsync_directory(path.parent)
    return True
