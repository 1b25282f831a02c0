"""Kept teachers of the accuracy study (benchmarks/accuracy/study_teachers.py): a finished teacher run is kept as
safetensors with a manifest; the study's students start from it (no teacher run in the plan), its SHA-256 is
checked before anything trains, and an existing kept teacher is replaced only on request."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run
from crossdistill.config import ModelConfig, build_config
from crossdistill.engine import train
from crossdistill.models.factory import create_model
from test_accuracy_study import _runner_module, _study_module, study_settings


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """The study's kept resnet_t architecture trained alone for one short epoch on the digits."""
    _study_module("study_models")  # registers resnet18_cifar
    protocols = _study_module("study_protocols")
    spec = protocols.teacher_model("resnet_t", kept=True)
    tmp = tmp_path_factory.mktemp("teacher")
    normalisation = {"mean": list(protocols.CIFAR10_MEAN), "std": list(protocols.CIFAR10_STD)}
    cfg = tiny_run(
        tmp,
        method="vanilla",
        student={"name": spec.name, "kwargs": copy.deepcopy(spec.kwargs)},
        data={"train_subset": 64, "eval_subset": 40, **normalisation},
        train={"epochs": 1, "run_name": "resnet_t", "device": "auto"},
    )
    train(build_config(cfg), out=io.StringIO())
    return tmp / "runs" / "resnet_t"


@pytest.fixture
def kept_dir(tmp_path, teacher_run) -> Path:
    folder = tmp_path / "teachers"
    folder.mkdir()
    shutil.copyfile(teacher_run / "config.yaml", folder / "resnet_t.yaml")  # the config that trained it
    _study_module("study_teachers").keep(teacher_run, "resnet_t", folder)
    return folder


def test_a_kept_teacher_has_the_run_s_last_weights_and_a_manifest(kept_dir, teacher_run):
    teachers = _study_module("study_teachers")
    kept = teachers.kept_teachers(kept_dir)["resnet_t"]
    teachers.verify(kept)
    manifest = json.loads((kept_dir / "resnet_t.json").read_text())
    summary = json.loads((teacher_run / "summary.json").read_text())
    assert manifest["sha256"] == teachers.sha256_of(kept_dir / "resnet_t.safetensors")
    assert manifest["last_top1"] == summary["last_top1"] and manifest["epochs"] == 1
    assert manifest["config"] == "resnet_t.yaml" and manifest["train_images"] == 64
    assert manifest["trained_with"]["device"] == "cpu"  # what "auto" chose, from the run's train.log
    assert (
        manifest["command"]
        == "python benchmarks/accuracy/study_models.py train --config benchmarks/accuracy/teachers/resnet_t.yaml"
    )

    spec = _study_module("study_protocols").teacher_model("resnet_t", kept=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, path in (("kept", kept.weights), ("run", teacher_run / "last.pt")):
        model = create_model(ModelConfig(name=spec.name, kwargs=spec.kwargs, checkpoint=str(path)), 10).eval()
        with torch.no_grad():
            logits[name] = model(x)
    assert torch.equal(logits["kept"], logits["run"])


def test_keeping_again_needs_replace_and_a_run_of_another_model_is_refused(kept_dir, teacher_run, tmp_path):
    teachers = _study_module("study_teachers")
    with pytest.raises(teachers.KeptTeacherError, match="already keeps a resnet_t teacher; pass --replace"):
        teachers.keep(teacher_run, "resnet_t", kept_dir)
    assert teachers.keep(teacher_run, "resnet_t", kept_dir, replace=True).key == "resnet_t"
    (kept_dir / "resnet_s.yaml").write_text("")
    with pytest.raises(teachers.KeptTeacherError, match="the study's resnet_s is resnet18"):
        teachers.keep(teacher_run, "resnet_s", kept_dir)
    with pytest.raises(teachers.KeptTeacherError, match="no summary.json"):
        teachers.keep(tmp_path, "resnet_t", kept_dir, replace=True)

    config = yaml.safe_load((kept_dir / "resnet_t.yaml").read_text())
    config["train"]["epochs"] = 40  # the kept config says 40 epochs, the run trained 1
    (kept_dir / "resnet_t.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(teachers.KeptTeacherError, match=r"was not trained with .*resnet_t.yaml: train.epochs: run 1"):
        teachers.keep(teacher_run, "resnet_t", kept_dir, replace=True)


def test_a_teacher_normalised_unlike_the_study_s_students_is_not_kept(teacher_run, tmp_path):
    teachers = _study_module("study_teachers")
    run = tmp_path / "run"
    shutil.copytree(teacher_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["mean"], config["data"]["std"] = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "resnet_t.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(teachers.KeptTeacherError, match=r"normalised its inputs with mean \[0.5, 0.5, 0.5\]"):
        teachers.keep(run, "resnet_t", tmp_path)


def test_the_shipped_teacher_configs_train_the_study_s_models():
    from crossdistill.config import build_config

    protocols = _study_module("study_protocols")
    folder = Path(protocols.__file__).parent / "teachers"
    configs = sorted(folder.glob("*.yaml"))
    assert {p.stem for p in configs} >= {"resnet_t", "vit_t"}
    for path in configs:
        cfg = build_config(yaml.safe_load(path.read_text()))
        spec = protocols.teacher_model(path.stem, kept=True)
        assert (cfg.student.name, cfg.student.kwargs, cfg.method) == (spec.name, spec.kwargs, "vanilla"), path
        assert (tuple(cfg.data.mean), tuple(cfg.data.std)) == (protocols.CIFAR10_MEAN, protocols.CIFAR10_STD)
        assert cfg.data.train_subset is None and cfg.data.root == "../shared/data/cifar10_jpg.tar.gz", path


def test_students_start_from_the_kept_teacher_and_no_teacher_run_is_planned(kept_dir, tmp_path):
    plan_mod = _study_module("study_plan")
    kept = _study_module("study_teachers").kept_teachers(kept_dir)
    settings = study_settings(tmp_path / "runs", kept=kept)
    plan = {run.name: run for run in plan_mod.build_plan(settings)}
    assert "teacher-resnet_t" not in plan and "teacher-vit_t" in plan  # only resnet_t is kept here
    student = plan["resnet-vit-kd-s0"]
    assert student.config["teacher"]["checkpoint"] == str(kept_dir / "resnet_t.safetensors")
    assert student.config["teacher"]["name"] == "resnet18_cifar"  # the kept architecture, not the study's own
    assert student.needs == ()
    assert plan["vit-resnet-kd-s0"].needs == ("teacher-vit_t",)
    trained = plan_mod.build_plan(dataclasses.replace(settings, kept={}))
    trained_kd = next(r for r in trained if r.name == "resnet-vit-kd-s0")
    assert trained_kd.config["teacher"]["name"] == "resnet18"
    assert student.est_s > trained_kd.est_s  # the kept architecture's slower forward (the first run computes it)
    assert sum(run.est_s for run in trained) > sum(run.est_s for run in plan.values())


def test_the_runner_refuses_a_kept_teacher_whose_weights_changed(kept_dir, tmp_path, capsys):
    runner = _runner_module()
    args = ["--protocol", "cpu", "--out", str(tmp_path / "out"), "--teachers-dir", str(kept_dir), "--dry-list"]
    assert runner.main(args) == 0
    listed = capsys.readouterr().out
    assert "teacher-resnet_t" not in listed and f"teacher resnet_t: kept, {kept_dir / 'resnet_t.safetensors'}" in listed
    assert runner.main([*args, "--train-teachers"]) == 0
    assert "teacher-resnet_t" in capsys.readouterr().out

    weights = kept_dir / "resnet_t.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(
        SystemExit, match=r"kept teacher resnet_t: .* has SHA-256 .*, its manifest says .*--train-teachers"
    ):
        runner.main(args)
    weights.unlink()
    with pytest.raises(SystemExit, match="is missing; restore it, or run the study with --train-teachers"):
        runner.main(args)


def test_a_folder_of_students_of_a_trained_teacher_is_not_reused_with_a_kept_one(kept_dir, tmp_path, capsys):
    """Resuming or re-reporting a folder whose students learnt from the study's own teacher, now that a kept teacher
    exists, stops with what to pass; so does a folder whose kept teacher was replaced since."""
    runner, study_run = _runner_module(), _study_module("study_run")
    out = tmp_path / "out"
    common = ["--protocol", "cpu", "--out", str(out), "--teachers-dir", str(kept_dir)]
    runner.main([*common, "--train-teachers", "--dry-list", "--only", "run=resnet-vit-kd-s0"])
    capsys.readouterr()
    plan_mod = _study_module("study_plan")
    trained = plan_mod.build_plan(study_settings(out, methods=_study_module("study_protocols").STUDY_METHODS))
    student = next(run for run in trained if run.name == "resnet-vit-kd-s0")
    student.run_dir.mkdir(parents=True)
    (student.run_dir / "config.yaml").write_text(yaml.safe_dump(student.config))
    with pytest.raises(SystemExit, match="distilled from a teacher trained in the study.*pass --train-teachers"):
        runner.main([*common, "--report-only", "--docs-dir", str(tmp_path / "docs")])
    assert runner.main([*common, "--train-teachers", "--report-only", "--docs-dir", str(tmp_path / "docs")]) == 0

    (out / study_run.KEPT_RECORD).write_text(json.dumps({"resnet_t": "0" * 64}))
    with pytest.raises(SystemExit, match="distilled from another kept resnet_t .*use another --out"):
        runner.main([*common, "--report-only", "--docs-dir", str(tmp_path / "docs")])


def test_the_results_page_names_a_kept_teacher_and_its_commands_need_no_flag(kept_dir, tmp_path):
    plan_mod = _study_module("study_plan")
    report = _study_module("study_report")
    kept = _study_module("study_teachers").kept_teachers(kept_dir)
    settings = study_settings(tmp_path / "runs", kept=kept)
    page = report.write_report(settings, plan_mod.build_plan(settings), tmp_path / "docs").read_text()
    manifest = kept["resnet_t"]
    assert f"| {manifest.epochs} (kept: 64 images; top-1 on 40 test images) | {manifest.last_top1:.2f} |" in page
    assert "| teacher | ResNet-18 (widths 32-256, stem stride 2) | `resnet18_cifar` (" in page
    assert "the ResNet student's last stage is 1 x 1, the kept ResNet teacher's 2 x 2" in page
    assert (  # the paper-differences bullet tells the kept teacher from the one trained in the study
        f"alone: kept ResNet-18 (widths 32-256, stem stride 2) ({manifest.last_top1:.2f} %) after one long run on all "
        "64 training images; ViT (patch 4, 128-d, 4 blocks) trained in the study on the same training images as the "
        "students, for a few epochs: a weak teacher," in page
    )
    assert "teachers trained in the study on 5,000" in page  # the ViT teacher is not kept here
    assert f"`{kept_dir}/` with their config, SHA-256 and command" in page
    commands = [line for line in page.splitlines() if line.startswith("python benchmarks/accuracy/run_study.py")]
    assert commands and all(f"--teachers-dir {kept_dir}" in c and "--train-teachers" not in c for c in commands)
    assert any(c.endswith("--only teachers") for c in commands)  # the ViT teacher is still trained in the study

    trained = report.write_report(
        dataclasses.replace(settings, kept={}),
        plan_mod.build_plan(dataclasses.replace(settings, kept={})),
        tmp_path / "d2",
    ).read_text()
    commands = [line for line in trained.splitlines() if line.startswith("python benchmarks/accuracy/run_study.py")]
    assert commands and all("--train-teachers" in c and "--teachers-dir" not in c for c in commands)
    assert "and the ResNet's last stage is 1 x 1." in trained
    assert "alone, the ones trained in the study on the same training images as the students" in trained
    assert "(kept:" not in trained


def test_the_kept_resnet_teacher_is_resnet18_keeping_twice_the_resolution():
    """resnet18_cifar has resnet18's parameters (its weights load) and drops only the stem's max-pool: at 32 px every
    stage's maps are twice as wide, and the feature info says so (the aligners size from it)."""
    import timm

    _study_module("study_models")
    spec = _study_module("study_protocols").teacher_model("resnet_t", kept=True)
    kept = timm.create_model(spec.name, num_classes=10, **spec.kwargs).eval()
    plain = timm.create_model("resnet18", num_classes=10, **spec.kwargs).eval()
    kept.load_state_dict(plain.state_dict())  # strict: the same names and shapes
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sizes = [f.shape[-1] for f in kept.forward_intermediates(x, indices=5, intermediates_only=True)]
        plain_sizes = [f.shape[-1] for f in plain.forward_intermediates(x, indices=5, intermediates_only=True)]
    assert sizes == [16, 16, 8, 4, 2] and plain_sizes == [16, 8, 4, 2, 1]
    assert [32 // info["reduction"] for info in kept.feature_info] == sizes


def test_a_kept_teacher_of_another_architecture_is_refused(kept_dir):
    """timm's resnet18 weights load into resnet18_cifar without an error: the kept config's model is checked."""
    teachers = _study_module("study_teachers")
    config = yaml.safe_load((kept_dir / "resnet_t.yaml").read_text())
    config["student"]["name"] = "resnet18"  # a resnet_t kept before the kept architecture changed
    (kept_dir / "resnet_t.yaml").write_text(yaml.safe_dump(config))
    kept = teachers.kept_teachers(kept_dir)["resnet_t"]
    with pytest.raises(
        teachers.KeptTeacherError, match=r"trained resnet18 .*the study's kept resnet_t is resnet18_cifar"
    ):
        teachers.verify(kept)


def test_calibrating_needs_the_study_s_own_teachers(kept_dir, tmp_path):
    """The speeds are keyed by the study's own teachers: a calibration with a kept one would mislabel them."""
    runner = _runner_module()
    args = ["--protocol", "cpu", "--out", str(tmp_path / "out"), "--teachers-dir", str(kept_dir), "--calibrate"]
    with pytest.raises(SystemExit, match="--calibrate measures the speeds .*add --train-teachers"):
        runner.main(args)
