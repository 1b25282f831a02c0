"""The command line: train/eval/params, one-line errors, and torchrun."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from crossdistill.cli import main

from conftest import tiny_run


def write_config(tmp_path, raw, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_eval_the_checkpoint(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path, train={"epochs": 1}))
    code, out, _ = run_cli(capsys, "train", "--config", str(config), "train.batch_size=16", "--json")
    assert code == 0
    summary = json.loads(out[out.index("{"):])
    assert "effective batch 16" in out
    best = tmp_path / "runs" / "run" / "best.pt"
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(best), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["model"] == "test_resnet" and result["samples"] == 100
    assert result["top1"] == pytest.approx(summary["best_top1"])
    # a plain timm state dict needs the model name and data on the command line
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(best, weights_only=True)["student"], plain)
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(plain), "--model", "test_resnet", "--data", "digits",
                           "--img-size", "32", "data.eval_subset=100", "data.num_workers=0", "--json")
    assert code == 0 and json.loads(out)["samples"] == 100


def test_resume_by_run_directory(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path, method="vanilla", train={"epochs": 1}))
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    run_dir = tmp_path / "runs" / "run"
    code, out, _ = run_cli(capsys, "train", "--resume", str(run_dir), "train.epochs=2")
    assert code == 0 and "(epoch 1 done)" in out
    assert "epoch 2 |" in out


@pytest.mark.parametrize(
    "override,message",
    [
        ("student.name=resnet181", "unknown model 'resnet181'"),
        ("student.name=resnet18.no_such_tag", "unknown weights tag 'no_such_tag' for timm model 'resnet18': its tags"),
        ("train.epochz=3", "unknown config key 'train.epochz'"),
        ("data.dataset=folder", "data.root"),
        ("train.batch_size=1", "at least 2 samples per batch"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, override, message):
    config = write_config(tmp_path, tiny_run(tmp_path))
    code, _, err = run_cli(capsys, "train", "--config", str(config), override)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossdistill: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_missing_dataset_path_is_named(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path, data={"dataset": "folder", "root": "/no/such/data"}))
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert code == 2 and "/no/such/data" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path))
    code, _, err = run_cli(capsys, "--debug", "train", "--config", str(config), "student.name=resnet181")
    assert code == 2 and "Traceback" in err


def test_params_rsd_resnet18_to_swin_tiny(capsys):
    code, out, _ = run_cli(capsys, "params", "--method", "rsd", "--teacher", "swin_tiny_patch4_window7_224",
                           "--student", "resnet18", "--num-classes", "100", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["extra_trainable_parameters"] == 1_312_768
    assert result["extra_by_module"] == {"aad": 1_312_768}
    assert result["student_parameters"] == 11_227_812  # resnet18 with a 100-class head
    code, out, _ = run_cli(capsys, "params", "--method", "rsd", "--teacher", "swin_tiny_patch4_window7_224",
                           "--student", "resnet18", "--set", "gamma=4", "--json")
    assert json.loads(out)["extra_trainable_parameters"] == 2_625_536


def test_params_convnext_to_swin_nano_text(capsys):
    code, out, _ = run_cli(capsys, "params", "--teacher", "convnext_tiny", "--student", "swin_nano_patch4_window7_224")
    assert code == 0 and "1.313M" in out and "9.600M" in out


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "crossdistill", "params", "--teacher", "resnet50", "--student",
                           "deit_tiny_patch16_224", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["extra_trainable_parameters"] == 192 * 384 + 2 * 384 + 384 * 2048


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    config = write_config(tmp_path, tiny_run(tmp_path, train={"epochs": 1, "batch_size": 16}))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
         "crossdistill", "train", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 process(es)" in done.stdout and "effective batch 32" in done.stdout
    assert (tmp_path / "runs" / "run" / "last.pt").exists()


def test_dry_run_checks_a_recipe_without_data_or_weights(tmp_path, capsys):
    raw = tiny_run(tmp_path, num_classes=10, train={"reference_batch": 256})
    raw["teacher"]["checkpoint"] = str(tmp_path / "not-downloaded-yet.pth")
    raw["data"] = {"dataset": "folder", "root": str(tmp_path / "no-data-here"), "img_size": 32}
    config = write_config(tmp_path, raw)
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--dry-run")
    assert code == 0, err
    assert "# resolved config" in out and "effective batch 32 (recipe reference 256)" in out
    assert "warning: the effective batch differs" in out
    assert "one step on random data" in out and "rsd" in out and "extra trainable 0.031M" in out
    assert not (tmp_path / "runs").exists()
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--dry-run", "num_classes=null")
    assert code == 2 and "set num_classes" in err


def test_eval_of_a_plain_weights_file_needs_the_model_name(tmp_path, capsys):
    plain = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(10, 96)}, plain)
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(plain))
    assert code == 2 and "pass --model NAME" in err
