"""files.py: the atomic-write helper every writer goes through (the full-disk cases of each writer are in
tests/engine/test_faults.py)."""

import ast
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossdistill import files
from crossdistill.errors import CrossDistillError
from crossdistill.files import NoSpaceError, write_atomic, write_path_atomic, write_text_atomic

HINT = "Free some space and try again."


def test_text_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "deep" / "er" / "a.json"  # missing folders are made
    write_text_atomic(path, "one", hint=HINT)
    write_text_atomic(path, "twø", hint=HINT)
    assert path.read_text(encoding="utf-8") == "twø" and os.listdir(path.parent) == ["a.json"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~files._umask())  # not mkstemp's 0600


def test_a_failing_writer_keeps_the_previous_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def half_then_fails(handle):
        handle.write(b"ne")
        raise KeyboardInterrupt  # also on an interrupt, not only on an Exception

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_fails, hint=HINT)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    def full(handle):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(NoSpaceError) as raised:
        write_atomic(tmp_path / "new.bin", full, hint=HINT)
    assert isinstance(raised.value, CrossDistillError)
    assert str(raised.value) == (
        f"no space left on the device while writing {tmp_path / 'new.bin'}; the file was not written. {HINT}"
    )
    assert not os.listdir(tmp_path)


def test_a_file_past_the_size_limit_is_one_line_that_says_so(tmp_path):
    """``ulimit -f`` (or FAT32's 4 GiB) fails a write with EFBIG: it was a traceback."""
    path = tmp_path / "big.bin"
    script = (
        "import resource, signal\n"
        "from crossdistill.files import NoSpaceError, write_bytes_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        f"    write_bytes_atomic({str(path)!r}, bytes(10000), hint={HINT!r})\n"
        "except NoSpaceError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "the file grew past the largest this file system or the process's file-size limit (ulimit -f) allows while "
        f"writing {path}; the file was not written. {HINT}\n"
    )
    assert not os.listdir(tmp_path)


def test_a_path_writer_gets_the_real_name_and_its_companions_arrive_too(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    seen = []

    def library(target):
        seen.append(target)
        target.write_bytes(b"graph")
        target.with_name(target.name + ".data").write_bytes(b"weights")

    assert write_path_atomic(path, library, hint=HINT) is True
    assert seen[0].name == "model.onnx" and seen[0].parent != tmp_path  # written elsewhere, then renamed
    assert path.read_bytes() == b"graph" and (tmp_path / "model.onnx.data").read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]  # the temporary folder is gone


@pytest.mark.parametrize("failure", ["raises", "writes nothing", "disk full"])
def test_a_failing_path_writer_keeps_the_previous_file_and_removes_its_folder(tmp_path, failure):
    path = tmp_path / "config.json"
    path.write_text("old")

    def library(target):
        if failure == "writes nothing":
            return
        target.write_text("half")
        raise OSError(errno.ENOSPC if failure == "disk full" else errno.EIO, "write failed")

    expected = NoSpaceError if failure == "disk full" else OSError
    with pytest.raises(expected, match="previous version of this file is intact" if failure == "disk full" else None):
        write_path_atomic(path, library, hint=HINT)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_exclusive_creates_a_missing_file_and_never_replaces_one(tmp_path):
    path = tmp_path / "rows.npy"
    assert write_path_atomic(path, lambda target: target.write_bytes(b"first"), hint=HINT, exclusive=True) is True

    def another_run_was_faster(target):
        target.write_bytes(b"second")

    assert write_path_atomic(path, another_run_was_faster, hint=HINT, exclusive=True) is False
    assert path.read_bytes() == b"first" and os.listdir(tmp_path) == ["rows.npy"]


# --- what a crash would see: the temporary's name and place, the order of flush, fsync and rename --------------


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


def test_the_temporary_is_a_hidden_tmp_file_beside_the_target(tmp_path):
    """A kill mid-write leaves ``.<name>.<random>.tmp`` beside the target: the pattern that resume removes
    (checkpoint.TORN_PATTERN) and that no reader of the folder takes for the file itself."""
    seen = []

    def look(handle):
        seen.extend(os.listdir(tmp_path))
        handle.write(b"new")

    write_atomic(tmp_path / "last.pt", look, hint=HINT)
    assert len(seen) == 1 and seen[0].startswith(".last.pt.") and seen[0].endswith(".tmp"), seen
    assert seen[0] != ".last.pt..tmp"  # a random part: two writers never share a temporary


def test_the_temporary_folder_of_a_path_writer_is_hidden_beside_the_target(tmp_path):
    seen = []

    def library(target):
        seen.append(target.parent)
        target.write_bytes(b"x")

    write_path_atomic(tmp_path / "model.onnx", library, hint=HINT)
    folder = seen[0]
    assert folder.parent == tmp_path and folder.name.startswith(".model.onnx.") and folder.name.endswith(".tmp")


def test_the_data_are_flushed_and_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The order that makes a write durable: every byte is in the file when it is fsynced, the file is
    fsynced before it replaces the target, and the folder (the rename) after. No descriptor is left open."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else info.st_size, info.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst), os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    before = _open_descriptors()
    write_text_atomic(tmp_path / "a.json", "12345", hint=HINT)
    assert _open_descriptors() == before
    (_, size, file_inode), (_, name, replaced_inode), (_, kind, folder_inode) = events
    assert size == 5 and file_inode == replaced_inode and name == "a.json"
    assert kind == "dir" and folder_inode == tmp_path.stat().st_ino

    events.clear()
    write_path_atomic(
        tmp_path / "model.onnx", lambda t: (t.write_bytes(b"abc"), t.with_suffix(".x").write_bytes(b"")), hint=HINT
    )
    assert _open_descriptors() == before
    assert [e[0] for e in events] == ["fsync", "fsync", "replace", "replace", "fsync"]
    assert sorted(e[1] for e in events[:2]) == [0, 3]  # each file written whole when fsynced
    assert [e[1] for e in events[2:4]] == ["model.x", "model.onnx"]  # companions first, the file itself last
    assert events[4][1] == "dir" and events[4][2] == tmp_path.stat().st_ino


def test_a_folder_that_cannot_be_fsynced_is_no_error(tmp_path, monkeypatch):
    """Some file systems cannot open a directory: the rename is made durable as far as the system allows."""
    real_open = os.open

    def no_directories(path, flags, *args):
        if os.path.isdir(path):
            raise OSError(errno.EISDIR, "cannot open a directory here")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_directories)
    write_text_atomic(tmp_path / "a.json", "x", hint=HINT)
    assert write_path_atomic(tmp_path / "b.json", lambda t: t.write_text("y"), hint=HINT) is True
    assert (tmp_path / "a.json").read_text() == "x" and (tmp_path / "b.json").read_text() == "y"


# --- what counts as a full disk --------------------------------------------------------------------------------


def _raised_while_handling(inner: BaseException, outer: BaseException, *, cause: bool) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            if cause:
                raise outer from inner
            raise outer
    except BaseException as err:
        return err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_or_quota_is_found_however_deep_it_was_raised(code):
    full = OSError(code, os.strerror(code))
    assert files.is_disk_full(full)
    # torch's writer raises a RuntimeError while handling the OSError; others raise from it
    assert files.is_disk_full(_raised_while_handling(full, RuntimeError("unexpected pos"), cause=False))
    assert files.is_disk_full(_raised_while_handling(full, RuntimeError("write failed"), cause=True))
    deeper = _raised_while_handling(full, ValueError("a"), cause=True)
    assert files.is_disk_full(_raised_while_handling(deeper, RuntimeError("b"), cause=False))


def test_other_errors_are_not_a_full_disk_and_a_cycle_ends():
    assert not files.is_disk_full(OSError(errno.EIO, "i/o error"))
    assert not files.is_disk_full(RuntimeError("unexpected pos"))
    assert not files.is_disk_full(_raised_while_handling(OSError(errno.EACCES, "denied"), RuntimeError(), cause=True))
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not files.is_disk_full(first)


def test_any_other_failure_passes_through_unchanged(tmp_path):
    failure = OSError(errno.EIO, "i/o error")

    def fails(handle):
        raise failure

    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "a.bin", fails, hint=HINT)
    assert raised.value is failure and not os.listdir(tmp_path)


def test_a_full_disk_under_a_text_or_path_write_names_the_file_and_ends_with_the_hint(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text("old")

    def full(fd):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", full)
    expected = f"no space left on the device while writing {path}; the previous version of this file is intact. {HINT}"
    with pytest.raises(NoSpaceError) as raised:
        write_text_atomic(path, "new", hint=HINT)
    assert str(raised.value) == expected and raised.value.__suppress_context__
    with pytest.raises(NoSpaceError) as raised:
        write_path_atomic(path, lambda target: target.write_text("new"), hint=HINT)
    assert str(raised.value) == expected and raised.value.__suppress_context__
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_a_path_writer_that_writes_nothing_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        write_path_atomic(tmp_path / "model.onnx", lambda target: None, hint=HINT)
    assert raised.value.errno == errno.ENOENT and raised.value.strerror == "the writer did not create model.onnx"
    where = Path(raised.value.filename)  # the path the writer was given, in the (removed) temporary folder
    assert where.name == "model.onnx" and where.parent.parent == tmp_path and where.parent.name.startswith(".model.")
    assert not os.listdir(tmp_path)


def test_cleaning_up_never_hides_the_writers_own_error(tmp_path):
    def fails_after_removing_its_folder(target):
        shutil.rmtree(target.parent)
        raise OSError(errno.EIO, "i/o error")

    with pytest.raises(OSError) as raised:
        write_path_atomic(tmp_path / "model.onnx", fails_after_removing_its_folder, hint=HINT)
    assert raised.value.errno == errno.EIO and not os.listdir(tmp_path)


def test_an_exclusive_write_of_several_files_is_refused(tmp_path):
    def two_files(target):
        target.write_bytes(b"a")
        target.with_name("rows.npy.data").write_bytes(b"b")

    with pytest.raises(
        ValueError,
        match=r"an exclusive write of .*rows\.npy wrote other files too: \['rows\.npy\.data', 'rows\.npy'\]$",
    ):
        write_path_atomic(tmp_path / "rows.npy", two_files, hint=HINT, exclusive=True)
    assert not os.listdir(tmp_path)


def test_a_path_writer_makes_the_missing_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "config.json"
    assert write_path_atomic(path, lambda target: target.write_text("{}"), hint=HINT) is True
    assert path.read_text() == "{}" and os.listdir(path.parent) == ["config.json"]


def test_a_folder_that_cannot_be_made_is_its_own_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "file" / "a.bin", lambda handle: handle.write(b"x"), hint=HINT)
    with pytest.raises(FileExistsError):
        write_path_atomic(tmp_path / "file" / "a.bin", lambda target: target.write_bytes(b"x"), hint=HINT)
    assert os.listdir(tmp_path) == ["file"]


def test_an_interrupt_just_after_the_rename_is_still_the_interrupt(tmp_path, monkeypatch):
    """A signal can land after os.replace returned, before the write returns: the temporary is already the
    target then, and the caller sees the interrupt, not an error about the temporary."""
    real_replace = os.replace

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(tmp_path / "a.json", "new", hint=HINT)
    assert (tmp_path / "a.json").read_text() == "new" and os.listdir(tmp_path) == ["a.json"]


def test_the_handle_seam_is_given_the_temporarys_path(tmp_path, monkeypatch):
    """Tests put a full disk behind ``_open_temporary``, choosing the file by the temporary's name."""
    real_open, seen = files._open_temporary, []

    def open_temporary(fd, tmp):
        seen.append(os.path.samefile(tmp, f"/proc/self/fd/{fd}") and os.path.dirname(tmp) == str(tmp_path))
        return real_open(fd, tmp)

    monkeypatch.setattr(files, "_open_temporary", open_temporary)
    write_text_atomic(tmp_path / "a.json", "x", hint=HINT)
    assert seen == [True]


def _plain_writes(source: str) -> list[int]:
    """Lines of ``source`` that replace a file's contents without this module: ``Path.write_text`` or
    ``write_bytes``, or ``open`` in a ``w`` or ``x`` mode of anything but the null device (appending to a log is
    allowed: an interrupted append loses only its own line)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("write_text", "write_bytes"):
            found.append(node.lineno)
        elif name == "open":
            method = isinstance(func, ast.Attribute)  # Path.open(mode) or open(file, mode)
            modes = [a.value for a in node.args[0 if method else 1 :][:1] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            null = not method and bool(node.args) and ast.unparse(node.args[0]) in ("os.devnull", "'/dev/null'")
            if any(set(str(m)) & {"w", "x"} for m in modes) and not null:
                found.append(node.lineno)
    return found


def test_the_package_and_the_studies_replace_files_only_through_this_module():
    root = Path(__file__).resolve().parents[1]
    sources = sorted((root / "src" / "crossdistill").rglob("*.py")) + sorted((root / "benchmarks").rglob("*.py"))
    assert len(sources) > 50
    plain = {str(p.relative_to(root)): lines for p in sources if (lines := _plain_writes(p.read_text()))}
    assert plain == {}


def test_the_scan_finds_each_kind_of_plain_write():
    source = (
        "p.write_text('a')\np.write_bytes(b'a')\nopen(p, 'w')\nopen(p, mode='xb')\np.open('w')\n"
        "open(p, 'a')\nopen(os.devnull, 'w')\nopen('/dev/null', 'w')\nopen(p)\n"
    )
    assert _plain_writes(source) == [1, 2, 3, 4, 5]
