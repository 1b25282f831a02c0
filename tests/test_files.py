"""files.py: the atomic-write helper every writer goes through (the full-disk cases of each writer are in
tests/engine/test_faults.py)."""

import errno
import os

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
