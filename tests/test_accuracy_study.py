"""The accuracy study's runner (benchmarks/accuracy/run_study.py) end to end on its tiny protocol.

A few hundred real CIFAR-10 images (taken from the shared JPEG tarball into a small archive, so the
test does not decode all 60,000; synthetic images of the same layout where the tarball is absent), one
epoch, one seed, one pair, three methods and a 2 x 2 RSD grid:
it must write the results page with its table and both PNGs, mark it as a smoke test, skip finished
runs when invoked again, and list the cpu and gpu plans (whose configs must validate). The plan takes
method defaults and teacher needs from the package, not from copies.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "accuracy" / "run_study.py"
CIFAR_TARBALL = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10_jpg.tar.gz"

PER_CLASS = {"train": 40, "test": 20}  # 400 training and 200 test images


def small_cifar(path: Path) -> Path:
    """An ImageFolder .tar.gz with the first PER_CLASS[split] images of every class of the shared tarball."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TARBALL, "r|gz") as src, tarfile.open(path, "w:gz") as dst:
        for member in src:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            if split not in PER_CLASS or counts.get((split, cls), 0) >= PER_CLASS[split]:
                continue
            counts[(split, cls)] = counts.get((split, cls), 0) + 1
            data = src.extractfile(member).read()
            info = tarfile.TarInfo(f"{split}/{cls}/{parts[-1]}")
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    assert len(counts) == 20 and all(counts[k] == PER_CLASS[k[0]] for k in counts), counts
    return path


def synthetic_cifar(path: Path) -> Path:
    """Where the shared tarball is absent (a checkout without ../shared): an archive of the same layout,
    10 classes of 32x32 JPEGs with a class-dependent colour and noise, PER_CLASS[split] images each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as dst:
        for split, count in PER_CLASS.items():
            for label in range(10):
                colour = rng.integers(0, 256, 3)
                for i in range(count):
                    pixels = np.clip(colour + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/class{label}/{i:04d}.jpg")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    dst.addfile(info, buffer)
    return path


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.mark.slow
def test_tiny_protocol_end_to_end(tmp_path):
    make = small_cifar if CIFAR_TARBALL.is_file() else synthetic_cifar
    data = make(tmp_path / "cifar10_small.tar.gz")
    out, docs, cache = tmp_path / "runs", tmp_path / "docs", tmp_path / "cache"
    common = [
        "--protocol",
        "tiny",
        "--out",
        str(out),
        "--docs-dir",
        str(docs),
        "--data-root",
        str(data),
        "--cache-dir",
        str(cache),
    ]

    listed = run(*common, "--dry-list").stdout
    assert "teacher-resnet_t" in listed and "todo" in listed and "estimated" in listed

    first = run(*common).stdout
    lines = [line for line in first.splitlines() if line.startswith("[")]
    # teacher, scratch, kd, rsd (= the grid's default cell) and 3 more grid cells
    assert len(lines) == 7, first
    assert all("top-1 last" in line and "ETA" in line for line in lines), first
    logged = [json.loads(line) for line in (out / "study_log.jsonl").read_text().splitlines()]
    runs_logged = [event for event in logged if event["event"] == "run"]
    # each run's own CPU seconds, from which speeds can be read on a shared machine
    assert len(runs_logged) == 7 and all(e["cpu_s"] > 0 and e["resumed"] is False for e in runs_logged), runs_logged

    md = (docs / "RESULTS_TINY.md").read_text()
    assert "SMOKE TEST OUTPUT, NOT RESULTS" in md
    assert "| ResNet → ResMLP |" in md  # the pairs x methods table
    assert "| pair (teacher → student) | teacher | Scratch | KD | RSD |" in md
    assert "lambda \\ kappa" in md and "python benchmarks/accuracy/run_study.py --protocol tiny" in md
    for png in ("results_tiny_accuracy.png", "results_tiny_sensitivity.png"):
        blob = (docs / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 10_000, png
    summary = json.loads((out / "resnet-resmlp-rsd-s0" / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["last_top1"] <= 100.0
    assert (out / "configs" / "resnet-resmlp-rsd-s0.yaml").is_file()

    again = run(*common).stdout  # resumable: everything is skipped
    assert "7 of 7 selected runs already finished" in again and "top-1 last" not in again


def _runner_module():
    sys.path.insert(0, str(RUNNER.parent))
    try:
        import run_study
    finally:
        sys.path.remove(str(RUNNER.parent))
    return run_study


def _study_module(name: str):
    """One of the runner's modules (``study_plan``, ...); importing the runner puts their folder on the path."""
    import importlib

    _runner_module()
    return importlib.import_module(name)


def study_settings(out: Path, protocol: str = "cpu", methods=("vanilla", "kd", "rsd"), **fields):
    """The study's Settings for planning and reporting in a test (nothing trains): cpu device, two workers, the
    default data path; ``fields`` sets the rest (e.g. ``kept``)."""
    protocols, plan = _study_module("study_protocols"), _study_module("study_plan")
    return plan.Settings(
        protocol=protocols.PROTOCOLS[protocol],
        out=out,
        data_root=str(protocols.DEFAULT_DATA),
        dataset="folder",
        cache_dir=None,
        teacher_cache=True,
        device="cpu",
        methods=tuple(methods),
        jobs=2,
        **fields,
    )


def test_cpu_and_gpu_plans_validate(tmp_path, capsys):
    """Both real protocols with their teachers trained in the study: 109 runs whose configs validate, planned within
    their time limits."""
    runner = _runner_module()
    for protocol, limit in (("cpu", 90), ("gpu", 9)):
        args = ["--protocol", protocol, "--out", str(tmp_path / protocol), "--dry-list", "--train-teachers"]
        assert runner.main(args) == 0
        text = capsys.readouterr().out
        assert "109 runs listed, 0 done" in text, text
        assert f"(limit {limit} min: fits)" in text, text
    runner.main(["--protocol", "cpu", "--out", str(tmp_path / "cpu"), "--dry-list", "--only", "pair=vit-resnet"])
    only = capsys.readouterr().out
    assert "teacher-vit_t" in only and "resnet-vit-kd-s0" not in only and "vit-resnet-rsd-s2" in only
    assert "scratch-resnet_s-s0" in only and "teacher-resnet_t" not in only


def test_crd_keeps_the_official_share_of_negatives_per_training_image():
    # the official CIFAR-100 run: 16,384 negatives out of 50,000 images; the cpu protocol trains on 4,992
    plan_module, protocols = _study_module("study_plan"), _study_module("study_protocols")
    cpu, gpu = protocols.PROTOCOLS["cpu"], protocols.PROTOCOLS["gpu"]
    assert plan_module.method_args_for("crd", "vit_s", cpu)["num_negatives"] == 2048
    assert plan_module.method_args_for("crd", "vit_s", gpu)["num_negatives"] == 16384
    assert protocols.crd_negatives(10**6) == 16384  # never above the method's default


def test_method_defaults_and_teacher_needs_come_from_the_package(tmp_path, monkeypatch):
    """The study copies no method facts: a changed method default or teacher declaration changes its plan."""
    import dataclasses

    from crossdistill.distillers import METHODS
    from crossdistill.distillers.kd import KDConfig
    from crossdistill.models import TeacherRequest

    plan_module = _study_module("study_plan")
    monkeypatch.setattr(plan_module, "teacher_outputs", plan_module.teacher_outputs.__wrapped__)  # uncached

    @dataclasses.dataclass
    class HotterKD(KDConfig):
        temperature: float = 4.0

    monkeypatch.setattr(METHODS.get("kd"), "config_cls", HotterKD)
    monkeypatch.setattr(
        METHODS.get("kd"),
        "teacher_request",  # as if KD read teacher stage features
        lambda self: TeacherRequest(stages=(-1,)),
    )
    settings = study_settings(tmp_path, "tiny")
    runs = {run.name: run for run in plan_module.build_plan(settings)}
    kd, rsd = runs["resnet-resmlp-kd-s0"], runs["resnet-resmlp-rsd-s0"]
    assert kd.config["method_args"] == {"temperature": 4.0, "weight": 1.0, "ce_weight": 1.0}
    assert plan_module.teacher_outputs("kd") == ()  # nothing of KD's is cached any more
    assert plan_module.teacher_outputs("rsd") == ("embedding",)
    assert rsd.config["method_args"] == {"weight": 0.1, "kappa": 0.01, "gamma": 2}
    assert plan_module.method_args_for("ofa", "resnet_s", settings.protocol)["w_ofa"] == 0.1  # a stated override


def _fake_training(study_run, monkeypatch, fails=()):
    """``train_job`` replaced by one that records the order and writes summary.json, unless the run is in ``fails``."""
    trained = []

    def train_job(root, job, *_):
        trained.append(job.name)
        if job.name not in fails:
            (root / job.name).mkdir(parents=True, exist_ok=True)
            (root / job.name / "summary.json").write_text("{}")

    monkeypatch.setattr(study_run, "train_job", train_job)
    monkeypatch.setattr(study_run, "POLL_S", 0.0)
    return trained


def test_a_student_waits_for_its_teacher_that_the_worker_has_not_tried_yet(tmp_path, monkeypatch, capsys):
    """Worker 1 of 2 starts at the second job: the student comes before its teacher in its order, so it waits for
    the teacher and is trained after it (not reported as lacking one); no barrier holds the unrelated run."""
    study_run = _study_module("study_run")
    trained = _fake_training(study_run, monkeypatch)
    jobs = [
        study_run.StudyJob("teacher", "teacher", 10.0),
        study_run.StudyJob("student", "student", 5.0, needs=("teacher",)),
        study_run.StudyJob("scratch", "scratch", 5.0),
    ]
    study_run.train_jobs(str(tmp_path), jobs, {}, None, "test", 0.0, worker=1, workers=2)
    assert trained == ["scratch", "teacher", "student"]
    assert "not trained" not in capsys.readouterr().out


def test_a_student_whose_teacher_failed_is_reported_not_trained(tmp_path, monkeypatch, capsys):
    study_run = _study_module("study_run")
    trained = _fake_training(study_run, monkeypatch, fails=("teacher",))
    jobs = [
        study_run.StudyJob("teacher", "teacher", 10.0),
        study_run.StudyJob("student", "the student", 5.0, needs=("teacher",)),
    ]
    study_run.train_jobs(str(tmp_path), jobs, {}, None, "test", 0.0, worker=0, workers=1)
    assert trained == ["teacher"]
    assert "the student: not trained, it needs teacher, which did not finish" in capsys.readouterr().out


class _Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_a_workers_line_is_one_write(tmp_path, monkeypatch):
    # the workers share stdout; where it is unbuffered, print wrote the text and the newline apart, and two
    # workers' lines ran together (the width sweep's test counted 13 lines for 14 runs)
    study_run = _study_module("study_run")
    _fake_training(study_run, monkeypatch, fails=("teacher",))
    monkeypatch.setattr(sys, "stdout", out := _Writes())
    jobs = [study_run.StudyJob("teacher", "teacher", 10.0), study_run.StudyJob("student", "x", 5.0, ("teacher",))]
    study_run.train_jobs(str(tmp_path), jobs, {}, None, "test", 0.0, worker=0, workers=1)
    assert out.calls == ["x: not trained, it needs teacher, which did not finish\n"]


def test_the_estimate_is_grahams_bound_with_the_teacher_before_its_student(tmp_path):
    plan_module, protocols = _study_module("study_plan"), _study_module("study_protocols")

    def run(name, est_s, needs=()):
        return plan_module.Run(name, "cells", "kd", 0, "resnet_s", None, (), {}, needs=needs, est_s=est_s)

    settings = plan_module.Settings(
        protocols.PROTOCOLS["tiny"], tmp_path, str(tmp_path), "folder", None, True, "cpu", ("kd",), jobs=2
    )
    runs = [run("teacher", 100.0), run("student", 50.0, needs=("teacher",)), run("other", 10.0)]
    assert plan_module.estimate_wall(settings, runs) == pytest.approx(160 / 2 + 0.5 * 150)
    assert plan_module.estimate_wall(settings, []) == 0.0


def test_the_eta_spreads_what_is_left_over_the_workers_at_the_slowdown_measured_so_far():
    study_run = _study_module("study_run")
    log = [
        {"event": "invocation", "invocation": "now"},
        {"event": "run", "invocation": "now", "run": "a", "seconds": 300.0, "est_s": 100.0, "ok": True},
        {"event": "run", "invocation": "now", "run": "b", "seconds": 100.0, "est_s": 100.0, "ok": True},
        {"event": "run", "invocation": "now", "run": "c", "seconds": 9.0, "est_s": 100.0, "ok": True, "resumed": True},
        {"event": "run", "invocation": "now", "run": "d", "seconds": 1.0, "est_s": 100.0, "ok": False},
        {"event": "run", "invocation": "before", "run": "e", "seconds": 900.0, "est_s": 100.0, "ok": True},
    ]
    left = {"f": 60.0, "g": 40.0}
    assert study_run.eta_seconds(log, "now", left, workers=2) == pytest.approx(100 / 2 * 2.0)
    assert study_run.eta_seconds(log, "later", left, workers=2) == pytest.approx(50.0)  # nothing finished yet
    assert study_run.eta_seconds(log, "now", {}, workers=2) == 0.0


def test_the_studys_rewrite_keeps_the_takeaways_under_the_title_and_the_other_blocks_at_the_end(tmp_path):
    plan_mod, report = _study_module("study_plan"), _study_module("study_report")
    settings = study_settings(tmp_path / "runs")
    docs = tmp_path / "docs"
    docs.mkdir()
    takeaways = "<!-- takeaways:start -->\n## What to take away\n\n- try DIST first\n<!-- takeaways:end -->"
    tuned = "<!-- equal-budget:start -->\n## Equal budget\n<!-- equal-budget:end -->"
    (docs / "RESULTS.md").write_text(f"# Old title\n\n## Setup\n\nstale setup text\n\n{takeaways}\n\n{tuned}\n")

    page = report.write_report(settings, plan_mod.build_plan(settings), docs).read_text()
    assert page.startswith(f"# Cross-architecture accuracy study\n\n{takeaways}\n\n")
    assert page.count("<!-- takeaways:start -->") == 1 and "stale setup text" not in page
    assert page.rstrip("\n").endswith(tuned)

    again = report.write_report(settings, plan_mod.build_plan(settings), docs).read_text()
    assert again == page


def test_a_finished_teacher_without_its_weights_stops_the_study_before_any_student_trains(tmp_path):
    """Archived run folders (benchmarks/accuracy/results/) keep no checkpoints: copied into an output folder, the
    teacher counts as finished, and every student would fail on the missing last.pt."""
    plan_mod, study_run = _study_module("study_plan"), _study_module("study_run")
    settings = study_settings(tmp_path / "runs")
    students = [r for r in plan_mod.build_plan(settings) if r.needs == ("teacher-resnet_t",)]
    teacher = settings.out / "teacher-resnet_t"
    teacher.mkdir(parents=True)
    (teacher / "summary.json").write_text("{}")

    with pytest.raises(SystemExit, match=r"teacher-resnet_t: finished in .* but without its weights \(last.pt"):
        study_run.execute(settings, students, "run_study.py")
    assert not (settings.out / "logs").exists() and not (settings.out / students[0].name).exists()

    (teacher / "last.pt").write_bytes(b"weights")
    plan_mod.check_teacher_weights(settings, ["teacher-resnet_t", "teacher-vit_t"])  # vit_t: not finished, to train


@pytest.mark.parametrize(
    "kind, code, line",
    [
        ("interrupt", 130, ""),
        ("preempted", 75, "run_study.py: cell-a: stopped by a signal\n"),
        ("error", 1, "run_study.py: cell-a: error: a run stopped\n"),
        ("bug", None, ""),
    ],
)
def test_a_stopped_study_ends_with_one_line_and_its_exit_code(kind, code, line, capsys):
    from crossdistill.engine.preemption import EXIT_PREEMPTED, Preempted
    from crossdistill.errors import CrossDistillError

    errors = {
        "interrupt": KeyboardInterrupt(),
        "preempted": Preempted("stopped by a signal", checkpoint=""),
        "error": CrossDistillError("a run\nstopped"),
        "bug": ValueError("a fault of the script"),
    }
    assert EXIT_PREEMPTED == 75
    assert _study_module("study_run").stop_code(errors[kind], "run_study.py", "cell-a") == code
    assert capsys.readouterr().err == line
