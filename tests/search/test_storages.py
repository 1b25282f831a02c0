"""crossdistill tune on shared storages: two workers on one study in a real, throwaway PostgreSQL server."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, tiny_config_file
from crossdistill.search.tune import open_storage, tune

optuna = pytest.importorskip("optuna", reason="crossdistill tune needs optuna (pip install 'crossdistill[search]')")

PG_BIN = Path("/usr/lib/postgresql/15/bin")
GRID = (
    "method_args.temperature: {type: categorical, choices: [1.0, 4.0]}\n"
    "optim.lr: {type: categorical, choices: [0.001, 0.003]}\n"
)


@pytest.fixture
def postgres_url():
    """A PostgreSQL cluster of its own in a temporary directory, on a free port; stopped and removed after."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (apt-get install postgresql-15)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install psycopg2-binary")
    prefix: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="crossdistill-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: the cluster belongs to the postgres user
        try:
            shutil.chown(folder, "postgres")
        except LookupError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no postgres user to own the test cluster")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    run = lambda *args: subprocess.run(prefix + [str(a) for a in args], check=True, capture_output=True)  # noqa: E731
    try:
        run(PG_BIN / "initdb", "-D", data, "-U", "crossdistill", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
        run(PG_BIN / "pg_ctl", "-D", data, "-o", options, "-l", folder / "server.log", "-w", "start")
        yield f"postgresql+psycopg2://crossdistill@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(prefix + [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def _results(storage: str) -> list[tuple[str, tuple, float | None]]:
    study = optuna.load_study(study_name="grid", storage=open_storage(storage))
    return sorted((t.state.name, tuple(sorted(t.params.items())), t.value) for t in study.get_trials())


@pytest.mark.slow
def test_two_workers_on_postgresql_run_each_grid_point_once_with_the_results_of_sqlite(tmp_path, postgres_url):
    config = tiny_config_file(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(GRID)
    outcomes = {}
    for name, storage in (("sqlite", None), ("postgresql", postgres_url)):
        output = tmp_path / name
        tune(config, str(space), trials=10, workers=2, storage=storage, study_name="grid", sampler="grid",
             pruner="none", overrides=[f"train.output_dir={output}"])  # fmt: skip
        outcomes[name] = _results(storage or f"sqlite:///{output / 'grid' / 'study.db'}")
        runs = sorted(p for p in (output / "grid").glob("trial-*"))
        assert len(runs) == 4  # one run per grid point: none lost, none run twice
        assert all((run / "train.log").read_text().count(" done: last top-1") == 1 for run in runs)
    for name, results in outcomes.items():
        assert [state for state, _, _ in results] == ["COMPLETE"] * 4, name
        assert len({params for _, params, _ in results}) == 4, name
    assert outcomes["postgresql"] == outcomes["sqlite"]


def _claim_waiting_trials(storage: str, count: int, start: float, claimed) -> None:
    study = optuna.load_study(study_name="queue", storage=open_storage(storage))
    time.sleep(max(0.0, start - time.time()))  # all workers ask at once
    numbers = []
    for _ in range(count):
        trial = study.ask()
        numbers.append(trial.number)
        try:
            study.tell(trial, 0.0)
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker ran it and told it first
            numbers.append("told twice")
    claimed.put(numbers)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_workers_asking_at_once_never_take_the_same_waiting_trial(tmp_path, kind):
    # Optuna claims a waiting trial by reading WAITING and writing RUNNING; on SQLite, without an immediate
    # transaction, four workers took the same trial (two runs of one grid point, one failed) about once in six asks
    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'study.log'}"
    workers, each = 4, 15
    study = optuna.create_study(study_name="queue", storage=open_storage(storage))
    for i in range(workers * each):
        study.enqueue_trial({"x": float(i)})
    context = multiprocessing.get_context("spawn")
    claimed = context.Queue()
    start = time.time() + 5
    processes = [
        context.Process(target=_claim_waiting_trials, args=(storage, each, start, claimed)) for _ in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [process.exitcode for process in processes] == [0] * workers
    numbers = [number for _ in processes for number in claimed.get(timeout=10)]
    assert numbers.count("told twice") == 0
    assert sorted(numbers) == list(range(workers * each))
    assert all(trial.state.name == "COMPLETE" for trial in study.get_trials())


def test_a_journal_file_storage_holds_the_study(tmp_path):
    config = tiny_config_file(tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text("method_args.temperature: {type: categorical, choices: [2.0]}\n")
    journal = tmp_path / "shared" / "study.log"
    tune(config, str(space), trials=1, storage=f"journal:{journal}", study_name="grid", sampler="grid", pruner="none")
    assert journal.is_file() and not (tmp_path / "runs" / "grid" / "study.db").exists()
    assert _results(f"journal:{journal}") == [
        ("COMPLETE", (("method_args.temperature", 2.0),), pytest.approx(10.0, abs=100))
    ]


def test_a_storage_that_is_neither_a_url_nor_a_journal_is_a_one_line_error(tmp_path):
    with pytest.raises(Exception, match=r"--storage 'study.db': give an SQLAlchemy URL .* or journal:FILE"):
        open_storage("study.db")
    with pytest.raises(
        Exception, match=r"^cannot open the study storage postgresql\+psycopg2://nobody@127.0.0.1:1/x: "
    ):
        open_storage("postgresql+psycopg2://nobody@127.0.0.1:1/x")
