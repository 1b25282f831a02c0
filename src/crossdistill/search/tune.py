"""``crossdistill tune``: an Optuna study over a search space of config keys, each trial a normal run directory.

TPE by default (random and grid available), pruned on the per-epoch validation accuracy (median or successive
halving, through the trainer's epoch hook), resumable (the same command continues the study: --trials is the
total), on any Optuna storage: an SQLite file by default, any SQLAlchemy URL (PostgreSQL for many machines), or
``journal:FILE`` (Optuna's journal file on a shared file system). Several workers (processes here, commands on
other machines with the same --storage and --study) share one study, each running ``study.optimize``.
Outputs in ``<train.output_dir>/<study>/``: ``best.yaml`` (a complete run config of the best trial, on the full
training set, ready for ``crossdistill train``), ``history.png`` and ``trials.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import os
import socket
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..engine import StoppedByHook
from ..engine.preemption import Preempted
from ..errors import CrossDistillError, exception_chain, one_line
from ..files import RERUN_HINT, write_atomic, write_text_atomic
from .runs import Base, RunSpec, parse_seeds, read_base, read_summary, run_specs, start_workers, train_once
from .space import Param, override, read_space
from .sweep import add_common_arguments, common_options, summarise

INSTALL = "pip install 'crossdistill[search]'"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
OUTPUTS = ("best.yaml", "trials.csv", "history.png")
BEST_HEADER = "# The best trial ("
TRIALS_COLUMNS = (["number", "state", "value"], ["run", "duration_s"])  # the first and the last columns
PNG_SOFTWARE = "crossdistill tune"  # history.png's Software tag
AGAIN = "run the same tune command again to resume it"
SQLITE_LOCK_WAIT_S = 60
"""How long an SQLite study waits for the write lock that another process (a worker, a sqlite3 shell) holds."""
HEARTBEAT_S, GRACE_S = 30, 120
"""RDB storages: a worker's trial beats every HEARTBEAT_S; one silent for GRACE_S (a killed machine) is failed and
asked again (Optuna's heartbeat)."""


def _optuna():
    try:
        import optuna
    except ImportError:
        raise CrossDistillError(f"crossdistill tune needs Optuna: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def default_storage(base: Base) -> str:
    return f"sqlite:///{base.folder / 'study.db'}"


def open_storage(url: str):
    """The Optuna storage of ``url``: ``journal:FILE`` (journal file), else an SQLAlchemy URL (SQLite, PostgreSQL)."""
    optuna = _optuna()
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise CrossDistillError(
            f"--storage {url!r}: give an SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db) or "
            "journal:FILE (a journal file on a shared file system)"
        )
    sqlite = url.startswith("sqlite")
    # pysqlite's own BEGIN is off: every transaction is an immediate one (below)
    engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_WAIT_S, "isolation_level": None}} if sqlite else {}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna >= 4.9
        retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
    else:
        retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)}
    try:
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **retry
        )
    except ImportError as err:
        raise CrossDistillError(f"--storage {url}: {one_line(err)} (PostgreSQL: {INSTALL})") from None
    except Exception as err:  # SQLAlchemy's errors: a server down, a bad URL, a wrong password
        raise CrossDistillError(f"cannot open the study storage {url}: {one_line(err)[:300]}") from None
    if sqlite:
        _begin_immediate(storage.engine)
    return storage


def _storage_errors(err: BaseException) -> list[BaseException]:
    """The errors of the study's database behind ``err``: Optuna's wrapping first, then SQLAlchemy's."""
    return [
        raised
        for raised in exception_chain(err)
        if type(raised).__module__.startswith("sqlalchemy") or type(raised).__name__ == "StorageInternalError"
    ]


@contextlib.contextmanager
def storage_failures(url: str):
    """A failure of the study's database while the study runs (locked past SQLITE_LOCK_WAIT_S, a server gone) as
    one line: finished trials are in the database, and the same command continues the study."""
    try:
        yield
    except CrossDistillError:
        raise
    except Exception as err:
        causes = _storage_errors(err)
        if not causes:
            raise
        if any("database is locked" in str(cause) for cause in causes):
            why = (
                f"{url} stayed locked by another process for more than {SQLITE_LOCK_WAIT_S} s (a sqlite3 shell or "
                "a program holding a transaction open?)"
            )
        else:  # the innermost: the database's own words, not Optuna's guess about them
            why = f"the study storage {url} failed: {one_line(causes[-1])[:300]}"
        raise CrossDistillError(f"{why}; the finished trials are kept: run the same tune command again") from None


def _begin_immediate(engine) -> None:
    """SQLite transactions that take the write lock when they begin. Optuna claims a waiting trial by reading its
    state and then setting it to RUNNING; on SQLite its SELECT ... FOR UPDATE locks nothing, so two workers could
    both read WAITING and run the same trial (an enqueued grid point, a retried trial)."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))


def make_sampler(name: str, seed: int):
    optuna = _optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    # grid: every point is enqueued as a waiting trial (see tune), which a worker takes whole; the sampler only
    # draws a retry of a failed point (Optuna's GridSampler cannot follow trials it did not assign)
    return optuna.samplers.RandomSampler(seed=seed)


def grid_of(params: Sequence[Param]) -> dict[str, list[Any]]:
    grid = {}
    for param in params:
        values = param.grid()
        if values is None:
            raise CrossDistillError(
                f"--sampler grid needs categorical parameters or int ones with a step (no log); {param.key} is "
                f"{param.type} {param.low}..{param.high}: give it choices or a step, or use --sampler tpe"
            )
        grid[param.key] = values
    return grid


def first_prunable_epoch(warmup_epochs: int) -> int:
    """Trials report their validation top-1 at epochs 1, 2, ...; during the learning-rate warm-up and one epoch after
    it, trials of different hyper-parameters score alike (pruning there drops configs at random), so the first epoch
    a trial may be pruned at is the second one after the warm-up (never the first evaluation)."""
    return max(warmup_epochs, 0) + 2


def make_pruner(name: str, first_epoch: int):
    """``first_epoch``: :func:`first_prunable_epoch` of the study's base config."""
    optuna = _optuna()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=first_epoch)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_epoch)
    return optuna.pruners.NopPruner()


class Study:
    """What every worker of one ``tune`` command needs (picklable: spawned workers open their own storage)."""

    def __init__(self, base: Base, params: list[Param], storage: str, study: str, trials: int, sampler: str, seed: int,
                 pruner: str):  # fmt: skip
        self.base, self.params, self.storage, self.study = base, params, storage, study
        self.trials, self.sampler, self.seed, self.pruner = trials, sampler, seed, pruner

    def load(self, worker: int = 0):
        optuna = _optuna()
        study = optuna.load_study(
            study_name=self.study,
            storage=open_storage(self.storage),
            pruner=make_pruner(self.pruner, first_prunable_epoch(self.base.config([]).optim.warmup_epochs)),
        )
        # the seed also follows the trials so far: a continued study does not replay the first session's draws
        study.sampler = make_sampler(self.sampler, self.seed + 1000 * worker + len(study.get_trials(deepcopy=False)))
        return study

    def target(self) -> int:
        """The trials to finish: --trials, or the grid's size when that is smaller."""
        if self.sampler != "grid":
            return self.trials
        size = 1
        for values in grid_of(self.params).values():
            size *= len(values)
        return min(self.trials, size)


SURPLUS = "surplus"
"""User attribute of a trial left out because the study already held its target when the trial began."""


STOPPED = "stopped"
"""User attribute of a trial whose run a stop signal interrupted (its checkpoint saved): asked again, once."""
RESUMES = "resumes"
"""User attribute of a trial asked again for a stopped one: that trial's number."""


class SurplusTrial(CrossDistillError):
    """Raised at the start of a trial that would exceed the study's target (failed, marked, left out)."""


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        state = "SURPLUS" if trial.user_attrs.get(SURPLUS) else trial.state.name
        if state == "FAIL" and trial.user_attrs.get(STOPPED):
            state = "STOPPED"  # not a failure of the trial: it goes on in the trial asked again for it
        counts[state] = counts.get(state, 0) + 1
    return counts


def check_not_surplus(trial, target: int) -> None:
    """A worker counts the trials, then asks for one; another can ask in between, so two workers that both counted
    fewer than the target can begin one trial too many (with the grid, a point twice). The trial whose number comes
    after ``target`` others that finished or run is that one: it is failed before it trains, marked, and left out of
    the counts and of trials.csv, so that a study runs exactly its target."""
    optuna = _optuna()
    live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    ahead = sum(t.number < trial.number for t in trial.study.get_trials(deepcopy=False, states=live))
    if ahead >= target:
        trial.set_user_attr(SURPLUS, True)
        raise SurplusTrial(
            f"trial {trial.number} is not run: {ahead} trials had begun, the study's target is {target} (two workers "
            "asked at once); it is left out of the results"
        )


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def retry_dead_trials(study) -> list[int]:
    """Trials left RUNNING by a killed worker of this machine (its process is gone): failed and asked again with the
    same parameters and run directory (which resumes from its checkpoint). Other machines' are Optuna's heartbeat's."""
    optuna = _optuna()
    retried = []
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL):
            study.enqueue_trial(trial.params, user_attrs={"run": trial.user_attrs.get("run")})
            retried.append(trial.number)
    return retried


def retry_stopped_trials(study) -> list[int]:
    """Trials whose run a stop signal interrupted (SIGTERM/SIGUSR1, their checkpoint saved): asked again once with
    the same parameters and run directory, so the next invocation resumes them instead of sampling new ones."""
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    asked = {trial.user_attrs.get(RESUMES) for trial in trials}
    retried = []
    for trial in trials:
        if trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get(STOPPED) and trial.number not in asked:
            study.enqueue_trial(trial.params, user_attrs={"run": trial.user_attrs.get("run"), RESUMES: trial.number})
            retried.append(trial.number)
    return retried


def objective(spec: Study, trial) -> float:
    """One trial: its run config (the base with the sampled values), trained, pruned on the validation accuracy."""
    optuna = _optuna()
    check_not_surplus(trial, spec.target())
    trial.set_user_attr("worker", _worker_id())
    values = {param.key: param.suggest(trial) for param in spec.params}
    name = trial.user_attrs.get("run") or f"trial-{trial.number:04d}"
    trial.set_user_attr("run", name)
    overrides = [override(key, value) for key, value in values.items()]
    overrides += [f"train.output_dir={spec.base.folder}", f"train.run_name={name}"]
    cfg = spec.base.config(overrides)

    def on_epoch(epoch: int, row: dict[str, Any]) -> bool:
        if "eval_top1" not in row:
            return False
        trial.report(row["eval_top1"], epoch)
        return trial.should_prune()

    with open(os.devnull, "w") as quiet:
        try:
            status, summary = train_once(cfg, out=quiet, on_epoch=on_epoch)
        except StoppedByHook:
            raise optuna.TrialPruned() from None
        # the trial fails and the next invocation asks it again (its run resumes); the run's own advice (crossdistill
        # train --resume RUN) would leave the search, and Optuna logs the exception with the failed trial
        except Preempted as stop:
            trial.set_user_attr(STOPPED, True)
            raise Preempted(f"trial {trial.number} stopped by a signal; {AGAIN}", stop.checkpoint) from None
        except KeyboardInterrupt:
            trial.set_user_attr(STOPPED, True)
            raise KeyboardInterrupt(f"trial {trial.number} interrupted; {AGAIN}") from None
    if summary is None:
        raise CrossDistillError(f"the run {name} of trial {trial.number} is held by another process")
    trial.set_user_attr("eval_split", summary.eval_split)
    return summary.last_top1


def _progress(study, trial) -> None:
    if trial.user_attrs.get(SURPLUS):
        return
    params = " ".join(f"{key}={_short(value)}" for key, value in trial.params.items())
    value = f"{trial.value:.2f}" if trial.value is not None else "-"
    try:
        best = f"best {study.best_value:.2f} (trial {study.best_trial.number})"
    except ValueError:
        best = "best -"
    print(f"trial {trial.number} {trial.state.name.lower()}: {params} | value {value} | {best}", flush=True)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_worker(spec: Study, worker: int, workers: int) -> None:
    """One worker: trials until the study holds --trials finished ones (complete or pruned)."""
    with storage_failures(spec.storage):
        study = spec.load(worker)
        target = spec.target()
        # failures of earlier invocations (a cause since fixed, a killed worker's trials) do not count against this one
        failed_before = _counts(study).get("FAIL", 0)
        while True:
            counts = _counts(study)
            if counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) + counts.get("RUNNING", 0) >= target:
                return
            failed = counts.get("FAIL", 0) - failed_before
            if failed > target:
                trials_csv = write_trials_csv(study, spec.base.folder / "trials.csv")
                raise CrossDistillError(
                    f"{failed} trials of study {spec.study} failed in this invocation (each one's error is above; "
                    f"{trials_csv} lists every trial): fix the cause and run the command again"
                )
            study.optimize(
                lambda trial: objective(spec, trial),
                n_trials=1,
                catch=(CrossDistillError,),
                callbacks=[_progress],
                gc_after_trial=True,
            )


# ---------------------------------------------------------------- outputs


def _written_by_tune(path: Path) -> bool:
    """Whether an existing output of a study is one tune wrote: best.yaml and trials.csv by their first line,
    history.png by its Software tag or, as versions before the tag wrote it, by tune's trials.csv beside it."""
    try:
        if path.name == "history.png":
            from PIL import Image

            try:
                with Image.open(path) as image:
                    tagged = getattr(image, "text", {}).get("Software") == PNG_SOFTWARE
            except Exception:  # noqa: BLE001 - not an image Pillow reads (a decompression bomb raises its own type)
                tagged = False
            return tagged or _written_by_tune(path.with_name("trials.csv"))
        with path.open(encoding="utf-8") as handle:
            first = handle.readline()
        if path.name == "best.yaml":
            return first.startswith(BEST_HEADER)
        row = next(csv.reader([first]), [])
        head, tail = TRIALS_COLUMNS
        return len(row) >= len(head) + len(tail) and row[: len(head)] == head and row[-len(tail) :] == tail
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def check_outputs_are_ours(folder: Path) -> None:
    """Refuse a study folder whose best.yaml, trials.csv or history.png tune did not write: they are never replaced."""
    for name in OUTPUTS:
        path = folder / name
        if (path.exists() or path.is_symlink()) and not _written_by_tune(path):
            raise CrossDistillError(
                f"{path} was not written by crossdistill tune, and the study's {name} would replace it: "
                "move it, or give the study another name (--study)"
            )


def write_outputs(spec: Study, study) -> dict[str, Any]:
    """best.yaml, trials.csv and history.png in the study's folder; returns what was written and the best trial."""
    folder = spec.base.folder
    check_outputs_are_ours(folder)
    written: dict[str, Any] = {"trials": write_trials_csv(study, folder / "trials.csv")}
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if best is not None:
        written["best"] = best
        written["best.yaml"] = write_best_config(spec, best, folder / "best.yaml")
    written["history.png"] = plot_history(study, folder / "history.png")
    return written


def best_overrides(spec: Study, params: dict[str, Any], run_name: str) -> list[str]:
    """The best trial's config for a final run: its values, on the full training set (no validation split)."""
    overrides = [override(key, value) for key, value in params.items()]
    return overrides + ["data.val_fraction=null", f"train.output_dir={spec.base.folder}", f"train.run_name={run_name}"]


def write_best_config(spec: Study, best, path: Path) -> Path:
    cfg = spec.base.config(best_overrides(spec, best.params, f"{spec.study}-best"))
    data = cfg.to_dict()
    data["train"]["progress"] = "auto"
    params = ", ".join(f"{key}={_short(value)}" for key, value in best.params.items())
    header = (
        f"# The best trial ({best.number}) of study {spec.study}: {params}; validation top-1 {best.value:.2f}.\n"
        "# Trains on the full training set and evaluates on the test split: crossdistill train --config best.yaml\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(data, sort_keys=False), hint=RERUN_HINT)
    return path


def write_trials_csv(study, path: Path) -> Path:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({key for trial in trials for key in trial.params})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["number", "state", "value", *keys, "run", "duration_s"])
    for trial in trials:
        if trial.user_attrs.get(SURPLUS):
            continue
        duration = trial.duration.total_seconds() if trial.duration is not None else ""
        writer.writerow(
            [trial.number, trial.state.name, "" if trial.value is None else trial.value]
            + [trial.params.get(key, "") for key in keys]
            + [trial.user_attrs.get("run", ""), duration]
        )
    write_text_atomic(path, buffer.getvalue(), hint=RERUN_HINT)
    return path


def plot_history(study, path: Path) -> Path | None:
    """The optimisation history (each trial's value, the best so far, pruned trials at their last reported value)
    and the parameter importances (at least 2 finished trials; the plot says so otherwise)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("history.png not drawn: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    optuna = _optuna()
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == states.COMPLETE]
    pruned = [t for t in trials if t.state == states.PRUNED and t.intermediate_values]
    fig, (history, importance) = plt.subplots(1, 2, figsize=(12, 4.5))
    history.scatter([t.number for t in complete], [t.value for t in complete], label="complete", color="C0")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        history.scatter([t.number for t in pruned], last, marker="x", color="C3", label="pruned (last reported)")
    if complete:
        ordered = sorted(complete, key=lambda t: t.number)
        best, running = [], -float("inf")
        for t in ordered:
            running = max(running, t.value)
            best.append(running)
        last = max(t.number for t in trials)  # the line runs on to the last trial, pruned ones included
        history.step(
            [t.number for t in ordered] + [last], best + best[-1:], where="post", color="C1", label="best so far"
        )
    history.set_xlabel("trial")
    history.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    history.set_ylabel("validation top-1 (%)")
    history.set_title(f"study {study.study_name}: optimisation history")
    history.legend(loc="best")
    history.grid(alpha=0.3)
    importance.set_title("parameter importances (Optuna's default evaluator)")
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "importances will be equal" for a handful of trials
                values = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as err:
            values, note = {}, f"importances not computed: {one_line(err)[:80]}"
        else:
            note = ""
        names = list(values)[::-1]
        importance.barh(names, [values[n] for n in names], color="C2")
        importance.set_xlabel("importance")
        if note:
            importance.text(0.5, 0.5, note, ha="center", va="center", transform=importance.transAxes, wrap=True)
    else:
        importance.text(
            0.5,
            0.5,
            f"importances need at least 2 finished trials\n({len(complete)} so far)",
            ha="center",
            va="center",
            transform=importance.transAxes,
        )
        importance.set_axis_off()
    fig.tight_layout()
    write_atomic(
        path,
        lambda handle: fig.savefig(handle, format="png", dpi=110, metadata={"Software": PNG_SOFTWARE}),
        hint=RERUN_HINT,
    )
    plt.close(fig)
    return path


# ---------------------------------------------------------------- the command


def tune(
    config: str,
    space: str,
    trials: int = 20,
    workers: int = 1,
    storage: str | None = None,
    study_name: str | None = None,
    sampler: str = "tpe",
    pruner: str = "median",
    seed: int = 0,
    overrides: Sequence[str] = (),
    teacher_cache: bool = True,
    evaluate_best: bool = False,
    seeds: str | None = None,
) -> dict[str, Any]:
    optuna = _optuna()
    if trials < 1:
        raise CrossDistillError(f"--trials {trials}: must be >= 1")
    base = read_base(config, overrides, study_name, teacher_cache)
    if base.config([]).data.val_fraction is None:
        print(
            "crossdistill: note: data.val_fraction is not set: the trials are measured on the evaluation split "
            f"({base.config([]).data.eval_split}); set data.val_fraction=0.1 to tune on a validation split carved "
            "out of the training data (never tune on the test set)",
            file=sys.stderr,
        )
    params = read_space(space, base.config)
    if sampler == "grid":
        grid_of(params)
    check_outputs_are_ours(base.folder)
    url = storage or default_storage(base)
    if storage is None:
        base.folder.mkdir(parents=True, exist_ok=True)
    spec = Study(base, params, url, base.name, trials, sampler, seed, pruner)
    with storage_failures(url):
        study = optuna.create_study(
            study_name=spec.study, storage=open_storage(url), direction="maximize", load_if_exists=True
        )
        retried = retry_dead_trials(study)
        if retried:
            print(f"trial(s) {', '.join(map(str, retried))} of a killed worker: failed and asked again", flush=True)
        resumed = retry_stopped_trials(study)
        if resumed:
            print(f"trial(s) {', '.join(map(str, resumed))} stopped by a signal: asked again to resume", flush=True)
        # the grid as waiting trials: workers take each once (Optuna pops a waiting trial atomically)
        if sampler == "grid":
            grid = grid_of(params)
            keys = list(grid)
            for values in itertools.product(*grid.values()):
                study.enqueue_trial(dict(zip(keys, values)), skip_if_exists=True)
        counts = _counts(study)
        done = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        print(
            f"study {spec.study}: {done}/{spec.target()} trials finished; storage {url}; {sampler} sampler, "
            f"{pruner} pruner; {workers} worker(s); runs in {base.folder}",
            flush=True,
        )
        start_workers(run_worker, (spec,), workers)
        study = spec.load()
        written = write_outputs(spec, study)
    best = written.get("best")
    if best is None:
        print("no trial finished: nothing to report")
        return written
    params_text = ", ".join(f"{key}={_short(value)}" for key, value in best.params.items())
    print(
        f"best: trial {best.number} ({params_text}): {best.user_attrs.get('eval_split', 'val')} top-1 "
        f"{best.value:.2f}\nwrote {written['best.yaml']}, {written['trials']}"
        + (f", {written['history.png']}" if written.get("history.png") else "")
    )
    if evaluate_best:
        written["evaluation"] = evaluate(spec, best, parse_seeds(seeds) or [0], workers)
    return written


def evaluate(spec: Study, best, seeds: list[int], workers: int) -> dict[str, Any]:
    """Train the best config on the full training set with each seed; the test top-1 mean ± std."""
    specs = []
    for seed in seeds:
        name = f"{spec.study}-best-seed{seed}"
        specs.append(RunSpec(name, (*best_overrides(spec, best.params, name), f"train.seed={seed}")))
    print(f"\nevaluating the best config on the full training set, seeds {', '.join(map(str, seeds))}:", flush=True)
    start_workers(run_specs, (spec.base, specs), workers)
    summarise(spec.base, specs)
    summaries = [read_summary(spec.base.folder / s.name) for s in specs]
    values = [s.last_top1 for s in summaries if s is not None]
    if not values:
        return {"test_top1": []}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    split = next(s.eval_split for s in summaries if s is not None)
    print(f"best config on {split}: last top-1 {statistics.mean(values):.2f} ± {std:.2f} over {len(values)} seed(s)")
    return {"test_top1": values, "mean": statistics.mean(values), "std": std}


def _cmd_tune(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in ("trials", "storage", "sampler", "pruner", "seed", "seeds")}
    tune(args.config, args.space, study_name=args.study, evaluate_best=args.evaluate_best, **options,
         **common_options(args))  # fmt: skip
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="search hyper-parameters with Optuna (pip install 'crossdistill[search]'); resumable",
        description="Search the config keys of a space file with Optuna; every trial is a run under "
        "<train.output_dir>/<study>/. Run the same command again to continue the study (--trials is the total); "
        "run it on several machines with the same --storage and --study to share it. Writes best.yaml, "
        "history.png and trials.csv there.",
    )
    add_common_arguments(p)
    p.add_argument("--space", required=True, help="the search space (YAML): config keys with ranges")
    p.add_argument("--trials", type=int, default=20, help="trials to finish in all (complete or pruned)")
    p.add_argument("--storage", help="sqlite:///FILE, postgresql://USER@HOST/DB, or journal:FILE "
                   "(default: sqlite:///<train.output_dir>/<study>/study.db)")  # fmt: skip
    p.add_argument("--study", help="the study's name and folder (default: the config file's name)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="prune on the per-epoch validation top-1")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    p.add_argument(
        "--evaluate-best",
        action="store_true",
        help="then train the best config on the full training set with --seeds and report its test top-1",
    )
    p.add_argument("--seeds", help="seeds of --evaluate-best, e.g. 0,1,2 (default: 0)")
    p.set_defaults(func=_cmd_tune)
    return p
