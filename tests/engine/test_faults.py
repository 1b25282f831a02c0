"""Faults: kills, pre-emption signals, non-finite losses, a full disk. Nothing is lost, resume is exact."""

import csv
import errno
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import tiny_run
from crossdistill.checkpoint import load_weights_file, save_atomic
from crossdistill.cli import main
from crossdistill.config import build_config
from crossdistill.engine import Trainer
from crossdistill.engine.preemption import EXIT_PREEMPTED, Preempted, StopSignal
from crossdistill.errors import CrossDistillError

SECTIONS = dict(
    train={"epochs": 3, "checkpoint_every_steps": 3, "keep_step_checkpoints": 2, "ema_decay": 0.9},
    optim={"warmup_epochs": 1},
)


def final_weights(trainer):
    state = {f"distiller.{k}": v for k, v in trainer.distiller.state_dict().items()}
    state.update({f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    trainer = Trainer(build_config(tiny_run(tmp_path_factory.mktemp("ref"), **SECTIONS)))
    trainer.fit()
    return final_weights(trainer), [r["eval_top1"] for r in trainer.history]


def test_mid_epoch_stop_and_resume_is_exact(tmp_path, monkeypatch, reference):
    calls = {"n": 0}

    def stop_at_fifth_check(self, stop):
        calls["n"] += 1
        return calls["n"] == 5  # epoch 1, step 5 of 8: between two step checkpoints

    monkeypatch.setattr(Trainer, "_stop_requested", stop_at_fifth_check)
    with pytest.raises(Preempted, match="epoch 1, step 5/8") as stopped:
        Trainer(build_config(tiny_run(tmp_path, **SECTIONS))).fit()
    assert os.path.exists(stopped.value.checkpoint)
    monkeypatch.undo()
    resumed = Trainer(build_config(tiny_run(tmp_path, **SECTIONS)), resume=True)
    assert (resumed.start_epoch, resumed.start_step) == (0, 5)
    resumed.fit()
    assert_same(final_weights(resumed), reference[0])
    assert [r["eval_top1"] for r in resumed.history] == reference[1]
    steps = sorted(p.name for p in (tmp_path / "runs" / "run" / "checkpoints").glob("step-*.pt"))
    assert len(steps) == 2  # only the newest keep_step_checkpoints are kept


class Killed(BaseException):
    """A SIGKILL at that moment: nothing after it runs, not even the code that handles errors."""


def test_a_kill_between_last_pt_and_best_pt_is_repaired_on_resume(tmp_path, monkeypatch, reference):
    # last.pt (which records the epoch as the best) was written, best.pt and the epoch's metrics.csv row were not:
    # the resumed run took best.pt's older weights for the best epoch's (and so would export --weights best), and the
    # row was missing for good
    from crossdistill.engine import checkpointing

    tops = reference[1]
    last_improvement = max(e for e in range(1, len(tops) + 1) if tops[e - 1] > max([-1.0, *tops[: e - 1]]))
    original = checkpointing.save_atomic

    def killed_before_best(state, path, **kwargs):
        if path.name == "best.pt" and state["epoch"] == last_improvement:
            raise Killed
        return original(state, path, **kwargs)

    monkeypatch.setattr(checkpointing, "save_atomic", killed_before_best)
    with pytest.raises(Killed):
        Trainer(build_config(tiny_run(tmp_path, **SECTIONS))).fit()
    monkeypatch.undo()
    resumed = Trainer(build_config(tiny_run(tmp_path, **SECTIONS)), resume=True)
    summary = resumed.fit()
    run_dir = tmp_path / "runs" / "run"
    assert summary.best_epoch == last_improvement
    assert load_weights_file(run_dir / "best.pt")["epoch"] == last_improvement
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(tops) + 1))
    assert [float(r["eval_top1"]) for r in rows] == pytest.approx(tops)


ACCUM_SECTIONS = dict(
    train={"epochs": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 3, "ema_decay": 0.9},
    optim={"warmup_epochs": 1},
    data={"train_subset": 224, "eval_subset": 20},  # 7 batches of 32: optimiser steps of 2, 2, 2 and 1 batches
)


def test_mid_epoch_stop_and_resume_with_gradient_accumulation_is_exact(tmp_path, monkeypatch):
    """The step checkpoint is written at an optimiser-step boundary and the resume skips the batches of the
    steps done (2 x 2 here); resuming it with another grad_accum_steps is refused."""
    reference = Trainer(build_config(tiny_run(tmp_path / "ref", **ACCUM_SECTIONS)), out=io.StringIO())
    reference.fit()
    calls = {"n": 0}

    def stop_at_sixth_check(self, stop):
        calls["n"] += 1
        return calls["n"] == 6  # epoch 1: after steps 1-3 and at its end; epoch 2: after steps 1 and 2

    monkeypatch.setattr(Trainer, "_stop_requested", stop_at_sixth_check)
    with pytest.raises(Preempted, match="epoch 2, step 2/4"):
        Trainer(build_config(tiny_run(tmp_path, **ACCUM_SECTIONS)), out=io.StringIO()).fit()
    monkeypatch.undo()
    other = tiny_run(tmp_path, **ACCUM_SECTIONS)
    other["train"]["grad_accum_steps"] = 1
    with pytest.raises(
        CrossDistillError,
        match=r"step-000000006.pt was written in the middle of an epoch with train.grad_accum_steps=2, and this "
        r"run has 1: .* Resume with train.grad_accum_steps=2, or delete",
    ):
        Trainer(build_config(other), resume=True, out=io.StringIO())
    resumed = Trainer(build_config(tiny_run(tmp_path, **ACCUM_SECTIONS)), resume=True, out=io.StringIO())
    assert (resumed.start_epoch, resumed.start_step) == (1, 2)
    resumed.fit()
    assert_same(final_weights(resumed), final_weights(reference))
    assert [r["eval_top1"] for r in resumed.history] == [r["eval_top1"] for r in reference.history]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in reference.history]


CRD_RUN = dict(
    method="crd",
    method_args={"num_negatives": 64, "feat_dim": 16},
    train={"epochs": 2, "checkpoint_every_steps": 3, "keep_step_checkpoints": 2, "ema_decay": 0.9},
    optim={"warmup_epochs": 1},
)


def test_mid_epoch_stop_and_resume_of_a_crd_run_is_exact(tmp_path, monkeypatch):
    """CRD's memory banks and Z constants are buffers of the distiller: the step checkpoint holds them, and the
    resumed run draws the same negatives (from seed, epoch and index), so it ends bitwise equal, banks included."""
    reference = Trainer(build_config(tiny_run(tmp_path / "ref", **CRD_RUN)), out=io.StringIO())
    reference.fit()
    calls = {"n": 0}

    def stop_at_fifth_check(self, stop):
        calls["n"] += 1
        return calls["n"] == 5  # epoch 1, step 5 of 8: between two step checkpoints

    monkeypatch.setattr(Trainer, "_stop_requested", stop_at_fifth_check)
    with pytest.raises(Preempted, match="epoch 1, step 5/8"):
        Trainer(build_config(tiny_run(tmp_path, **CRD_RUN)), out=io.StringIO()).fit()
    monkeypatch.undo()
    resumed = Trainer(build_config(tiny_run(tmp_path, **CRD_RUN)), resume=True, out=io.StringIO())
    assert (resumed.start_epoch, resumed.start_step) == (0, 5)
    resumed.fit()
    weights = final_weights(resumed)
    assert {"distiller.memory.student", "distiller.memory.teacher", "distiller.memory.z"} <= set(weights)
    assert weights["distiller.memory.z"].min() > 0  # fixed on the first batch, kept through the resume
    assert_same(weights, final_weights(reference))
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in reference.history]


def test_stop_signal_records_sigterm_and_sigusr1():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        with StopSignal() as stop:
            assert not stop.requested
            signal.raise_signal(sig)
            assert stop.received == sig
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def _start(tmp_path, extra=(), data=None, own_group=False):
    cfg = tiny_run(tmp_path, **SECTIONS, **({"data": data} if data else {}))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # the same thread count as the in-process runs (conftest), so float reductions run in the same order
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "crossdistill", "train", "--config", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=own_group,
    )


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"condition not reached; rc={proc.poll()}, stderr={proc.stderr.read()[-2000:]}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("whole_group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_checkpoints_exits_75_and_resume_matches(tmp_path, reference, whole_group):
    # whole_group: SLURM and `kill -TERM -PGID` signal every process of the job; the loader workers died first and
    # the main process failed ("DataLoader worker ... is killed by signal: Terminated") without saving
    proc = _start(tmp_path, data={"num_workers": 2} if whole_group else None, own_group=whole_group)
    run_dir = tmp_path / "runs" / "run"
    _wait_for(lambda: any((run_dir / "checkpoints").glob("step-*.pt")), proc)
    os.killpg(proc.pid, signal.SIGTERM) if whole_group else proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stop signal received" in err and "--resume" in err
    resumed = Trainer(build_config(tiny_run(tmp_path, **SECTIONS)), resume=True)
    resumed.fit()
    assert_same(final_weights(resumed), reference[0])


LOADER_OF_TWO_WORKERS = """
import multiprocessing, os, signal, subprocess, sys
from torch.utils.data import Dataset
from crossdistill.engine.loaders import build_eval_loader

class Pids(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, index):
        return os.getpid()

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    batches = iter(build_eval_loader(Pids(), batch_size=4, num_workers=2))
    pids = {int(p) for _ in range(4) for p in next(batches)}
"""
OPEN_LOADER_AT_EXIT = (
    LOADER_OF_TWO_WORKERS
    + """
    assert len(pids) == 2, pids
    subprocess.run(["kill", "-TERM", *map(str, pids)], check=True)  # not from the main process: dropped
    for _ in range(8):
        next(batches)  # the workers are alive
    KEPT_OPEN = batches  # as a traceback in a reference cycle keeps a loader open until the interpreter exits
    print("exiting", flush=True)
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_loader_workers_drop_a_foreign_sigterm_and_still_end_with_the_interpreter(tmp_path, start_method):
    # workers that ignored every SIGTERM hung the exit of a process with a loader still open: multiprocessing
    # ends them with SIGTERM and waits (CI's pytest printed its summary, then hung until killed 70 min later)
    script = tmp_path / "open_loader.py"
    script.write_text(OPEN_LOADER_AT_EXIT)
    try:
        done = subprocess.run([sys.executable, str(script), start_method], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as hung:
        raise AssertionError(f"the interpreter did not exit: {hung.stdout!r}") from None
    assert done.returncode == 0 and "exiting" in done.stdout and "Error" not in done.stderr, done.stderr[-2000:]


KILLED_WITH_LOADER_OPEN = (
    LOADER_OF_TWO_WORKERS
    + """
    print(*sorted(pids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
)


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie an init that does not reap leaves behind has ended)."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "forkserver", "spawn"])
def test_loader_workers_end_when_the_main_process_is_killed(tmp_path, start_method):
    """A forkserver's workers (Python 3.14's default start method) are the forkserver's children: torch's watch of
    a worker's parent saw the forkserver, alive, and the workers of a main process killed with SIGKILL ran on."""
    script = tmp_path / "killed_with_loader_open.py"
    script.write_text(KILLED_WITH_LOADER_OPEN)
    done = subprocess.run([sys.executable, str(script), start_method], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 2
    deadline = time.monotonic() + 60  # torch's own watch looks every 5 s
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.35, 0.8])
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint_and_exact_resume(tmp_path, reference, delay):
    proc = _start(tmp_path)
    run_dir = tmp_path / "runs" / "run"
    _wait_for(lambda: (run_dir / "latest.json").exists(), proc)  # a first complete checkpoint
    time.sleep(delay)  # then kill at some moment: while writing, between writes, after several checkpoints
    proc.kill()
    proc.wait()
    trainer = Trainer(build_config(tiny_run(tmp_path, **SECTIONS)), resume=True)
    load_weights_file(trainer.resumed_from)  # the newest complete checkpoint loads
    trainer.fit()
    assert_same(final_weights(trainer), reference[0])


def test_nonfinite_steps_are_skipped_counted_then_stop(tmp_path, rsd_nan_at_calls_3_and_4):
    calls = rsd_nan_at_calls_3_and_4
    trainer = Trainer(build_config(tiny_run(tmp_path, train={"epochs": 1})))
    before = {k: v.clone() for k, v in trainer.distiller.state_dict().items()}
    summary = trainer.fit()
    assert summary.history[0]["skipped_steps"] == 2
    assert all(torch.isfinite(v.float()).all() for v in trainer.distiller.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.distiller.state_dict().items())

    calls["n"] = 0
    raw = tiny_run(tmp_path, train={"epochs": 2, "run_name": "strict", "max_nonfinite_steps": 1})
    with pytest.raises(CrossDistillError, match=r"2 non-finite steps .*epoch 1, step 4.*'rsd': nan"):
        Trainer(build_config(raw)).fit()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"w": torch.ones(3)}, path)

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CrossDistillError, match="no space left.*previous version of this file is intact"):
        save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_weights_file(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_checkpoints_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        save_atomic({"w": torch.ones(1)}, tmp_path / "c.pt")
    finally:
        os.umask(mask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644


BIG = dict(
    train={"epochs": 2, "checkpoint_every_steps": 2, "keep_step_checkpoints": 1, "batch_size": 64},
    optim={"warmup_epochs": 0},
)


def _big_run(tmp_path):
    raw = tiny_run(tmp_path, **BIG)
    raw["student"] = {"name": "resnet18"}  # 11M parameters: each checkpoint write takes a while
    return raw


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write(tmp_path):
    reference = Trainer(build_config(_big_run(tmp_path / "ref")))
    reference.fit()
    expected = {k: v.detach().clone() for k, v in reference.distiller.state_dict().items()}

    work = tmp_path / "killed"
    work.mkdir()
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(_big_run(work)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossdistill", "train", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    run_dir = work / "runs" / "run"
    writes_seen = 0
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        temps = list(run_dir.glob(".*.pt.*.tmp")) + list((run_dir / "checkpoints").glob(".*.pt.*.tmp"))
        if temps:
            writes_seen += 1
            if writes_seen == 2:  # the second checkpoint write: a good one exists already
                proc.kill()
                break
            while any(p.exists() for p in temps) and proc.poll() is None:
                time.sleep(0.001)
        time.sleep(0.001)
    proc.wait()
    if writes_seen < 2:
        pytest.skip("never caught the process while it was writing a checkpoint")
    assert proc.returncode == -signal.SIGKILL
    torn = list(run_dir.glob("**/.*.pt.*.tmp"))
    assert torn, "the kill should have left the half-written temporary file behind"
    resumed = Trainer(build_config(_big_run(work)), resume=True)
    assert resumed.resumed_from.suffix == ".pt" and not resumed.resumed_from.name.startswith(".")
    resumed.fit()
    for key, value in resumed.distiller.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_resume_removes_the_torn_temporary_files_of_a_killed_checkpoint_write(tmp_path):
    import io

    raw = tiny_run(
        tmp_path, method="vanilla", train={"epochs": 1, "checkpoint_every_steps": 3}, data={"train_subset": 128}
    )
    Trainer(build_config(raw), out=io.StringIO()).fit()
    run_dir = tmp_path / "runs" / "run"
    torn = [run_dir / ".last.pt.k3j2_x.tmp", run_dir / "checkpoints" / ".step-00000003.pt.q9z1.tmp"]
    for path in torn:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a checkpoint")
    keep = run_dir / "notes.tmp"  # not ours: left alone
    keep.write_text("user file")
    out = io.StringIO()
    raw["train"]["epochs"] = 2
    Trainer(build_config(raw), resume=True, out=out)
    assert not any(path.exists() for path in torn)
    assert keep.exists() and (run_dir / "last.pt").exists()
    assert "removed 2 unfinished checkpoint write(s)" in out.getvalue()


def test_mid_epoch_resume_with_another_process_count_is_a_clear_error(tmp_path):
    import io

    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1}, data={"train_subset": 128})
    Trainer(build_config(raw), out=io.StringIO()).fit()
    path = tmp_path / "runs" / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    state.update(step=2, world_size=2)  # as a mid-epoch checkpoint of a 2-process run
    save_atomic(state, path)
    raw["train"]["epochs"] = 2
    with pytest.raises(
        CrossDistillError,
        match=r"middle of an epoch by 2 process\(es\), and this run has 1.*"
        r"Resume with 2 process\(es\), or delete",
    ):
        Trainer(build_config(raw), resume=True, out=io.StringIO())


@pytest.mark.parametrize(
    "change, changed",
    [
        ("optim.opt=sgd", "optim.opt: 'adamw' -> 'sgd'"),  # a KeyError at the first step, before
        ("student.name=resnet10t", "student.name: 'test_resnet' -> 'resnet10t'"),  # torch's size-mismatch traceback
        ("optim.weight_decay=0.3", "optim.weight_decay: 0.01 -> 0.3"),  # silently the checkpoint's 0.01
        ("train.label_smoothing=0.2", "train.label_smoothing: 0.1 -> 0.2"),  # trained, but config.yaml said 0.1
    ],
)
def test_resuming_with_another_experiment_is_a_one_line_error_naming_the_change(tmp_path, capsys, change, changed):
    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1}, data={"train_subset": 64, "eval_subset": 32})
    assert _train_cli(tmp_path, raw) == 0
    run_dir = tmp_path / "runs" / "run"
    config_before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), change, "train.epochs=2"]) == 2
    assert capsys.readouterr().err == (
        f"crossdistill: error: the run in {run_dir} started with another config: {changed}. A resumed run "
        "continues the experiment its config.yaml records (the checkpoint's optimiser state would even override "
        "optim.* values): resume it without these changes, or train them as a new run (another train.run_name)\n"
    )
    assert (run_dir / "config.yaml").read_bytes() == config_before
    # where and how it runs may change, its length, and its gradient clipping (what a diverged run is told to set);
    # the optimiser's name in another case is the same optimiser (timm lowercases it)
    allowed = ["data.num_workers=1", "train.eval_every=2", "optim.clip_grad=1.0", "train.epochs=2", "optim.opt=AdamW"]
    assert main(["train", "--resume", str(run_dir), *allowed]) == 0


def test_a_checkpoint_the_unchanged_config_cannot_load_says_so_in_one_line(tmp_path, capsys):
    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1}, data={"train_subset": 64, "eval_subset": 32})
    assert _train_cli(tmp_path, raw) == 0
    path = tmp_path / "runs" / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["student"]["fc.bias"] = torch.zeros(11)  # as another timm version might build the model
    save_atomic(state, path)
    capsys.readouterr()
    assert main(["train", "--resume", str(path.parent), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"crossdistill: error: {path} does not fit this run's model or optimiser (Error(s) in")
    assert "although their config is the one it was written with: was it written by another version" in err
    assert err.count("\n") == 1


QUICK = dict(method="vanilla", data={"train_subset": 64, "eval_subset": 32})


def test_a_second_run_into_the_same_directory_stops_at_once(tmp_path, capsys):
    import csv

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(tmp_path, train={"epochs": 500}, **QUICK)))
    first = subprocess.Popen(
        [sys.executable, "-m", "crossdistill", "train", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "runs" / "run"
    try:
        _wait_for(lambda: (run_dir / "latest.json").exists(), first)
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", "--config", str(path), *flags]) == 2
            err = capsys.readouterr().err
            assert f"run directory {run_dir} is in use by another crossdistill process (pid {first.pid} " in err
            assert err.count("\n") == 1
        assert first.poll() is None  # the first run goes on, its checkpoints untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == EXIT_PREEMPTED
    with (run_dir / "metrics.csv").open() as handle:
        epochs = [int(row["epoch"]) for row in csv.DictReader(handle)]
    assert epochs == list(range(1, len(epochs) + 1))
    assert not (run_dir / ".crossdistill.lock").exists()  # released: no stray lock file


@pytest.mark.parametrize("interrupted_in_epoch", [1, 2])
def test_ctrl_c_says_how_to_continue_or_that_nothing_was_kept(tmp_path, capsys, monkeypatch, interrupted_in_epoch):
    RESUME = "crossdistill train --resume"
    run_epoch = Trainer._run_epoch

    def interrupted(self, epoch, *args):
        if epoch + 1 == interrupted_in_epoch:
            raise KeyboardInterrupt
        return run_epoch(self, epoch, *args)

    monkeypatch.setattr(Trainer, "_run_epoch", interrupted)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(tmp_path, train={"epochs": 2, "run_name": "my run"}, **QUICK)))
    assert main(["train", "--config", str(path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "my run"
    if interrupted_in_epoch == 1:
        assert err.endswith("so nothing was kept: the same command starts it again") and not run_dir.exists()
    else:
        assert err == f"crossdistill: interrupted; continue from the last checkpoint with: {RESUME} '{run_dir}'"
        monkeypatch.setattr(Trainer, "_run_epoch", run_epoch)
        assert main(["train", "--resume", str(run_dir)]) == 0


KILL_AT = """import os, signal, sys
from crossdistill.engine import Trainer
setattr(Trainer, sys.argv.pop(1), lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
from crossdistill.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("killed_in", ["_build_loaders", "fit"])  # during set-up, before the first checkpoint
@pytest.mark.parametrize("again", [[], ["--resume"]])
def test_a_run_killed_before_its_first_checkpoint_is_started_again_by_the_same_command(
    tmp_path, capsys, killed_in, again
):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(tmp_path, train={"epochs": 1}, **QUICK)))
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, killed_in, "train", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = tmp_path / "runs" / "run"
    assert run_dir.is_dir() and not (run_dir / "last.pt").exists()
    assert main(["train", "--config", str(path), *again]) == 0
    out = capsys.readouterr().out
    assert "holds no checkpoint (an earlier attempt stopped before its first one): starting the run from the" in out
    assert (run_dir / "summary.json").exists() and not (run_dir / ".crossdistill.lock").exists()


def test_a_failure_before_the_first_checkpoint_leaves_no_run_directory(tmp_path, monkeypatch):
    import io

    def broken(self, *args):
        raise RuntimeError("a bug in the first epoch")

    monkeypatch.setattr(Trainer, "train_one_epoch", broken)
    raw = tiny_run(tmp_path, train={"epochs": 1}, **QUICK)
    with pytest.raises(RuntimeError, match="a bug in the first epoch"):
        Trainer(build_config(raw), out=io.StringIO()).fit()
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    Trainer(build_config(raw), out=io.StringIO()).fit()  # the same run again just works


def test_the_wall_time_of_a_resumed_run_counts_every_session(tmp_path):
    import io
    import json

    raw = tiny_run(tmp_path, train={"epochs": 2}, **QUICK)
    Trainer(build_config(raw), out=io.StringIO()).fit(stop_after=1)
    path = tmp_path / "runs" / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert 0 < state["wall_time_s"] < 1000
    state["wall_time_s"] = 1000.0  # as if the first session had trained for 1000 s
    save_atomic(state, path)
    summary = Trainer(build_config(raw), resume=True, out=io.StringIO()).fit()
    assert summary.wall_time_s > 1000.0
    assert json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())["wall_time_s"] == summary.wall_time_s


def _train_cli(tmp_path, raw) -> int:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return main(["train", "--config", str(path)])


def test_a_run_whose_weights_turn_non_finite_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """As optim.lr=1e6 does: finite losses, but a BatchNorm running_var overflows to inf in epoch 2."""
    from crossdistill.engine.step import TrainStep

    run_dir = tmp_path / "runs" / "run"
    original, calls, good = TrainStep.step, {"n": 0}, {}

    def diverging(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the first step of epoch 2 (2 steps per epoch)
            good["last.pt"] = (run_dir / "last.pt").read_bytes()
            self.model.student.bn1.running_var.fill_(float("inf"))
        return result

    monkeypatch.setattr(TrainStep, "step", diverging)
    raw = tiny_run(tmp_path, method="rsd", train={"epochs": 3}, data={"train_subset": 64, "eval_subset": 20})
    assert _train_cli(tmp_path, raw) == 2
    out, err = capsys.readouterr()
    assert "done:" not in out and err.count("\n") == 1
    assert err.startswith("crossdistill: error: stopping: non-finite weights after epoch 2 (inf/NaN in ")
    assert (
        "student.bn1.running_var" in err
        and f"last.pt was not written and the last good checkpoint is kept in {run_dir}" in err
        and "optim.clip_grad" in err
    )
    assert (run_dir / "last.pt").read_bytes() == good["last.pt"]
    assert not (run_dir / "summary.json").exists()
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2  # the header and epoch 1
    assert f"--resume {run_dir} optim.clip_grad=1.0" in err


def test_non_finite_weights_before_the_first_checkpoint_advise_the_same_command(tmp_path, monkeypatch, capsys):
    """The run directory is gone then (nothing to resume): the advice must be a command that works."""
    from crossdistill.engine.step import TrainStep

    original = TrainStep.step

    def diverging(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        self.model.student.bn1.running_var.fill_(float("inf"))
        return result

    monkeypatch.setattr(TrainStep, "step", diverging)
    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1}, data={"train_subset": 64, "eval_subset": 20})
    assert _train_cli(tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert "the run has no checkpoint yet" in err and "(e.g. the same command with optim.clip_grad=1.0)" in err
    assert "--resume" not in err and not (tmp_path / "runs" / "run").exists()


class DiskFillsUp:
    """A file on a disk with ``room`` bytes left: writes past it raise OSError(ENOSPC), as the OS does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_under_torchs_writer_is_one_line_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    """torch's writer turns ENOSPC into `RuntimeError: [enforce fail at inline_container.cc] unexpected pos`."""
    from crossdistill import files

    path = tmp_path / "last.pt"
    save_atomic({"w": torch.arange(1000.0)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(files, "_open_temporary", lambda fd, tmp: DiskFillsUp(os.fdopen(fd, "wb"), room=2000))
    with pytest.raises(CrossDistillError) as raised:
        save_atomic({"w": torch.zeros(100_000)}, path)
    assert isinstance(raised.value.__context__, RuntimeError) and "unexpected pos" in str(raised.value.__context__)
    assert str(raised.value) == (
        f"no space left on the device while writing {path}; the previous version of this file "
        "is intact. Free some space (or move train.output_dir) and resume with --resume."
    )
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_real_enospc_from_the_kernel_is_the_same_line(tmp_path, monkeypatch):
    from crossdistill import files

    def dev_full(fd, tmp):
        os.close(fd)
        return open("/dev/full", "wb")

    monkeypatch.setattr(files, "_open_temporary", dev_full)
    with pytest.raises(CrossDistillError, match=r"no space left on the device while writing .*c\.pt; the file was not"):
        save_atomic({"w": torch.zeros(100_000)}, tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "name, nth",
    [("last.pt", 2), ("latest.json", 2), ("metrics.csv", 2), ("best.pt", 1), ("summary.json", 1), ("config.yaml", 1)],
)
def test_a_full_disk_during_a_run_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys, name, nth):
    from crossdistill import files

    run_dir, real_open, writes, before = tmp_path / "runs" / "run", files._open_temporary, {"n": 0}, {}

    def open_temporary(fd, tmp):
        handle = real_open(fd, tmp)
        if os.path.basename(tmp).startswith(f".{name}."):
            writes["n"] += 1
            if writes["n"] == nth:  # the disk fills up at the nth write of this file
                target = run_dir / name
                before["bytes"] = target.read_bytes() if target.exists() else None
                return DiskFillsUp(handle, room=16)
        return handle

    monkeypatch.setattr(files, "_open_temporary", open_temporary)
    raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 2}, data={"train_subset": 64, "eval_subset": 20})
    assert _train_cli(tmp_path, raw) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"crossdistill: error: no space left on the device while writing {run_dir / name}; "
    )
    if before["bytes"] is None:
        assert "; the file was not written. Free some space" in err and not (run_dir / name).exists()
    else:
        assert "; the previous version of this file is intact. Free some space" in err
        assert (run_dir / name).read_bytes() == before["bytes"]
    assert ("resume with --resume" in err) == (name != "config.yaml")
    assert not list(run_dir.glob(".*.tmp"))


def test_a_full_disk_under_tensorboard_is_one_line(tmp_path):
    from crossdistill.engine.metrics import MetricsLog

    class FullTensorBoard:
        def add_scalar(self, *args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what its writer thread raised, re-raised

        close = add_scalar

    log = MetricsLog(tmp_path, tensorboard=False)
    log.writer = FullTensorBoard()
    with pytest.raises(
        CrossDistillError,
        match=r"^no space left on the device while writing TensorBoard events to "
        r".*; the checkpoints and metrics.csv are intact\. .*--resume\.$",
    ):
        log.write({"epoch": 1, "train_loss": 0.5})
    log.close()  # the fit loop closes the log on the way out: no second error
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["epoch,train_loss", "1,0.5"]


def test_a_full_disk_under_the_teacher_cache_is_one_line_not_a_sigbus(tmp_path, monkeypatch):
    """Writing rows through a memory map into a sparse file on a full disk kills the process (SIGBUS): the
    cache reserves its blocks when it creates a file, so a full disk shows there, as one line."""
    from crossdistill.engine.teacher_cache import TeacherCache

    reserved = []

    def full(fd, offset, length):
        reserved.append(length)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    cache = TeacherCache(
        tmp_path,
        {"teacher": {"name": "t"}},
        ("embedding",),
        {"embedding": 4},
        10,
        store_dtype="fp32",
        log=lambda m: None,
    )
    with pytest.raises(
        CrossDistillError,
        match=r"no space left on the device for the teacher cache file "
        r".*embedding\.npy \(0\.0 MiB\); free some space, point "
        r"train.teacher_cache at another disk, or set train.teacher_cache=null",
    ):
        cache.begin_epoch(0)
    assert reserved and not list((cache.dir / "epoch-0000").iterdir())


def test_a_full_disk_while_exporting_is_one_line_and_the_previous_export_survives(tmp_path, monkeypatch):
    from crossdistill import files
    from crossdistill.export import write_safetensors

    path = tmp_path / "model.safetensors"
    write_safetensors({"w": torch.ones(10)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(files, "_open_temporary", lambda fd, tmp: DiskFillsUp(os.fdopen(fd, "wb"), room=16))
    with pytest.raises(
        CrossDistillError,
        match=r"^no space left on the device while writing .*model\.safetensors; "
        r"the previous version of this file is intact\. Free some space "
        r"\(or pass --out on another disk\) and run the export again\.$",
    ):
        write_safetensors({"w": torch.zeros(1000)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_full_disk_while_exporting_onnx_is_one_line_and_the_previous_file_survives(tmp_path, monkeypatch):
    from crossdistill.export import export_onnx

    def fills_the_disk(model, args, f, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half an onnx file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "model.onnx"
    path.write_bytes(b"the previous export")
    monkeypatch.setattr(torch.onnx, "export", fills_the_disk)
    with pytest.raises(
        CrossDistillError,
        match=r"^no space left on the device while writing .*model\.onnx; "
        r"the previous version of this file is intact\. Free some space "
        r"\(or pass --out on another disk\) and run the export again\.$",
    ):
        export_onnx(torch.nn.Linear(4, 2), torch.zeros(2, 4), path, "auto")
    assert path.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_pruning_step_checkpoints_keeps_a_users_file_of_a_similar_name(tmp_path):
    """Only step-NNNNNNNNN.pt files are the run's: a user's step-0-notes.pt (which sorts first) is never pruned
    or read."""
    raw = tiny_run(
        tmp_path,
        method="vanilla",
        train={"epochs": 1, "checkpoint_every_steps": 1, "keep_step_checkpoints": 1},
        data={"train_subset": 96, "eval_subset": 20},
    )
    folder = tmp_path / "runs" / "run" / "checkpoints"
    trainer = Trainer(build_config(raw), out=io.StringIO())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "step-0-notes.pt").write_text("mine")
    trainer.fit()
    assert (folder / "step-0-notes.pt").read_text() == "mine"
    assert len([p for p in folder.iterdir() if p.name != "step-0-notes.pt"]) == 1
