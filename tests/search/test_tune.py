"""crossdistill tune: an Optuna study whose trials are runs; outputs, resume, pruning, the space file's checks."""

from __future__ import annotations

import csv
import os
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import tiny_config_file
from crossdistill.cli import main
from crossdistill.config import load_config
from crossdistill.errors import CrossDistillError
from crossdistill.search import tune as tune_module
from crossdistill.search.space import read_space
from crossdistill.search.tune import Study, check_outputs_are_ours, objective, open_storage, tune

optuna = pytest.importorskip("optuna", reason="crossdistill tune needs optuna (pip install 'crossdistill[search]')")


def _space(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


SPACE = "method_args.temperature: {type: float, low: 1.0, high: 8.0, log: true}\n"


def _states(storage: str, study: str = "run") -> list[str]:
    loaded = optuna.load_study(study_name=study, storage=open_storage(storage))
    return [t.state.name for t in loaded.get_trials()]


@pytest.mark.slow
def test_tune_writes_best_yaml_history_and_trials_and_a_rerun_continues_the_study(tmp_path, capsys):
    config = tiny_config_file(tmp_path)
    written = tune(config, _space(tmp_path, SPACE), trials=2, sampler="random", pruner="none")
    folder = tmp_path / "runs" / "run"
    out = capsys.readouterr().out
    assert "study run: 0/2 trials finished; storage sqlite:///" in out
    assert "trial 0 complete: method_args.temperature=" in out and "trial 1 complete:" in out
    assert "| value " in out and "| best " in out
    assert (folder / "trial-0000" / "summary.json").exists() and (folder / "trial-0001" / "summary.json").exists()
    rows = list(csv.DictReader((folder / "trials.csv").open()))
    assert [(r["number"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "COMPLETE")]
    assert (folder / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(folder / "history.png") as history:
        assert history.text["Software"] == "crossdistill tune"  # how a later invocation knows it may replace it
    best = written["best"]
    saved = yaml.safe_load((folder / "best.yaml").read_text())
    assert saved["method_args"]["temperature"] == best.params["method_args.temperature"]
    assert saved["data"]["val_fraction"] is None and saved["train"]["run_name"] == "run-best"  # the full training set
    assert (folder / "best.yaml").read_text().startswith(f"# The best trial ({best.number}) of study run:")

    assert main(["train", "--config", str(folder / "best.yaml"), "train.progress=off"]) == 0  # as it is
    assert "| on test |" in capsys.readouterr().out

    tune(config, _space(tmp_path, SPACE), trials=3, sampler="random", pruner="none")  # N is the total
    out = capsys.readouterr().out
    assert "study run: 2/3 trials finished" in out and "trial 2 complete" in out and "trial 3" not in out
    assert _states(f"sqlite:///{folder / 'study.db'}") == ["COMPLETE"] * 3
    trials = optuna.load_study(study_name="run", storage=open_storage(f"sqlite:///{folder / 'study.db'}")).trials
    assert trials[2].params not in (trials[0].params, trials[1].params)  # the continued study draws anew


def _plot_without_tune_s_tag(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(path)
    plt.close(fig)


@pytest.mark.parametrize("name", ["best.yaml", "trials.csv", "history.png"])
def test_a_study_folder_holding_a_user_s_own_output_name_is_refused_before_any_trial(tmp_path, capsys, name):
    config = tiny_config_file(tmp_path)
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    path = folder / name
    if name == "history.png":
        _plot_without_tune_s_tag(path)
    else:
        path.write_text("number,state,value\n" if name == "trials.csv" else "# my own notes\n")
    before = path.read_bytes()
    argv = ["tune", "--config", config, "--space", _space(tmp_path, SPACE), "--trials", "1", "--sampler", "random"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path} was not written by crossdistill tune" in err and err.count("\n") == 1 + err.count("note:")
    assert path.read_bytes() == before and not any(folder.glob("trial-*"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_tune_s_own_outputs_are_recognised_an_untagged_history_by_tune_s_trials_csv_beside_it(tmp_path):
    (tmp_path / "best.yaml").write_text("# The best trial (3) of study run: weight=0.1; validation top-1 50.00.\n")
    _plot_without_tune_s_tag(tmp_path / "history.png")  # as tune drew it before the tag
    with pytest.raises(CrossDistillError, match="history.png was not written by crossdistill tune"):
        check_outputs_are_ours(tmp_path)
    (tmp_path / "trials.csv").write_text("number,state,value,method_args.weight,run,duration_s\n")
    check_outputs_are_ours(tmp_path)
    bomb = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 6, 0, 0, 0)  # a PNG Pillow refuses: a decompression bomb
    (tmp_path / "history.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", bomb)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )
    (tmp_path / "trials.csv").unlink()
    with pytest.raises(CrossDistillError, match="history.png was not written by crossdistill tune"):
        check_outputs_are_ours(tmp_path)
    (tmp_path / "history.png").unlink()
    (tmp_path / "best.yaml").write_bytes(b"\xff\xfe not text")
    with pytest.raises(CrossDistillError, match="best.yaml was not written by crossdistill tune"):
        check_outputs_are_ours(tmp_path)


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_pruned_trial_is_marked_pruned_and_keeps_its_unfinished_run(tmp_path):
    from crossdistill.search.runs import read_base
    from crossdistill.search.space import read_space

    config = tiny_config_file(tmp_path, train={"epochs": 2})
    base = read_base(config, [], None)
    spec = Study(base, read_space(_space(tmp_path, SPACE), base.config), "unused", "run", 1, "random", 0, "none")
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    study.optimize(lambda trial: objective(spec, trial), n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [1]
    run_dir = tmp_path / "runs" / "run" / "trial-0000"
    assert (run_dir / "last.pt").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.parametrize(
    "space, message",
    [
        ("method_args.temprature: {type: float, low: 1, high: 2}\n", "unknown config key 'method_args.temprature'"),
        ("optim.lrr: {type: float, low: 0.1, high: 0.2}\n", "unknown config key 'optim.lrr'"),
        ("optim.lr: {type: float, low: 0.2, high: 0.1}\n", "optim.lr: low must be < high, got low 0.2 and high 0.1"),
        ("optim.lr: {type: float, low: 0, high: 0.1, log: true}\n", "a log range needs low > 0, got 0"),
        ("optim.lr: {type: categorical, choices: []}\n", "categorical needs a non-empty list of choices"),
        ("optim.lr: {type: uniform, low: 0, high: 1}\n", "type must be one of float, int, categorical"),
        ("optim.lr: {type: float, low: 0.1, high: 1, lo: 2}\n", "unknown field(s) lo for type float"),
        ("train.epochs: {type: int, low: 1.5, high: 3}\n", "low must be an integer, got 1.5"),
        ("optim.lr: {type: categorical, choices: [-1.0]}\n", "'optim.lr': must be > 0 and finite"),
    ],
)
def test_the_space_file_is_checked_before_any_trial(tmp_path, capsys, space, message):
    config = tiny_config_file(tmp_path)
    assert main(["tune", "--config", config, "--space", _space(tmp_path, space), "--trials", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 + err.count("note:")
    assert not (tmp_path / "runs" / "run").exists() or not any((tmp_path / "runs" / "run").glob("trial-*"))


def test_grid_needs_finite_values(tmp_path):
    with pytest.raises(CrossDistillError, match="--sampler grid needs categorical parameters or int ones with a step"):
        tune(tiny_config_file(tmp_path), _space(tmp_path, SPACE), trials=1, sampler="grid")


def test_without_optuna_tune_is_a_one_line_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    config = tiny_config_file(tmp_path)
    assert main(["tune", "--config", config, "--space", _space(tmp_path, SPACE)]) == 2
    assert capsys.readouterr().err == (
        "crossdistill: error: crossdistill tune needs Optuna: pip install 'crossdistill[search]'\n"
    )


def _stopped_in_its_first_trial(tmp_path, sig: int) -> tuple[list[str], dict[str, str], str, str]:
    """A tune of two 3-epoch trials, sent ``sig`` in its first trial after one epoch; its command, env, storage and
    what it printed."""
    config = tiny_config_file(tmp_path, train={"epochs": 3})
    command = [sys.executable, "-m", "crossdistill", "tune", "--config", config, "--space", _space(tmp_path, SPACE)]
    command += ["--trials", "2", "--sampler", "random", "--pruner", "none"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    first = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Python turns SIGINT into KeyboardInterrupt only when it is not ignored at start, and a test run in the
        # background of a shell inherits it ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = tmp_path / "runs" / "run" / "trial-0000" / "last.pt"
    while not checkpoint.exists() and first.poll() is None:
        time.sleep(0.2)
    os.kill(first.pid, sig)
    output = first.communicate()[0]
    return command, env, f"sqlite:///{tmp_path / 'runs' / 'run' / 'study.db'}", output


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_asked_again_and_the_study_reaches_n_trials(tmp_path):
    command, env, storage, _ = _stopped_in_its_first_trial(tmp_path, signal.SIGKILL)
    assert _states(storage) == ["RUNNING"]

    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "trial(s) 0 of a killed worker: failed and asked again" in again.stdout
    assert _states(storage) == ["FAIL", "COMPLETE", "COMPLETE"]
    log = (tmp_path / "runs" / "run" / "trial-0000" / "train.log").read_text()
    # the retry took over the killed trial's run directory (after epoch 1 or 2: the kill lands within a poll of 0.2 s)
    assert re.search(r"---- resumed at epoch [23] ", log)
    assert not (tmp_path / "runs" / "run" / "trial-0001").exists()  # trial 1 was the retry
    assert (tmp_path / "runs" / "run" / "trial-0002" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_trial_stopped_by_a_signal_resumes_in_the_next_invocation_instead_of_a_new_one(tmp_path, sig):
    command, env, storage, output = _stopped_in_its_first_trial(tmp_path, sig)
    assert _states(storage) == ["FAIL"]  # its checkpoint saved; the trial is the next invocation's to resume
    assert "run the same command again to continue" in output.strip().splitlines()[-1]
    assert "trial 0 " in output and "run the same tune command again to resume it" in output  # Optuna's log line
    assert "--resume" not in output  # the run's own advice would leave the search

    again = subprocess.run(command, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "trial(s) 0 stopped by a signal: asked again to resume" in again.stdout
    assert _states(storage) == ["FAIL", "COMPLETE", "COMPLETE"]
    assert "---- resumed at" in (tmp_path / "runs" / "run" / "trial-0000" / "train.log").read_text()
    assert not (tmp_path / "runs" / "run" / "trial-0001").exists()  # trial 1 resumed trial 0's run directory
    third = subprocess.run(command, env=env, capture_output=True, text=True)  # asked again once, not every time
    assert "stopped by a signal" not in third.stdout and _states(storage) == ["FAIL", "COMPLETE", "COMPLETE"]


SPACES = sorted((Path(__file__).resolve().parents[2] / "configs" / "search").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_the_shipped_search_spaces_fit_the_own_data_recipe(path):
    # the README tunes configs/search/*.yaml on a user's run config: every key and range must check against one
    recipe = Path(__file__).resolve().parents[2] / "configs" / "own_data" / "distill.yaml"
    params = read_space(path, lambda overrides: load_config(recipe, overrides))
    assert params


def test_a_trial_begun_after_the_study_reached_its_target_is_left_out_before_it_trains(tmp_path, capsys):
    """Two workers count 1 of 2 trials finished and both ask: the later trial is one too many (with the grid, a point
    run twice). It fails before it trains, marked, and neither counts nor appears in trials.csv."""
    from crossdistill.search.runs import read_base
    from crossdistill.search.tune import SURPLUS, SurplusTrial, _counts, _progress, check_not_surplus, write_trials_csv

    base = read_base(tiny_config_file(tmp_path), [], None)
    spec = Study(base, read_space(_space(tmp_path, SPACE), base.config), "unused", "run", 2, "random", 0, "none")
    study = optuna.create_study(direction="maximize")
    study.tell(study.ask(), 50.0)
    running = study.ask()  # the other worker's trial
    late = study.ask()
    with pytest.raises(SurplusTrial, match="trial 2 is not run: 2 trials had begun, the study's target is 2"):
        objective(spec, late)
    study.tell(late, state=optuna.trial.TrialState.FAIL)
    assert not (tmp_path / "runs" / "run").exists()  # nothing trained
    assert _counts(study) == {"COMPLETE": 1, "RUNNING": 1, "SURPLUS": 1}
    _progress(study, study.get_trials()[late.number])
    assert capsys.readouterr().out == ""
    rows = list(csv.DictReader(write_trials_csv(study, tmp_path / "trials.csv").open()))
    assert [row["number"] for row in rows] == ["0", "1"]

    assert study.get_trials()[late.number].user_attrs[SURPLUS] is True

    study.tell(running, state=optuna.trial.TrialState.FAIL)  # the other worker's trial failed: room for one more
    check_not_surplus(study.ask(), 2)  # one finished trial ahead of it: it runs


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("pruner", ["median", "halving"])
def test_no_trial_is_pruned_before_the_second_epoch_after_the_warm_up(tmp_path, pruner):
    """During the warm-up and the epoch after it, trials of any hyper-parameters score alike: a pruner acting there
    drops configs at random (the equal-budget study pruned 7 of 12 trials at epoch 1 of 6 on a 0.02-point gap)."""
    from crossdistill.search.runs import read_base
    from crossdistill.search.tune import first_prunable_epoch

    base = read_base(tiny_config_file(tmp_path, optim={"warmup_epochs": 1}), [], None)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
    spec = Study(base, read_space(_space(tmp_path, SPACE), base.config), storage, "s", 8, "random", 0, pruner)
    study = spec.load()
    assert first_prunable_epoch(1) == 3 and first_prunable_epoch(0) == 2
    for _ in range(4):
        trial = study.ask()
        for epoch in range(1, 7):
            trial.report(50.0 + epoch, epoch)
            assert not trial.should_prune()  # (halving records each trial's rungs when it asks)
        study.tell(trial, 56.0)
    late = study.ask()
    verdicts = []
    for epoch in range(1, 5):
        late.report(10.0, epoch)
        verdicts.append(late.should_prune())
    assert verdicts[:2] == [False, False] and verdicts[2]


def test_after_too_many_failures_the_cause_fixed_the_same_study_goes_on(tmp_path, monkeypatch):
    # the limit counted every failure the study ever had: once over it, the study refused every later invocation,
    # and its message pointed at a trials.csv that was not written
    def disk_full(*args, **kwargs):
        raise CrossDistillError("no space left on the device")

    config, space = tiny_config_file(tmp_path), _space(tmp_path, SPACE)
    monkeypatch.setattr("crossdistill.search.tune.train_once", disk_full)
    with pytest.raises(CrossDistillError, match=r"^3 trials of study run failed in this invocation \(.*trials.csv"):
        tune(config, space, trials=2, sampler="random", pruner="none")
    folder = tmp_path / "runs" / "run"
    assert [r["state"] for r in csv.DictReader((folder / "trials.csv").open())] == ["FAIL"] * 3
    monkeypatch.undo()  # the cause fixed
    written = tune(config, space, trials=2, sampler="random", pruner="none")
    assert written["best"] is not None
    assert _states(f"sqlite:///{folder / 'study.db'}") == ["FAIL"] * 3 + ["COMPLETE"] * 2


def test_a_study_database_another_program_keeps_locked_is_one_line_that_says_so(tmp_path, monkeypatch, capsys):
    """A sqlite3 shell left in a transaction on study.db while tune runs: SQLAlchemy's traceback before."""
    monkeypatch.setattr(tune_module, "SQLITE_LOCK_WAIT_S", 0.2)
    database = tmp_path / "runs" / "run" / "study.db"
    shells = []

    def trial_while_a_shell_locks_the_database(spec, trial):
        shell = sqlite3.connect(database, isolation_level=None)
        shell.execute("BEGIN EXCLUSIVE")
        shells.append(shell)
        return 50.0

    monkeypatch.setattr(tune_module, "objective", trial_while_a_shell_locks_the_database)
    try:
        with pytest.raises(CrossDistillError) as raised:
            tune(tiny_config_file(tmp_path), _space(tmp_path, SPACE), trials=1, sampler="random", pruner="none")
    finally:
        for shell in shells:
            shell.close()
    assert str(raised.value) == (
        f"sqlite:///{database} stayed locked by another process for more than 0.2 s (a sqlite3 shell or a program "
        "holding a transaction open?); the finished trials are kept: run the same tune command again"
    )
    assert len(shells) == 1
