"""crossdistill plot (training curves) and report (markdown table, seeds grouped as mean ± std)."""

import csv
import io
import json
import statistics

import pytest

from conftest import tiny_run
from crossdistill.cli import main
from crossdistill.config import build_config
from crossdistill.engine import train
from crossdistill.plots import is_loss_term, plot_runs, read_metrics, run_labels
from crossdistill.report import group_runs, mean_std, read_run, report_rows

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Two real runs of one config (RSD, with EMA) that differ only in the seed."""
    tmp = tmp_path_factory.mktemp("seeds")
    dirs = []
    for seed in (1, 2):
        cfg = tiny_run(
            tmp,
            train={"epochs": 2, "seed": seed, "run_name": f"rsd-s{seed}", "ema_decay": 0.5},
            data={"train_subset": 64, "eval_subset": 40},
        )
        train(build_config(cfg), out=io.StringIO())
        dirs.append(tmp / "runs" / f"rsd-s{seed}")
    return dirs


def fake_run(root, name, *, seed, last, best, method="rsd", lr=2e-3, wall=10.0, epochs=3, method_args=None):
    """A run directory with a real config.yaml and a summary.json / metrics.csv holding chosen numbers."""
    raw = tiny_run(root, method=method, train={"seed": seed, "run_name": name, "epochs": epochs}, optim={"lr": lr})
    if method_args:
        raw["method_args"] = method_args
    cfg = build_config(raw)
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    summary = {
        "run_dir": str(run_dir),
        "epochs": epochs,
        "last_top1": last,
        "best_top1": best,
        "best_epoch": epochs,
        "last_top5": 99.0,
        "ema_last_top1": None,
        "ema_best_top1": None,
        "wall_time_s": wall,
        "extra_parameters": 31104 if method == "rsd" else 0,
        "student_parameters": 373658,
        "history": [],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with (run_dir / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["epoch", "lr", "train_ce", "train_loss", "train_rsd", "eval_top1", "eval_top5", "epoch_time_s"]
        )
        for e in range(1, epochs + 1):
            writer.writerow([e, lr / e, 2.0 / e, 3.0 / e, 1.0 / e, best * e / epochs, 99.0, 1.0])
    return run_dir


# ---------------------------------------------------------------- plot


def test_plot_two_real_runs(seeds, tmp_path, capsys):
    code = main(["plot", *map(str, seeds), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    png = tmp_path / "curves.png"
    assert code == 0 and f"wrote {png} (2 runs)" in out
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 30_000
    rows = read_metrics(seeds[0])
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert {"train_loss", "train_ce", "train_rsd", "eval_top1", "ema_top1", "lr"} <= set(rows[0])


def test_plot_default_name_in_the_current_directory_and_png_path(seeds, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(seeds[0])]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
    assert main(["plot", str(seeds[0]), "--out", str(tmp_path / "sub" / "one.png")]) == 0
    assert (tmp_path / "sub" / "one.png").is_file()


def test_plot_errors(tmp_path, capsys):
    (tmp_path / "notarun").mkdir()
    code = main(["plot", str(tmp_path / "notarun")])
    err = capsys.readouterr().err
    assert code == 2 and "has no metrics.csv" in err and "Traceback" not in err


def test_labels_and_loss_terms():
    assert run_labels(["/a/x/run", "/a/y/run"]) == ["x/run", "y/run"]
    assert run_labels(["/a/rsd", "/a/scratch"]) == ["rsd", "scratch"]
    assert is_loss_term("train_rsd") and is_loss_term("train_loss") and not is_loss_term("train_grad_norm")


def test_plot_synthetic_runs_with_different_terms(tmp_path):
    a = fake_run(tmp_path, "rsd", seed=1, last=50.0, best=51.0)
    b = fake_run(tmp_path, "scratch", seed=1, last=40.0, best=41.0, method="vanilla", epochs=5)
    path = plot_runs([a, b], tmp_path / "c.png")
    assert path.read_bytes()[:8] == PNG


# ---------------------------------------------------------------- report


def test_report_groups_two_real_seeds(seeds, tmp_path, capsys):
    code = main(["report", *map(str, seeds), "--csv", str(tmp_path / "r.csv")])
    out = capsys.readouterr().out
    assert code == 0
    summaries = [json.loads((d / "summary.json").read_text()) for d in seeds]
    last = [s["last_top1"] for s in summaries]
    best = [s["best_top1"] for s in summaries]
    table = [line for line in out.splitlines() if line.startswith("| test_vit")]
    assert len(table) == 1  # one row: the two seeds share everything else
    assert f"{statistics.fmean(last):.2f} ± {statistics.stdev(last):.2f}" in table[0]
    assert f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}" in table[0]
    assert "| 1, 2 |" in table[0] and "weight=0.1" in table[0] and "31.1k" in table[0]
    assert "EMA best top-1" in out
    with open(tmp_path / "r.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["n"] == "2" and rows[0]["seeds"] == "1 2"
    assert float(rows[0]["last_top1_mean"]) == pytest.approx(statistics.fmean(last))
    assert float(rows[0]["last_top1_std"]) == pytest.approx(statistics.stdev(last))


def test_report_mean_std_and_grouping_with_known_numbers(tmp_path):
    dirs = [
        fake_run(tmp_path, "rsd-s1", seed=1, last=70.0, best=71.0, wall=100.0),
        fake_run(tmp_path, "rsd-s2", seed=2, last=72.0, best=74.0, wall=200.0),
        fake_run(tmp_path, "rsd-s3", seed=3, last=77.0, best=77.0, wall=300.0),
        fake_run(tmp_path, "rsd-lr-s1", seed=1, last=60.0, best=61.0, lr=1e-2),
        fake_run(tmp_path, "kappa-s1", seed=1, last=65.0, best=66.0, method_args={"kappa": 0.02}),
        fake_run(tmp_path, "scratch-s1", seed=1, last=50.0, best=52.0, method="vanilla"),
        fake_run(tmp_path, "scratch-s2", seed=2, last=54.0, best=54.0, method="vanilla"),
    ]
    assert len(group_runs([read_run(d) for d in dirs])) == 4  # rsd x3, rsd lr=1e-2, rsd kappa=0.02, scratch x2
    rows = report_rows([tmp_path / "runs"])  # a directory of runs stands for all of them
    by_runs = {tuple(r["runs"][i].rsplit("/", 1)[-1] for i in range(len(r["runs"]))): r for r in rows}
    rsd = by_runs[("rsd-s1", "rsd-s2", "rsd-s3")]
    assert rsd["last_top1_mean"] == pytest.approx(73.0)
    assert rsd["last_top1_std"] == pytest.approx(statistics.stdev([70.0, 72.0, 77.0]))  # sample std, n - 1
    assert rsd["best_top1_mean"] == pytest.approx(74.0) and rsd["best_top1_std"] == pytest.approx(3.0)
    assert rsd["wall_time_s_mean"] == pytest.approx(200.0) and rsd["seeds"] == [1, 2, 3]
    assert "optim.lr=0.002" in rsd["other"]
    assert by_runs[("rsd-lr-s1",)]["last_top1_std"] is None
    assert "kappa=0.02" in by_runs[("kappa-s1",)]["method_args"]
    scratch = by_runs[("scratch-s1", "scratch-s2")]
    assert scratch["teacher"] == "-" and scratch["extra_parameters"] == 0
    assert scratch["last_top1_mean"] == pytest.approx(52.0) and scratch["last_top1_std"] == pytest.approx(2**1.5)


def test_report_markdown_formatting(tmp_path, capsys):
    fake_run(tmp_path, "a", seed=1, last=70.0, best=71.0)
    fake_run(tmp_path, "b", seed=2, last=72.0, best=74.0)
    assert main(["report", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| test_vit"))
    assert "| 71.00 ± 1.41 | 72.50 ± 2.12 |" in row and "| a, b |" in row
    assert out.splitlines()[1].startswith("|---|")


def test_report_warns_when_one_seed_is_counted_twice_in_a_row(tmp_path, capsys):
    fake_run(tmp_path, "a", seed=1, last=70.0, best=71.0)
    fake_run(tmp_path, "a-again", seed=1, last=70.0, best=71.0)  # a rerun of the same seed
    fake_run(tmp_path, "b", seed=2, last=72.0, best=74.0)
    fake_run(tmp_path, "scratch", seed=1, last=50.0, best=52.0, method="vanilla")
    assert main(["report", str(tmp_path / "runs")]) == 0
    captured = capsys.readouterr()
    assert "| 1, 1, 2 |" in captured.out
    assert captured.err.splitlines() == [
        "crossdistill: warning: seed 1 appears in 2 runs of the rsd row (a, a-again): each counts in its mean ± std, "
        "although a seed run again repeats an experiment instead of sampling another; report one run per seed"
    ]


def test_a_run_named_twice_is_counted_once(tmp_path, capsys):
    """``report runs runs/a`` (or a link to a run) counted run a twice: an extra sample, a narrower std."""
    fake_run(tmp_path, "a", seed=1, last=70.0, best=71.0)
    fake_run(tmp_path, "b", seed=2, last=72.0, best=74.0)
    (tmp_path / "link-to-a").symlink_to(tmp_path / "runs" / "a")
    runs = tmp_path / "runs"
    assert main(["report", str(runs), str(runs / "a"), str(tmp_path / "link-to-a"), str(runs / ".." / "runs")]) == 0
    captured = capsys.readouterr()
    assert "| 1, 2 |" in captured.out and "| 71.00 ± 1.41 |" in captured.out and captured.err == ""


def test_report_unfinished_run_is_a_clear_error(tmp_path, capsys):
    run = fake_run(tmp_path, "a", seed=1, last=70.0, best=71.0)
    (run / "summary.json").unlink()
    code = main(["report", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "has no summary.json" in err and "--resume" in err


def test_mean_std_of_one_and_none():
    assert mean_std([3.0]) == (3.0, None, 1)
    assert mean_std([None, float("nan"), 2.0, 4.0])[:2] == (3.0, pytest.approx(2**0.5))


def test_missing_matplotlib_is_an_install_hint(seeds, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    code = main(["plot", str(seeds[0]), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'crossdistill[analysis]'" in err and "Traceback" not in err
    assert not (tmp_path / "curves.png").exists()


def test_a_full_disk_under_plot_and_report_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    import errno
    import os

    import matplotlib.figure

    from crossdistill import files

    run = fake_run(tmp_path, "rsd", seed=1, last=50.0, best=51.0)
    png, table = tmp_path / "curves.png", tmp_path / "r.csv"
    png.write_bytes(b"an earlier plot")
    table.write_text("an earlier table")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_file(fd, tmp):
        os.close(fd)
        full_disk()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    monkeypatch.setattr(files, "_open_temporary", full_file)
    for command, path in (
        (["plot", str(run), "--out", str(png)], png),
        (["report", str(run), "--csv", str(table)], table),
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err == (
            f"crossdistill: error: no space left on the device while writing {path}; the previous version "
            "of this file is intact. Free some space (or write to another disk) and run the command again.\n"
        )
    assert png.read_bytes() == b"an earlier plot" and table.read_text() == "an earlier table"
