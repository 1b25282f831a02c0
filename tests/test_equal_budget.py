"""The equal-budget comparison (benchmarks/accuracy/equal_budget.py) at a toy size: on the study's tiny protocol,
after its teacher and KD cell, two methods get two trials each (the first at the method's defaults) and one final
seed; the table goes between its markers into the results page, beside the study's default cell, and a second
invocation trains nothing and replaces the block instead of adding one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from test_accuracy_study import CIFAR_TARBALL, ROOT, run, small_cifar, synthetic_cifar

SCRIPT = ROOT / "benchmarks" / "accuracy" / "equal_budget.py"


def equal_budget(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _equal_budget_module():
    from test_accuracy_study import _study_module

    _study_module("study_plan")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import equal_budget
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return equal_budget


@pytest.mark.slow
def test_each_method_gets_the_same_trials_and_its_tuned_result_sits_beside_its_default(tmp_path):
    data = (small_cifar if CIFAR_TARBALL.is_file() else synthetic_cifar)(tmp_path / "cifar10_small.tar.gz")
    out, results = tmp_path / "runs", tmp_path / "docs" / "RESULTS.md"
    common = ["--protocol", "tiny", "--out", str(out), "--data-root", str(data), "--cache-dir", str(tmp_path / "c")]
    common += ["--set", "data.eval_subset=40"]  # what a 10 % validation split of 400 training images holds
    results.parent.mkdir()
    results.write_text("# Results\n\nthe study's page\n")

    run(*common, "--only", "teachers", "--no-report")
    run(*common, "--only", "method=kd", "--no-report")
    tuned = [*common, "--methods", "kd,rsd", "--trials", "2", "--seeds", "0", "--jobs", "1", "--results", str(results)]
    listed = equal_budget(*tuned, "--dry-list").stdout
    assert "todo  resnet-resmlp-kd" in listed and "2 cells" in listed, listed
    first = equal_budget(*tuned).stdout
    assert first.count("trial 0 complete") == 2 and first.count("trial 1 complete") == 2, first

    folder = out / "equal-budget"
    for method, defaults in (("kd", {"temperature": 1.0, "weight": 1.0}), ("rsd", {"weight": 0.1, "kappa": 0.01})):
        trial0 = yaml.safe_load((folder / f"resnet-resmlp-{method}" / "trial-0000" / "config.yaml").read_text())
        assert {k: trial0["method_args"][k] for k in defaults} == defaults  # the first trial runs the defaults
        assert trial0["data"]["val_fraction"] == 0.1
        final = yaml.safe_load(
            (folder / f"resnet-resmlp-{method}" / f"resnet-resmlp-{method}-best-seed0" / "config.yaml").read_text()
        )
        assert final["data"]["val_fraction"] is None and final["train"]["seed"] == 0

    page = results.read_text()
    assert page.startswith("# Results\n\nthe study's page\n")
    rows = [line for line in page.splitlines() if line.startswith("| ResNet → ResMLP |")]
    assert len(rows) == 2, page
    kd, rsd = (row.split(" | ") for row in rows)
    assert kd[2] != "-" and kd[3] != "-" and kd[6] == "2 / 0 |", kd  # the study's KD cell is the default column
    assert rsd[2] == "-" and rsd[3] != "-", rsd  # no default RSD cell was trained
    command = next(line for line in page.splitlines() if line.startswith("python benchmarks/accuracy/equal_budget.py"))
    assert "--protocol tiny" in command and "--methods kd,rsd --trials 2 --seeds 0" in command, command
    plot = results.parent / "results_tiny_equal_budget.png"
    assert plot.read_bytes().startswith(b"\x89PNG") and f"]({plot.name})" in page  # the plot beside the table

    again = equal_budget(*tuned).stdout
    assert "trial 0 complete" not in again and "2/2 trials finished" in again, again
    page = results.read_text()
    assert page.count("<!-- equal-budget:start -->") == 1 and page.count("<!-- equal-budget:end -->") == 1

    # one method at a time (as a long comparison is run) adds up: the table keeps the other cells of the folder
    equal_budget(*[a if a != "kd,rsd" else "kd" for a in tuned], "--report-only")
    page = results.read_text()
    assert [line.split(" | ")[1] for line in page.splitlines() if line.startswith("| ResNet → ResMLP |")] == [
        "KD",
        "RSD",
    ], page
    assert "--methods kd,rsd --trials 2" in page


def test_every_method_s_space_fits_its_runs_and_holds_its_defaults(tmp_path):
    """Each configs/search/methods/<method>.yaml checks against the study's run config of that method, and its
    ranges hold the defaults the study runs (the first trial), so tuning can only add to the defaults' chances."""
    from crossdistill.config import apply_overrides, build_config
    from crossdistill.engine.setup import check_run_config
    from crossdistill.search.space import read_space
    from test_accuracy_study import study_settings

    equal_budget = _equal_budget_module()
    settings = study_settings(tmp_path, methods=equal_budget.METHODS_TUNED)
    cells = equal_budget.cells(settings, equal_budget.PAIRS_TUNED, equal_budget.METHODS_TUNED)
    assert {c.method for c in cells} == set(equal_budget.METHODS_TUNED) and len(cells) == 20
    for cell in cells:

        def config(overrides, cell=cell):
            cfg = build_config(apply_overrides(cell.config, list(overrides)))
            check_run_config(cfg)
            return cfg

        params = read_space(cell.space, config)
        defaults = equal_budget.default_params(cell)
        assert set(defaults) == {p.key for p in params}
        for param in params:
            assert param.low <= defaults[param.key] <= param.high, (cell.name, param.key, defaults[param.key])


def test_the_table_replaces_its_block_keeps_the_rest_and_survives_the_study_s_rewrite(tmp_path):
    from test_accuracy_study import _study_module

    equal_budget = _equal_budget_module()
    start, end = equal_budget.START, equal_budget.END
    page = tmp_path / "new" / "RESULTS.md"
    page.parent.mkdir()
    equal_budget.write_block(page, f"{start}\nfirst\n{end}")
    assert page.read_text() == f"{start}\nfirst\n{end}\n"

    page.write_text(
        f"# Results\n\n{start}\nold\n{end}\n\n## After\n<!-- demo-seeds:start -->\nseeds\n<!-- demo-seeds:end -->\n"
    )
    equal_budget.write_block(page, f"{start}\nnew\n{end}")
    text = page.read_text()
    assert "old" not in text and text.startswith(f"# Results\n\n{start}\nnew\n{end}\n\n## After\n")
    kept = _study_module("study_report").kept_blocks(page)  # what the study's rewrite of the page carries over
    assert f"{start}\nnew\n{end}" in kept and "seeds" in kept

    page.write_text(f"# Results\n{start}\nno end\n")
    with pytest.raises(SystemExit, match="unpaired or repeated"):
        equal_budget.write_block(page, f"{start}\nnew\n{end}")


def test_a_study_teacher_without_its_weights_is_named_before_any_trial(tmp_path):
    out = tmp_path / "runs"
    (out / "teacher-resnet_t").mkdir(parents=True)
    (out / "teacher-resnet_t" / "summary.json").write_text("{}")  # as the archive keeps it: no last.pt
    args = ["--protocol", "tiny", "--out", str(out), "--methods", "kd", "--results", str(tmp_path / "RESULTS.md")]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "teacher-resnet_t: finished in" in proc.stderr and "without its weights (last.pt" in proc.stderr
    assert not (out / "equal-budget").exists()


@pytest.mark.parametrize("stop, code", [("preempted", 75), ("error", 1)])
def test_a_stopped_or_failed_cell_ends_the_command_with_one_line_and_its_exit_code(
    tmp_path, monkeypatch, capsys, stop, code
):
    from crossdistill.engine.preemption import Preempted
    from crossdistill.errors import CrossDistillError

    equal_budget = _equal_budget_module()

    def stopped(*args, **kwargs):
        if stop == "preempted":
            raise Preempted("stopped by a signal (SIGTERM/SIGUSR1): run the same command again", checkpoint="")
        raise CrossDistillError("worker 1 (exit code 1) stopped with an error")

    monkeypatch.setattr(equal_budget, "run_cell", stopped)
    out = tmp_path / "runs"
    (out / "teacher-resnet_t").mkdir(parents=True)
    for name in ("summary.json", "last.pt"):
        (out / "teacher-resnet_t" / name).write_text("{}")
    results = tmp_path / "RESULTS.md"
    args = ["--protocol", "tiny", "--out", str(out), "--methods", "kd", "--results", str(results)]
    assert equal_budget.main(args) == code
    err = capsys.readouterr().err
    assert err.startswith("equal_budget.py: resnet-resmlp-kd: ") and err.count("\n") == 1, err
    assert not results.exists()  # no table from a study that stopped
