"""What a run tells its user: train.log, the step scalars, progress lines off a terminal, experiment trackers."""

import errno
import io
import re
import sys

import pytest
import torch

from conftest import SYNCING_OPS, ops_called, tiny_run
from crossdistill.config import build_config
from crossdistill.engine import Trainer
from crossdistill.engine import logs as run_logs
from crossdistill.engine.logs import RunLog, StepScalars, Trackers, progress_mode
from crossdistill.engine.step import StepResult
from crossdistill.errors import CrossDistillError

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def quick(tmp_path, **train):
    """A vanilla run of 4 steps per epoch (64 images, batch 16)."""
    return tiny_run(
        tmp_path,
        method="vanilla",
        data={"train_subset": 64, "eval_subset": 32},
        train={"epochs": 2, "batch_size": 16, **train},
    )


def fit(raw, resume=False, stop_after=None):
    out = io.StringIO()
    trainer = Trainer(build_config(raw), resume=resume, out=out)
    trainer.fit(stop_after=stop_after)
    return trainer, out.getvalue()


def log_lines(run_dir):
    """train.log's lines without their time stamps (the header line as it is)."""
    lines = (run_dir / "train.log").read_text().splitlines()
    return [lines[0]] + [STAMP.sub("", line) for line in lines[1:]]


def test_train_log_holds_every_printed_line_and_the_step_scalars_and_a_resume_appends(tmp_path):
    raw = quick(tmp_path, log_every=2)
    _, first = fit(raw, stop_after=1)
    _, second = fit(raw, resume=True)
    run_dir = tmp_path / "runs" / "run"
    lines = log_lines(run_dir)
    assert lines[0].startswith("# crossdistill train.log") and sum(line.startswith("#") for line in lines) == 1
    assert all(STAMP.match(line) for line in (run_dir / "train.log").read_text().splitlines()[1:])
    for printed in (first + second).splitlines():
        assert printed in lines, printed  # the start-up summary, warnings, epoch rows and the final line
    assert lines[1].startswith("---- run started (crossdistill ")
    resumed = [i for i, line in enumerate(lines) if line.startswith("---- resumed")]
    assert len(resumed) == 1 and lines[resumed[0]].startswith(f"---- resumed at epoch 2 step 0 from {run_dir}/last.pt")
    assert lines.index(next(line for line in lines if line.startswith("epoch 1 |"))) < resumed[0]
    assert any(line.startswith("done: last top-1") for line in lines[resumed[0] :])
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(" |")[0] for line in steps] == [
        "step 2 (epoch 1, 2/4)",
        "step 4 (epoch 1, 4/4)",
        "step 6 (epoch 2, 2/4)",
        "step 8 (epoch 2, 4/4)",
    ]
    assert re.fullmatch(
        r"step 2 \(epoch 1, 2/4\) \| loss [\d.]+ \| ce [\d.]+ \| grad_norm [\d.]+ \| lr [\d.e-]+ \| \d+ img/s", steps[0]
    )
    assert not any(line.startswith("step ") for line in (first + second).splitlines())  # the file's, not stdout's


def test_overwrite_replaces_a_runs_train_log_but_a_users_train_log_is_never_touched(tmp_path):
    raw = quick(tmp_path, epochs=1)
    fit(raw)
    run_dir = tmp_path / "runs" / "run"
    Trainer(build_config(raw), overwrite=True, out=io.StringIO()).fit()
    assert sum(line.startswith("---- run started") for line in log_lines(run_dir)) == 1  # the earlier log was removed

    mine = "my notes on this run\n"
    (run_dir / "train.log").write_text(mine)
    with pytest.raises(CrossDistillError, match="holds train.log under the name of a file a run writes"):
        Trainer(build_config(raw), overwrite=True, out=io.StringIO())
    _, printed = fit(quick(tmp_path, epochs=2), resume=True)  # a resume goes on, without a log file
    assert f"warning: {run_dir / 'train.log'} was not written by a run" in printed
    assert (run_dir / "train.log").read_text() == mine


def test_progress_is_lines_on_stdout_when_it_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(run_logs, "LINE_SECONDS", 0.0)
    _, printed = fit(quick(tmp_path, epochs=1, progress="auto"))
    lines = [line for line in printed.splitlines() if line.startswith("epoch 1/1 | step")]
    assert [line.split(" | ")[1] for line in lines] == ["step 1/4 (25%)", "step 2/4 (50%)", "step 3/4 (75%)"]
    assert re.search(
        r"\| loss [\d.]+ \| ce [\d.]+ \| \d+ img/s \| eta \d:\d\d:\d\d \(epoch\), \d:\d\d:\d\d \(run\)$", lines[0]
    )
    assert "\r" not in printed


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_modes(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_mode("auto", Terminal()) == progress_mode(True, Terminal()) == "bar"
    assert progress_mode("auto", io.StringIO()) == "lines"  # a file, a pipe, a SLURM log
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_mode(True, Terminal()) == "lines"  # the bar would be drawn into a file
    assert progress_mode(False, Terminal()) == progress_mode("off", Terminal()) == "off"
    assert progress_mode("bar", io.StringIO()) == "bar" and progress_mode("lines", Terminal()) == "lines"


def _result(loss: float, ce: float, norm: float, ok: bool | None = None) -> StepResult:
    losses = {"ce": torch.tensor(ce)}  # the terms averaged over the step's micro-batches
    output = type("Output", (), {"losses": {"ce": torch.tensor(float("nan"))}})()  # the last micro-batch's alone
    ok_flag = None if ok is None else torch.tensor(ok)
    return StepResult(output, losses, torch.tensor(loss), torch.tensor(norm), ok=ok_flag)


def test_step_scalars_are_interval_means_read_with_one_sync(monkeypatch):
    clock = iter([10.0, 12.0, 13.0])
    scalars = StepScalars(every=3, world_size=2, clock=lambda: next(clock))
    assert [scalars.due(s) for s in range(7)] == [False, False, True, False, False, True, False]
    scalars.start_clock()  # 10 s
    scalars.add(_result(1.0, 0.5, 2.0), 8)
    assert not ops_called(scalars.add, _result(3.0, 1.5, 4.0, ok=True), 8) & set(SYNCING_OPS)  # no host sync per step
    scalars.add(_result(float("nan"), 9.0, 9.0, ok=False), 8)  # skipped on the device: not counted
    read = scalars.read()  # 12 s
    assert read == {"loss": 2.0, "ce": 1.0, "grad_norm": 3.0, "img_per_s": 24 * 2 / 2.0}
    scalars.add(_result(5.0, 5.0, 5.0), 8)
    assert scalars.read() == {"loss": 5.0, "ce": 5.0, "grad_norm": 5.0, "img_per_s": 8 * 2 / 1.0}  # 13 s


def test_run_log_keeps_early_lines_and_records_how_the_run_ended(tmp_path):
    log = RunLog(io.StringIO(), enabled=True)
    log.print("claimed the run directory")
    log.open(tmp_path, "run started")
    log.write("error: stopping: 21 non-finite steps")
    log.close()
    lines = log_lines(tmp_path)
    assert lines[1].startswith("---- run started") and lines[2:] == [
        "claimed the run directory",
        "error: stopping: 21 non-finite steps",
    ]
    silent = RunLog(io.StringIO(), enabled=False)  # another rank: prints and writes nothing
    silent.print("x")
    silent.open(tmp_path / "other", "run started")
    assert silent.out.getvalue() == "" and not (tmp_path / "other").exists()


def test_a_train_log_that_cannot_be_written_is_one_warning_and_the_run_goes_on(tmp_path):
    class FullDisk(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    out = io.StringIO()
    log = RunLog(out, enabled=True)
    log.open(tmp_path, "run started")
    log.handle = FullDisk()
    log.print("epoch 1 | lr 0.1")
    log.print("epoch 2 | lr 0.05")
    assert out.getvalue().splitlines() == [
        "epoch 1 | lr 0.1",
        f"warning: cannot write {tmp_path / 'train.log'} (No space left on device); the run goes on without its "
        "log file (checkpoints, metrics.csv and this output are not affected)",
        "epoch 2 | lr 0.05",
    ]


class FakeTracker:
    def __init__(self, name, calls, fail_on=None):
        self.name, self.calls, self.fail_on = name, calls, fail_on

    def _record(self, what, *args):
        self.calls.append((self.name, what, *args))
        if what == self.fail_on:
            raise ConnectionError("tracking server at localhost:5000 refused the connection")

    def start(self, params, run_id):
        self._record("start", params["train.epochs"], run_id)
        return run_id or f"{self.name}-id"

    def log(self, metrics, step):
        self._record("log", sorted(metrics), step)

    def log_epoch(self, row, epoch, global_step):
        self._record("log_epoch", epoch, global_step)

    def finish(self, summary, status):
        self._record("finish", status, summary["best_epoch"])


def test_trackers_get_params_steps_epochs_and_the_summary_and_a_failing_one_is_warned_about_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(run_logs.TRACKER_PACKAGES, "mlflow", ("json", "mlflow"))  # no tracker library needed
    monkeypatch.setitem(run_logs.TRACKER_PACKAGES, "wandb", ("json", "wandb"))
    monkeypatch.setattr(
        run_logs,
        "build_trackers",
        lambda cfg, run_dir: [FakeTracker("mlflow", calls), FakeTracker("wandb", calls, fail_on="log_epoch")],
    )
    raw = quick(tmp_path, log_every=4, trackers=["mlflow", "wandb"])
    _, printed = fit(raw, stop_after=1)
    assert calls == [
        ("mlflow", "start", "2", None),
        ("wandb", "start", "2", None),
        ("mlflow", "log", ["step/ce", "step/grad_norm", "step/img_per_s", "step/loss", "step/lr"], 4),
        ("wandb", "log", ["step/ce", "step/grad_norm", "step/img_per_s", "step/loss", "step/lr"], 4),
        ("mlflow", "log_epoch", 1, 4),
        ("wandb", "log_epoch", 1, 4),  # fails: never called again
        ("mlflow", "finish", "FINISHED", 1.0),
    ]
    warnings = [line for line in printed.splitlines() if "tracking failed" in line]
    assert warnings == [
        "warning: wandb tracking failed while logging epoch 1 (tracking server at localhost:5000 refused the "
        "connection); the run goes on without wandb (train.log, metrics.csv and TensorBoard are not affected)"
    ]
    assert "tracking: mlflow run mlflow-id, wandb run wandb-id" in printed
    calls.clear()
    fit(raw, resume=True)  # the checkpoint kept the trackers' run ids: the same runs go on
    assert calls[:2] == [("mlflow", "start", "2", "mlflow-id"), ("wandb", "start", "2", "wandb-id")]


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_tracker_whose_library_is_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    with pytest.raises(CrossDistillError) as caught:
        Trainer(build_config(quick(tmp_path, trackers=[name])), out=io.StringIO())
    assert str(caught.value) == (
        f"train.trackers lists {name}, but the {name} package is not installed: pip install "
        f"'crossdistill[{name}]' (or remove {name} from train.trackers)"
    )
    assert not (tmp_path / "runs").exists()


def test_trackers_failing_at_start_leave_the_run_going():
    warned = []
    trackers = Trackers([FakeTracker("mlflow", [], fail_on="start")], warned.append)
    trackers.start({"train.epochs": "2"}, {})
    trackers.log({"step/loss": 1.0}, 5)
    trackers.finish({"best_epoch": 1}, "FINISHED")
    assert len(warned) == 1 and warned[0].startswith("warning: mlflow tracking failed while starting its run")
    assert trackers.ids == {}


def test_mlflow_run_is_read_back_with_mlflows_own_client(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    raw = quick(tmp_path, log_every=2, trackers=["mlflow"])
    fit(raw, stop_after=1)
    fit(raw, resume=True)
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("crossdistill")
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed run went on in the same MLflow run
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.epochs"] == "2" and run.data.params["method"] == "vanilla"
    assert run.data.tags["crossdistill.run_dir"] == str(tmp_path / "runs" / "run")
    steps = client.get_metric_history(run.info.run_id, "step/loss")
    assert [m.step for m in steps] == [2, 4, 6, 8]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_top1")] == [1, 2]
    summary = torch.load(tmp_path / "runs" / "run" / "last.pt", weights_only=True)
    assert summary["trackers"] == {"mlflow": run.info.run_id}
    assert run.data.metrics["best_top1"] >= 0 and "wall_time_s" in run.data.metrics


def test_wandb_runs_offline_into_the_output_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trainer, _ = fit(quick(tmp_path, epochs=1, log_every=2, trackers=["wandb"]))
    (run_id,) = trainer.logs.tracker_ids().values()
    assert list((tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run_id}"))
