"""Image sizes and teachers with another head, as a user meets them on the command line: fixed-size timm
models at the run's ``data.img_size``, sizes a model cannot take, a pretrained teacher's 1000-class head
with a feature method (accepted) and a logit method (refused, with the way to fine-tune), the teacher's
accuracy before the student trains, and the configs/own_data pair on a small image folder."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp

from conftest import cpu_process_group, free_port, tiny_run
from crossdistill.config import build_config
from crossdistill.engine import Trainer
from test_cli import image_folder, one_error_line, run_cli, write_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def weights(folder: Path, name: str = "test_vit", num_classes: int = 10, **kwargs) -> str:
    """A tiny timm model's state dict saved in ``folder`` (a stand-in for downloaded pretrained weights)."""
    if name == "test_vit":
        kwargs = {"img_size": 32, "patch_size": 8, **kwargs}
    torch.manual_seed(0)
    path = folder / f"{name}-{num_classes}-{len(list(folder.iterdir()))}.pth"
    torch.save(timm.create_model(name, num_classes=num_classes, **kwargs).state_dict(), path)
    return str(path)


def config(tmp_path, method="rsd", **sections):
    raw = tiny_run(tmp_path, method=method, **sections)
    raw["train"].update(epochs=1)
    raw["data"].update(train_subset=64, eval_subset=32)
    return write_config(tmp_path, raw)


# --- 1. fixed-size models follow data.img_size ---------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_fixed_size_student_is_built_for_the_run_size(tmp_path, capsys, dry_run):
    # DeiT-T is made for 224 px (and, unlike timm's test_vit, takes no other size); the run feeds 32 px
    args = ["train", "--config", str(config(tmp_path, "vanilla")), "student.name=deit_tiny_patch16_224"]
    code, out, err = run_cli(capsys, *args, *(["--dry-run", "num_classes=10"] if dry_run else []))
    assert code == 0, err
    assert "one step on random data" in out if dry_run else "done: last top-1" in out


def test_a_fixed_size_student_trained_at_the_run_size_evaluates_and_exports(tmp_path, capsys):
    args = ["train", "--config", str(config(tmp_path, "vanilla")), "student.name=deit_tiny_patch16_224"]
    assert run_cli(capsys, *args)[0] == 0
    run_dir = tmp_path / "runs" / "run"
    code, out, err = run_cli(capsys, "eval", "--checkpoint", str(run_dir / "best.pt"), "--json")
    assert code == 0 and json.loads(out)["samples"] == 32, err
    code, out, err = run_cli(capsys, "export", str(run_dir), "--format", "timm")
    assert code == 0, err
    sidecar = json.loads((run_dir / "export" / "config.json").read_text())
    assert sidecar["model_args"]["img_size"] in (32, [32, 32])  # the exported model is rebuilt at its size


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["student.name=test_vit", "data.img_size=40"],  # 16 px patches
            "model test_vit cannot take 40 px inputs (AssertionError: Input height (40) should be divisible by patch "
            "size (16).); set data.img_size to a size the student takes (test_vit is made for 160 px)",
        ),
        (
            ["teacher.kwargs.img_size=36"],  # 8 px patches
            "model test_vit cannot take 36 px inputs (AssertionError: Input height (36) should be divisible by patch "
            "size (8).); set teacher.kwargs.img_size to a size test_vit takes (e.g. 160; the teacher's inputs are "
            "resized to it)",
        ),
        (
            ["student.name=test_vit", "student.kwargs.img_size=64"],
            "student.kwargs.img_size is 64 but the student is fed data.img_size=32 px images; drop "
            "student.kwargs.img_size (a student is built for data.img_size) or set data.img_size=64",
        ),
    ],
)
def test_a_size_a_model_cannot_take_is_one_line_and_leaves_no_run_directory(
    tmp_path, capsys, overrides, message, dry_run
):
    args = ["train", "--config", str(config(tmp_path)), *overrides]
    code, _, err = run_cli(capsys, *args, *(["--dry-run", "num_classes=10"] if dry_run else []))
    assert message in one_error_line(code, err)
    assert not (tmp_path / "runs" / "run").exists()


def test_a_teacher_at_its_own_size_sees_resized_inputs(tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    args = ["train", "--config", str(config(tmp_path)), f"teacher.checkpoint={weights(folder)}", "data.img_size=16"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert (
        "teacher inputs resized from 16 to 32 px (teacher.kwargs.img_size); teacher.kwargs.img_size=16 runs the "
        "teacher at the data's size" in out
    )


def test_fitnet_probes_a_teacher_at_its_own_size(tmp_path, capsys):
    teacher = ["teacher.name=deit_tiny_patch16_224", "teacher.kwargs={img_size: 32}"]  # takes 32 px only
    args = ["train", "--config", str(config(tmp_path, "fitnet")), *teacher, "data.img_size=16"]
    code, out, err = run_cli(capsys, *args, "--dry-run", "num_classes=10")
    assert code == 0 and "fitnet" in out, err


def test_a_method_that_reads_feature_maps_at_the_data_size_refuses_a_resized_teacher(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--config", str(config(tmp_path, "sd_kd")), "data.img_size=16")
    assert (
        "method 'sd_kd' computes its teacher outputs from the teacher's feature map at the data's input size, but "
        "the teacher runs at 32 px and data.img_size is 16: set teacher.kwargs.img_size=16" in one_error_line(code, err)
    )


# --- 2. a teacher with another head ------------------------------------------------------------------


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_kwargs_num_classes_is_one_line(tmp_path, capsys, role):
    code, _, err = run_cli(capsys, "train", "--config", str(config(tmp_path)), f"{role}.kwargs.num_classes=1000")
    expected = {
        "student": "student.kwargs.num_classes: the student's classifier always has the run's class count",
        "teacher": "teacher.kwargs.num_classes: the teacher's classifier keeps the class count of its weights",
    }[role]
    assert expected in one_error_line(code, err)
    assert not (tmp_path / "runs" / "run").exists()


@pytest.mark.parametrize("head", [1000, 0])
def test_a_feature_method_accepts_a_teacher_head_of_other_classes(tmp_path, capsys, head):
    folder = tmp_path / "weights"
    folder.mkdir()
    teacher = weights(folder, num_classes=head)
    code, out, err = run_cli(capsys, "train", "--config", str(config(tmp_path)), f"teacher.checkpoint={teacher}")
    assert code == 0, err
    assert f"teacher head: {head or 'no'} classes, not used by rsd" in out
    assert "% top-1 on" not in out  # a head of other classes cannot be scored on this dataset


def test_the_start_up_lines_name_the_weights_each_model_starts_from(tmp_path, capsys):
    # a fine-tune from weights of 1000 classes (step 1 of the own-data path) and a distillation from a file
    folder = tmp_path / "weights"
    folder.mkdir()
    student, teacher = weights(folder, num_classes=1000), weights(folder, num_classes=1000)
    args = ["train", "--config", str(config(tmp_path)), f"student.checkpoint={student}", "student.name=test_vit"]
    code, out, err = run_cli(
        capsys, *args, "student.kwargs={img_size: 32, patch_size: 8}", f"teacher.checkpoint={teacher}"
    )
    assert code == 0, err
    assert f"weights: student {student} | teacher {teacher}" in out.splitlines()
    code, out, err = run_cli(capsys, "train", "--config", str(config(tmp_path)), "method=vanilla", "train.run_name=s")
    assert code == 0, err
    assert "weights: student random initialisation" in out.splitlines()


@pytest.mark.parametrize("method", ["kd", "ofa", "sd_kd"])
def test_a_logit_method_refuses_a_teacher_head_of_other_classes(tmp_path, capsys, method):
    folder = tmp_path / "weights"
    folder.mkdir()
    teacher = weights(folder, num_classes=1000)
    code, _, err = run_cli(capsys, "train", "--config", str(config(tmp_path, method)), f"teacher.checkpoint={teacher}")
    assert (
        f"method {method!r} reads the teacher's logits, but the teacher's classifier (teacher.checkpoint {teacher}) "
        "has 1000 classes and the run has 10. Fine-tune the teacher on this dataset first (README, 'Your own data: "
        "fine-tune a teacher, then distil'; configs/own_data/finetune_teacher.yaml) and distil from its best.pt, or "
        "use a method that reads only the teacher's embedding (rsd)" in one_error_line(code, err)
    )
    assert not (tmp_path / "runs" / "run").exists()


def test_dry_run_refuses_a_pretrained_teacher_head_for_a_logit_method(tmp_path, capsys):
    # test_vit's pretrained weights have ImageNet's 1000 classes; --dry-run does not download them
    args = ["train", "--config", str(config(tmp_path, "kd")), "teacher.pretrained=true", "--dry-run", "num_classes=10"]
    code, _, err = run_cli(capsys, *args)
    assert "the teacher's classifier (its pretrained weights) has 1000 classes and the run has 10" in one_error_line(
        code, err
    )


def test_the_teacher_accuracy_is_printed_before_the_student_trains_and_kept_on_resume(tmp_path, capsys, monkeypatch):
    from crossdistill.engine.metrics import TeacherClassifier

    folder = tmp_path / "weights"
    folder.mkdir()
    raw = tiny_run(tmp_path, train={"epochs": 2}, data={"train_subset": 64, "eval_subset": 32})
    raw["teacher"]["checkpoint"] = weights(folder)
    forwards = []
    original = TeacherClassifier.forward
    monkeypatch.setattr(TeacherClassifier, "forward", lambda self, x: forwards.append(len(x)) or original(self, x))
    out = io.StringIO()
    Trainer(build_config(raw), out=out).fit(stop_after=1)
    lines = out.getvalue().splitlines()
    measured = [line for line in lines if line.startswith("teacher: ")]
    assert len(measured) == 1 and measured[0].endswith("% top-1 on test (32 images, preprocessed as the student's)")
    assert lines.index(measured[0]) < next(i for i, line in enumerate(lines) if line.startswith("epoch 1 |"))
    assert sum(forwards) == 32  # one pass over the evaluation split
    top1 = float(measured[0].split()[1])

    out = io.StringIO()
    summary = Trainer(build_config(raw), resume=True, out=out).fit()
    measured_line = f"teacher: {top1:.1f} % top-1 on test (32 images, preprocessed as the student's); measured at the"
    assert measured_line + " start of the run" in out.getvalue()
    assert sum(forwards) == 32  # not measured again
    assert summary.teacher_top1 == pytest.approx(top1, abs=0.05)
    saved = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert saved["teacher_top1"] == summary.teacher_top1


def _teacher_eval_worker(rank: int, world_size: int, port: int, raw: dict, out_dir: str) -> None:
    with cpu_process_group(rank, world_size, port) as env:
        trainer = Trainer(build_config(raw), env=env, out=io.StringIO())
        trainer._measure_teacher()
        torch.save(trainer.teacher_eval, os.path.join(out_dir, f"teacher{rank}.pt"))
        trainer.run_dir_claim.release(failed=True)


@pytest.mark.slow
def test_the_teacher_accuracy_under_ddp_counts_every_sample_once(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    raw = tiny_run(tmp_path, train={"epochs": 1, "batch_size": 8}, data={"train_subset": 64, "eval_subset": 33})
    raw["teacher"]["checkpoint"] = weights(folder)
    single = Trainer(build_config(raw), out=io.StringIO())
    single._measure_teacher()
    single.run_dir_claim.release(failed=True)
    mp.start_processes(
        _teacher_eval_worker, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    for rank in (0, 1):
        found = torch.load(tmp_path / f"teacher{rank}.pt", weights_only=True)
        assert found["samples"] == 33 and found["top1"] == pytest.approx(single.teacher_eval["top1"])


# --- the documented path: configs/own_data on a small image folder -------------------------------------


def test_fine_tune_a_teacher_on_a_folder_then_distil(tmp_path, capsys):
    root = image_folder(tmp_path / "images")
    folder = tmp_path / "weights"
    folder.mkdir()
    imagenet_vit = weights(folder, num_classes=1000)  # stands in for timm's pretrained weights (no internet here)
    common = [
        f"data.root={root}",
        "data.img_size=32",
        "data.num_workers=0",
        f"train.output_dir={tmp_path / 'runs'}",
        "train.epochs=1",
        "train.batch_size=4",
        "train.device=cpu",
        "train.tensorboard=false",
        "train.progress=false",
    ]
    finetune = [
        "--config",
        str(CONFIGS / "own_data" / "finetune_teacher.yaml"),
        "student.name=test_vit",
        "student.kwargs={patch_size: 8}",
        "student.pretrained=false",
        f"student.checkpoint={imagenet_vit}",
    ]
    code, out, err = run_cli(capsys, "train", *finetune, *common)
    assert code == 0, err
    best = tmp_path / "runs" / "teacher" / "best.pt"
    assert best.is_file()

    distill = ["--config", str(CONFIGS / "own_data" / "distill.yaml"), "student.name=test_resnet"]
    teacher = ["teacher.name=test_vit", "teacher.kwargs={patch_size: 8}"]
    code, out, err = run_cli(capsys, "train", *distill, *teacher, f"teacher.checkpoint={best}", *common)
    assert code == 0, err
    assert "teacher: " in out and "% top-1 on test (16 images, preprocessed as the student's)" in out
    assert "teacher inputs resized" not in out  # the teacher was fine-tuned at the run's size
    summary = json.loads((tmp_path / "runs" / "rsd-resnet18" / "summary.json").read_text())
    assert summary["teacher_top1"] is not None

    # RSD also takes the ImageNet teacher as it is; KD needs the fine-tuned one
    imagenet_teacher = [*teacher, f"teacher.checkpoint={imagenet_vit}", *common]
    code, out, err = run_cli(capsys, "train", *distill, *imagenet_teacher, "train.run_name=rsd-imagenet")
    assert code == 0 and "teacher head: 1000 classes, not used by rsd" in out, err
    kd = ["method=kd", "method_args={}", "train.run_name=kd-imagenet"]
    code, _, err = run_cli(capsys, "train", *distill, *imagenet_teacher, *kd)
    assert "configs/own_data/finetune_teacher.yaml" in one_error_line(code, err)
    fine_tuned = [*teacher, f"teacher.checkpoint={best}", "train.run_name=kd"]
    code, _, err = run_cli(capsys, "train", *distill, *fine_tuned, *common, "method=kd", "method_args={}")
    assert code == 0, err
