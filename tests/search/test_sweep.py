"""crossdistill sweep: every grid combination and seed a run directory, each trained once, skipped when finished."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import tiny_config_file
from crossdistill.cli import main
from crossdistill.config import load_config
from crossdistill.engine import StoppedByHook, train
from crossdistill.engine.preemption import EXIT_PREEMPTED, Preempted
from crossdistill.errors import CrossDistillError
from crossdistill.search import runs
from crossdistill.search.runs import split_values
from crossdistill.search.sweep import sweep


def _trained_sessions(run_dir) -> int:
    """How many sessions of the run trained to its end (each prints one ``done:`` line into train.log)."""
    return (run_dir / "train.log").read_text().count(" done: last top-1")


@pytest.mark.slow
def test_two_workers_train_every_combination_once_and_a_rerun_trains_nothing(tmp_path, capsys):
    config = tiny_config_file(tmp_path)
    grid = ["method_args.temperature=1,4"]
    finished = sweep(config, grid, seeds="0,1", workers=2)
    folder = tmp_path / "runs" / "run"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["temperature=1,seed=0", "temperature=1,seed=1", "temperature=4,seed=0", "temperature=4,seed=1"]
    assert sorted(finished) == [str(folder / name) for name in names]
    for name in names:
        saved = yaml.safe_load((folder / name / "config.yaml").read_text())
        assert saved["method_args"]["temperature"] == float(name[12]) and saved["train"]["seed"] == int(name[-1])
        assert saved["train"]["teacher_cache"] == str(tmp_path / "runs" / "teacher_cache")  # one cache for all
        assert _trained_sessions(folder / name) == 1  # no run trained twice
    out = capsys.readouterr().out
    assert "sweep run: 4 runs" in out and "| kd |" in out and "| 0, 1 |" in out  # the report table

    sweep(config, grid, seeds="0,1", workers=1)
    out = capsys.readouterr().out
    assert out.count(": already finished: last top-1") == 4 and ": trained:" not in out
    assert all(_trained_sessions(folder / name) == 1 for name in names)


@pytest.mark.slow
def test_an_interrupted_run_of_the_sweep_resumes_from_its_checkpoint(tmp_path, capsys):
    config = tiny_config_file(tmp_path, train={"epochs": 2})
    folder = tmp_path / "runs" / "run"
    cfg = load_config(
        config, [f"train.output_dir={folder}", "train.run_name=temperature=2", "method_args.temperature=2"]
    )
    with pytest.raises(StoppedByHook):
        train(cfg, out=io.StringIO(), on_epoch=lambda epoch, row: True)
    sweep(config, ["method_args.temperature=2"], teacher_cache=False)
    log = (folder / "temperature=2" / "train.log").read_text()
    assert "---- resumed at epoch 2" in log and _trained_sessions(folder / "temperature=2") == 1
    assert "temperature=2: trained: last top-1" in capsys.readouterr().out


def test_a_typo_in_a_grid_key_is_the_configs_unknown_key_error_before_any_run(tmp_path, capsys):
    config = tiny_config_file(tmp_path)
    assert main(["sweep", "--config", config, "--grid", "method_args.temprature=1,2"]) == 2
    err = capsys.readouterr().err
    assert "crossdistill: error: unknown config key 'method_args.temprature'. Did you mean: temperature?" in err
    assert main(["sweep", "--config", config, "--grid", "optim.lrr=0.1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_grid_arguments_are_checked(tmp_path):
    config = tiny_config_file(tmp_path)
    for grid, message in [
        (["method_args.temperature"], "give KEY=V1,V2"),
        (["method_args.temperature=1,,2"], "an empty value between commas"),
        (["method_args.temperature=1", "method_args.temperature=2"], "names method_args.temperature twice"),
        (["train.seed=1,2"], "give the seeds with --seeds"),
    ]:
        with pytest.raises(CrossDistillError, match=message):
            sweep(config, grid)
    with pytest.raises(CrossDistillError, match="--seeds 'a': give integers"):
        sweep(config, [], seeds="a")
    assert split_values("0.1, [1, 2],{a: 1, b: 2}") == ["0.1", "[1, 2]", "{a: 1, b: 2}"]


def test_no_shared_teacher_cache_for_a_method_without_a_teacher(tmp_path):
    config = tiny_config_file(tmp_path, method="vanilla")
    sweep(config, ["optim.lr=0.002"])
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "lr=0.002" / "config.yaml").read_text())
    assert saved["train"]["teacher_cache"] is None


def test_workers_take_the_visible_gpus_in_turn(monkeypatch):
    # one node, 2 GPUs, 3 workers: each worker's runs see one GPU (as cuda:0), not all of them on the first
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    gpus = runs.visible_gpus()
    assert gpus == ["2", "5"]
    assert [runs.worker_gpu(gpus, worker) for worker in range(3)] == ["2", "5", "2"]
    assert runs.worker_gpu([], 0) is None  # no GPU: nothing is set

    seen = []
    monkeypatch.setattr(runs, "_set_threads", lambda workers: None)
    runs._worker_main(lambda worker, workers: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]), (), 1, 3, "5")
    assert seen == ["5"]


def _preempted_worker(worker: int, workers: int) -> None:
    raise Preempted("stopped by SIGTERM after saving a checkpoint", checkpoint="last.pt")


def test_a_preempted_worker_exits_as_a_preempted_run_does(monkeypatch, capsys):
    """SIGTERM reaches every worker of a sweep under SLURM: each saves its run and exits 75 (not a traceback and
    exit 1), and the sweep itself ends as a preempted run, which a requeue script tells from a failure."""
    monkeypatch.setattr(runs, "_set_threads", lambda workers: None)
    with pytest.raises(SystemExit) as stop:
        runs._worker_main(_preempted_worker, (), 1, 2)
    assert stop.value.code == EXIT_PREEMPTED == 75
    assert "worker 1: stopped by SIGTERM" in capsys.readouterr().err

    with pytest.raises(Preempted, match="run the same command again to continue"):
        runs.start_workers(_preempted_worker, (), 2)
    # one worker runs in this process: the run's own advice (`crossdistill train --resume RUN`) was printed
    with pytest.raises(Preempted, match=r"^stop signal received: saved last.pt; run the same command again"):
        runs.start_workers(_preempted_worker, (), 1)


WAITS_FOR_A_STOP = """
import pathlib, time
from crossdistill.engine.preemption import Preempted, StopSignal

def wait_for_a_stop(folder, worker, workers):
    with StopSignal() as stop:
        pathlib.Path(folder, f"ready-{worker}").write_text("")
        deadline = time.monotonic() + 60
        while not stop.requested:
            if time.monotonic() > deadline:
                raise RuntimeError("no stop signal reached this worker")
            time.sleep(0.05)
    pathlib.Path(folder, f"stopped-{worker}").write_text("")
    raise Preempted("stopped by SIGTERM after saving a checkpoint", checkpoint="")
"""


def test_a_stop_signal_sent_to_the_main_process_alone_stops_every_worker(tmp_path):
    """``kill PID`` of a sweep (or a study) reaches its main process only: the workers must save and stop with it,
    not train on as orphans that a rerun then races."""
    (tmp_path / "stopper.py").write_text(WAITS_FOR_A_STOP)
    script = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "import stopper\n"
        "from crossdistill.engine.preemption import Preempted\n"
        "from crossdistill.search import runs\n"
        "try:\n"
        f"    runs.start_workers(stopper.wait_for_a_stop, ({str(tmp_path)!r},), 2)\n"
        "except Preempted as stop:\n"
        "    print(stop)\n"
        "    sys.exit(75)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{w}").exists() for w in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, output
    assert "run the same command again to continue" in output
    assert all((tmp_path / f"stopped-{w}").exists() for w in (0, 1))


@pytest.mark.parametrize(
    "omp, affinity, workers, threads",
    [
        (None, 8, 2, 4),
        (None, 3, 2, 1),
        ("6", 8, 2, 3),
        ("", 4, 1, 4),
        ("0", 4, 4, 1),
        ("64", 2, 1, 2),
        ("\u00b2", 4, 2, 2),
        ("4,2", 8, 1, 4),
    ],
    ids=["affinity", "fewer-than-workers", "omp", "omp-empty", "omp-zero", "omp-beyond-granted", "omp-odd", "nested"],
)
def test_workers_share_the_cores_granted_to_the_command_not_the_machine_s(monkeypatch, omp, affinity, workers, threads):
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    monkeypatch.setattr(runs.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(runs.os, "cpu_count", lambda: 64)  # a big node, of which a SLURM job was granted a few
    chosen = []
    monkeypatch.setattr(runs.torch, "set_num_threads", chosen.append)
    runs._set_threads(workers)
    assert chosen == [threads]
