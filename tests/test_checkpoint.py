"""checkpoint.py on its own: untrusted files are read without running code, and writes are atomic.

(The engine-level behaviour, a full disk during training and resumes, is in tests/engine/test_faults.py.)
"""

import argparse
import errno
import os
import pickle

import pytest
import torch

from crossdistill import checkpoint
from crossdistill.checkpoint import TORN_PATTERN, _refusal_reason, load_weights_file, remove_torn_files, save_atomic
from crossdistill.errors import CrossDistillError


class Payload:
    """A class a malicious pickle could name (torch.load with weights_only=True must refuse it)."""


def test_a_state_dict_round_trips_and_the_file_is_replaced_whole(tmp_path):
    path = tmp_path / "sub" / "dir" / "last.pt"  # missing folders are created
    save_atomic({"w": torch.ones(3), "step": 4}, path)
    save_atomic({"w": torch.zeros(2), "step": 5}, path)
    loaded = load_weights_file(path)
    assert torch.equal(loaded["w"], torch.zeros(2)) and loaded["step"] == 5
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left


def test_a_timm_saver_namespace_loads_and_is_allowed_only_while_loading(tmp_path):
    path = tmp_path / "saver.pth.tar"
    torch.save({"state_dict": {"w": torch.ones(1)}, "args": argparse.Namespace(model="swin")}, path)
    assert load_weights_file(path)["args"].model == "swin"
    assert argparse.Namespace not in torch.serialization.get_safe_globals()  # torch's global allow-list untouched


@pytest.mark.parametrize(
    "lines,reason",
    [
        (
            [
                "\x1b[1mWeights only load failed.\x1b[0m",
                "",
                "  \x1b[31mUnsupported global: GLOBAL a.B was not allowed\x1b[0m ",
            ],
            "Unsupported global: GLOBAL a.B was not allowed",
        ),
        (
            ["Weights only load failed; see the global allow-list", "Trying to load unsupported GLOBAL a.B"],
            "Trying to load unsupported GLOBAL a.B",
        ),
        (["Weights only load failed.", "Unsupported global: a.B"], "Unsupported global: a.B"),
        (["", "  Weights only load failed: \x1b[1mbad opcode\x1b[0m", "more"], "Weights only load failed: bad opcode"),
        ([""], "unsupported object"),
    ],
)
def test_the_refusal_names_the_line_about_the_global_without_terminal_colours(lines, reason):
    assert _refusal_reason(Exception("\n".join(lines))) == reason


def test_a_file_with_python_objects_is_refused_naming_the_global(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Payload()}, path)
    with pytest.raises(CrossDistillError) as err:
        load_weights_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: refused to load: the file holds Python objects")
    assert "test_checkpoint.Payload" in message and "\n" not in message
    assert message.endswith("Re-save it as a plain state dict or as .safetensors.")


def test_the_refusal_does_not_depend_on_torchs_default(tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch.load's default becomes weights_only=False
    with pytest.raises(CrossDistillError, match="refused to load"):
        load_weights_file(path)


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    path = tmp_path / "gpu.pt"
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")  # as torch.save on a GPU
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.undo()
    loaded = load_weights_file(path)["w"]
    assert loaded.device.type == "cpu" and torch.equal(loaded, torch.ones(2))


def test_foreign_and_truncated_files_are_clear_errors(tmp_path):
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(pickle.dumps([1, 2], protocol=2))  # a pickle, not a torch file
    with pytest.raises(
        CrossDistillError,
        match=f"^{foreign}: not a readable checkpoint \\(truncated or not a torch file\\?\\): RuntimeError: ",
    ):
        load_weights_file(foreign)
    truncated = tmp_path / "truncated.pt"
    torch.save({"w": torch.ones(100)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CrossDistillError, match=f"^{truncated}: not a readable checkpoint"):
        load_weights_file(truncated)


def test_random_bytes_are_a_corrupt_file_not_a_refused_object(tmp_path):
    """torch's weights-only unpickler reports an unknown opcode as a weights-only failure; it is not a code object."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(
        CrossDistillError, match=f"^{garbage}: not a readable checkpoint \\(corrupt or not a torch file\\)"
    ):
        load_weights_file(garbage)


def test_a_file_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CrossDistillError, match=f"^{path}: expected a dict of weights, found list$"):
        load_weights_file(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CrossDistillError, match=f"^checkpoint file not found: {tmp_path / 'nope.pt'}$"):
        load_weights_file(tmp_path / "nope.pt")
    with pytest.raises(CrossDistillError, match="checkpoint file not found"):
        load_weights_file(tmp_path)  # a folder is not a checkpoint file


def test_safetensors_files_load_and_damaged_ones_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(3.0)}, str(path))
    assert torch.equal(load_weights_file(path)["w"], torch.arange(3.0))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CrossDistillError, match=f"^{path}: not a readable safetensors file"):
        load_weights_file(path)


@pytest.mark.parametrize("umask,mode", [(0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_usual_permissions(tmp_path, umask, mode):
    mask = os.umask(umask)
    try:
        save_atomic({"w": torch.ones(1)}, tmp_path / "c.pt")
        assert os.umask(umask) == umask  # the process umask is left as it was
    finally:
        os.umask(mask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch, code):
    path = tmp_path / "last.pt"
    save_atomic({"w": torch.ones(3)}, path)

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CrossDistillError) as err:
        save_atomic({"w": torch.zeros(3)}, path)
    assert str(err.value) == (
        f"no space left on the device while writing {path}; the previous version of this file "
        "is intact. Free some space (or move train.output_dir) and resume with --resume."
    )
    monkeypatch.undo()
    assert torch.equal(load_weights_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("error", [OSError(errno.EIO, "I/O error"), KeyboardInterrupt()])
def test_other_failures_propagate_and_leave_no_temporary_file(tmp_path, monkeypatch, error):
    def failing(obj, handle):
        handle.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(type(error)):
        save_atomic({"w": torch.zeros(3)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_write_in_progress_is_a_torn_file_beside_the_target(tmp_path, monkeypatch):
    """What a kill mid-write leaves is what remove_torn_files removes (and a hidden name no glob of
    checkpoints picks up)."""
    seen = []
    original = torch.save

    def spying(obj, handle):
        seen.extend(tmp_path.iterdir())
        original(obj, handle)

    monkeypatch.setattr(torch, "save", spying)
    save_atomic({"w": torch.ones(1)}, tmp_path / "last.pt")
    (temporary,) = seen
    assert temporary.parent == tmp_path and temporary.name.startswith(".last.pt.") and temporary.match(TORN_PATTERN)


def test_torn_files_are_removed_and_nothing_else(tmp_path):
    torn = tmp_path / ".last.pt.abc123.tmp"
    torn.write_bytes(b"partial")
    keep = [tmp_path / "last.pt", tmp_path / ".last.pt", tmp_path / "notes.tmp", tmp_path / ".other.txt.x.tmp"]
    for path in keep:
        path.write_bytes(b"x")
    (tmp_path / ".dir.pt.x.tmp").mkdir()  # a folder that matches is not a torn write
    assert torn.match(TORN_PATTERN)
    assert remove_torn_files(tmp_path) == [torn]
    assert not torn.exists() and all(path.exists() for path in keep) and (tmp_path / ".dir.pt.x.tmp").is_dir()
    assert remove_torn_files(tmp_path) == []


def test_a_torn_file_another_process_removes_first_is_no_error(tmp_path, monkeypatch):
    torn = tmp_path / ".last.pt.abc123.tmp"
    torn.write_bytes(b"partial")
    is_file = type(torn).is_file

    def removed_meanwhile(path):  # another rank resuming in the same folder wins the race
        found = is_file(path)
        path.unlink()
        return found

    monkeypatch.setattr(type(torn), "is_file", removed_meanwhile)
    assert remove_torn_files(tmp_path) == [torn]


RESUME_ADVICE = "Free some space (or move train.output_dir) and resume with --resume."


@pytest.mark.parametrize(
    "writer",
    [
        lambda path, **hint: checkpoint.save_atomic({"w": torch.ones(1)}, path, **hint),
        lambda path, **hint: checkpoint.write_atomic(path, lambda handle: handle.write(b"x"), **hint),
        lambda path, **hint: checkpoint.write_text_atomic(path, "x", **hint),
    ],
    ids=["save_atomic", "write_atomic", "write_text_atomic"],
)
def test_every_writer_advises_a_resume_on_a_full_disk_unless_told_otherwise(tmp_path, monkeypatch, writer):
    path = tmp_path / "latest.json"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    for hint, advice in [({}, RESUME_ADVICE), ({"hint": "Try another disk."}, "Try another disk.")]:
        with pytest.raises(CrossDistillError) as err:
            writer(path, **hint)
        assert str(err.value) == f"no space left on the device while writing {path}; the file was not written. {advice}"
    monkeypatch.undo()
    writer(path)
    assert path.stat().st_size > 0 and os.listdir(tmp_path) == ["latest.json"]


def test_the_full_disk_error_of_a_run_advises_a_resume(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"x")
    assert str(checkpoint.no_space_error(path)) == (
        f"no space left on the device while writing {path}; the previous version of this file is intact. "
        + RESUME_ADVICE
    )
    assert str(checkpoint.no_space_error(path, "Elsewhere.")).endswith("is intact. Elsewhere.")


def test_a_damaged_safetensors_file_gives_the_librarys_reason_on_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    def damaged(path):
        raise RuntimeError("Error while deserializing header:\n   " + "x" * 300)

    monkeypatch.setattr(safetensors.torch, "load_file", damaged)
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(CrossDistillError) as err:
        load_weights_file(path)
    reason = ("Error while deserializing header: " + "x" * 300)[:200]
    assert str(err.value) == f"{path}: not a readable safetensors file ({reason})"


def test_without_torchs_safe_globals_context_the_namespace_is_allowed_for_good(monkeypatch):
    """torch 2.4 has add_safe_globals but no safe_globals context manager: the fallback allows timm's
    Namespace process-wide (and returns a no-op context)."""
    allowed = []
    monkeypatch.delattr(torch.serialization, "safe_globals")
    monkeypatch.setattr(torch.serialization, "add_safe_globals", allowed.append)
    with checkpoint._allowed_globals():
        pass
    assert allowed == [[argparse.Namespace]]


@pytest.mark.parametrize(
    "error,expected",
    [
        # torch before 2.5, or a failure its weights-only unpickler does not claim: the file is damaged
        (
            pickle.UnpicklingError("invalid load key, 'x'.\n  at byte 0"),
            "(corrupt or not a torch file): invalid load key, 'x'. at byte 0",
        ),
        (
            pickle.UnpicklingError("Weights only load failed.\n unsupported operand type(s) for +"),
            "(corrupt or not a torch file): Weights only load failed. unsupported operand type(s) for +",
        ),
        (
            RuntimeError("PytorchStreamReader failed\n  reading zip archive"),
            "(truncated or not a torch file?): RuntimeError: PytorchStreamReader failed reading zip archive",
        ),
    ],
    ids=["old-torch", "bytes", "other"],
)
def test_each_unreadable_file_is_named_with_torchs_reason_on_one_line(tmp_path, monkeypatch, error, expected):
    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "load", fails)
    path = tmp_path / "c.pt"
    path.write_bytes(b"x")
    with pytest.raises(CrossDistillError) as err:
        load_weights_file(path)
    assert str(err.value) == f"{path}: not a readable checkpoint {expected}"
