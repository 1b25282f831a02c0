"""Kept teachers of the accuracy study (benchmarks/accuracy/study_teachers.py): a finished teacher run is kept as
safetensors with a manifest; the study's students start from it (no teacher run in the plan), its SHA-256 is
checked before anything trains, and an existing kept teacher is replaced only on request."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from crossdistill.config import ModelConfig, build_config
from crossdistill.engine import train
from crossdistill.models.factory import create_model
from test_accuracy_study import _runner_module, _study_module


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """The study's resnet_t trained alone for one short epoch on the digits."""
    spec = _study_module("study_protocols").MODELS["resnet_t"]
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = tiny_run(
        tmp,
        method="vanilla",
        student={"name": spec.name, "kwargs": copy.deepcopy(spec.kwargs)},
        data={"train_subset": 64, "eval_subset": 40},
        train={"epochs": 1, "run_name": "resnet_t"},
    )
    train(build_config(cfg), out=io.StringIO())
    return tmp / "runs" / "resnet_t"


@pytest.fixture
def kept_dir(tmp_path, teacher_run) -> Path:
    folder = tmp_path / "teachers"
    folder.mkdir()
    (folder / "resnet_t.yaml").write_text("# the config that trained it\n")
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
    assert manifest["command"] == "crossdistill train --config benchmarks/accuracy/teachers/resnet_t.yaml"

    spec = _study_module("study_protocols").MODELS["resnet_t"]
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


def test_students_start_from_the_kept_teacher_and_no_teacher_run_is_planned(kept_dir, tmp_path):
    plan_mod, protocols = _study_module("study_plan"), _study_module("study_protocols")
    kept = _study_module("study_teachers").kept_teachers(kept_dir)
    settings = plan_mod.Settings(
        protocol=protocols.PROTOCOLS["cpu"],
        out=tmp_path / "runs",
        data_root="data.tar.gz",
        dataset="folder",
        cache_dir=None,
        teacher_cache=True,
        device="cpu",
        methods=("vanilla", "kd", "rsd"),
        jobs=2,
        kept=kept,
    )
    plan = {run.name: run for run in plan_mod.build_plan(settings)}
    assert "teacher-resnet_t" not in plan and "teacher-vit_t" in plan  # only resnet_t is kept here
    student = plan["resnet-vit-kd-s0"]
    assert student.config["teacher"]["checkpoint"] == str(kept_dir / "resnet_t.safetensors")
    assert student.needs == ()
    assert plan["vit-resnet-kd-s0"].needs == ("teacher-vit_t",)
    trained = plan_mod.build_plan(dataclasses.replace(settings, kept={}))
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
