"""``train --dry-run``: the checks a run makes before its first step, made by the run's own code, writing nothing."""

import fcntl
import io
import os

import pytest
import timm
import torch

from conftest import TINY_TEACHER, tiny_run
from crossdistill.config import build_config
from crossdistill.engine.claim import preview_run_dir
from crossdistill.engine.dryrun import dry_run
from crossdistill.engine.rundir import CHECKPOINT, CHECKPOINT_FORMAT, LOCK
from crossdistill.errors import CrossDistillError


def tree(folder):
    """Every path under ``folder`` with its bytes and modification time: what a dry run must leave as it is."""
    return {
        path: (path.read_bytes() if path.is_file() else None, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
    }


def teacher_file(tmp_path, kind):
    path = tmp_path / f"teacher-{kind}.pth"
    if kind == "seven classes":
        model = timm.create_model(TINY_TEACHER["name"], num_classes=7, **TINY_TEACHER["kwargs"])
        torch.save(model.state_dict(), path)
    elif kind == "not a torch file":
        path.write_bytes(b"not a checkpoint")
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("seven classes", "reads the teacher's logits, but the teacher's classifier (teacher.checkpoint"),
        ("missing", "checkpoint file not found: "),
        ("not a torch file", "not a readable checkpoint"),
    ],
)
def test_dry_run_loads_the_teacher_weights_as_the_run_does(tmp_path, kind, message):
    """It used to build the teacher with random weights and pass, whatever teacher.checkpoint held."""
    raw = tiny_run(tmp_path, method="kd", method_args={})  # kd reads the logits: a head of other classes is refused
    raw["teacher"]["checkpoint"] = str(teacher_file(tmp_path, kind))
    out = io.StringIO()
    with pytest.raises(CrossDistillError) as raised:
        dry_run(build_config(raw), out=out)
    assert message in str(raised.value) and f"teacher-{kind}.pth" in str(raised.value)
    text = out.getvalue()
    assert f"problem: {raised.value}" in text
    assert "not loaded (see the problem above)" in text
    assert "one step on random data" in text  # the rest is still checked, with a random teacher


def test_dry_run_prints_the_run_directory_the_scaled_lr_and_changes_nothing(tmp_path):
    """It used to print neither the run directory nor the lr after optim.scale_lr=linear."""
    raw = tiny_run(tmp_path, train={"reference_batch": 256}, optim={"scale_lr": "linear", "warmup_epochs": 1})
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT}, run_dir / CHECKPOINT)
    before = tree(tmp_path)
    out = io.StringIO()
    with pytest.raises(CrossDistillError, match=f"^run directory {run_dir} already holds a run; pass --resume"):
        dry_run(build_config(raw), out=out)
    assert f"problem: run directory {run_dir} already holds a run" in out.getvalue()
    out = io.StringIO()
    summary = dry_run(build_config(raw), overwrite=True, out=out)
    text = out.getvalue()
    assert f"run directory: {run_dir} (holds a run: --overwrite replaces what it wrote" in text
    assert "per-process batch 32 x 1 process(es) = effective batch 32 (recipe reference 256)" in text
    assert "lr 0.00025 = 0.002 x 32/256 (adamw, cosine: 1 warm-up epoch(s) from 1.25e-05, down to 1.25e-06)" in text
    assert "| 8 steps/epoch x 2 epochs" in text and "data: digits, 256 train / 100 eval images, 10 classes" in text
    assert summary["lr"] == pytest.approx(2e-3 * 32 / 256) and summary["run_dir"] == str(run_dir)
    assert tree(tmp_path) == before


def test_the_run_directory_is_judged_as_a_run_judges_it_without_a_lock(tmp_path):
    cfg = build_config(tiny_run(tmp_path))
    run_dir = tmp_path / "runs" / "run"
    assert preview_run_dir(cfg, resume=False, overwrite=False) == "new: the run creates it"
    with pytest.raises(CrossDistillError, match=f"^nothing to resume: no checkpoint in {run_dir}$"):
        preview_run_dir(cfg, resume=True, overwrite=False)
    run_dir.mkdir(parents=True)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(CrossDistillError, match="is not a crossdistill run directory .it holds notes.txt."):
        preview_run_dir(cfg, resume=False, overwrite=True)
    (run_dir / "notes.txt").unlink()
    torch.save({"format": CHECKPOINT_FORMAT}, run_dir / CHECKPOINT)
    assert preview_run_dir(cfg, resume=True, overwrite=False).startswith("holds a run: --resume continues it")
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"4242 node1\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the directory
        with pytest.raises(CrossDistillError, match=r"is in use by another crossdistill process \(pid 4242 on node1\)"):
            preview_run_dir(cfg, resume=True, overwrite=False)
    finally:
        os.close(fd)
    assert preview_run_dir(cfg, resume=True, overwrite=False).startswith("holds a run")  # a dead run's lock file
    (tmp_path / "runs" / "file").write_text("")
    blocked = build_config(tiny_run(tmp_path, train={"output_dir": str(tmp_path / "runs" / "file")}))
    with pytest.raises(CrossDistillError, match="is a file, not a directory"):
        preview_run_dir(blocked, resume=False, overwrite=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK, CHECKPOINT]


def test_dry_run_says_a_run_with_val_fraction_is_evaluated_on_the_val_split(tmp_path):
    out = io.StringIO()
    dry_run(build_config(tiny_run(tmp_path, data={"val_fraction": 0.1, "eval_subset": None})), out=out)
    assert (
        "data: digits, 256 train / 142 eval images, 10 classes; evaluated on the val split (0.1 of train, "
        "val_seed 0), not test"
    ) in out.getvalue()


def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path):
    # timm's schedule is set once per epoch: a 2-epoch run with the own-data recipe's 5 warm-up epochs trained at
    # lr <= 2e-4 throughout, and nothing said so
    raw = tiny_run(tmp_path, optim={"warmup_epochs": 5, "warmup_lr": 1e-6})
    out = io.StringIO()
    dry_run(build_config(raw), out=out)
    assert (
        "warning: optim.warmup_epochs=5 covers all 2 epoch(s): the lr (set once per epoch) rises from 1e-06 and "
        "never reaches 0.002; lower optim.warmup_epochs or train longer." in out.getvalue()
    )
    raw["train"]["epochs"] = 6
    out = io.StringIO()
    dry_run(build_config(raw), out=out)
    assert "covers all" not in out.getvalue()
