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


# --- overrides anywhere among the options; every user error on one line ---------------------------------


@pytest.mark.parametrize(
    "argv,key,expected",
    [
        (["train", "--config", "x.yaml", "a=1", "--dry-run", "b=2"], "overrides", ["a=1", "b=2"]),
        (["train", "a=1", "--config", "x.yaml", "b=2", "--json", "c=3"], "overrides", ["a=1", "b=2", "c=3"]),
        (["train", "--resume", "runs/r", "a=1", "--overwrite", "b=2"], "overrides", ["a=1", "b=2"]),
        (["eval", "a=1", "--checkpoint", "best.pt", "b=2", "--json"], "overrides", ["a=1", "b=2"]),
        (["plot", "runs/a", "--out", "curves", "runs/b"], "run_dirs", ["runs/a", "runs/b"]),
        (["report", "runs/a", "--csv", "t.csv", "runs/b"], "run_dirs", ["runs/a", "runs/b"]),
    ],
)
def test_positionals_may_follow_options(argv, key, expected):
    """argparse alone takes one run of positionals and calls the rest 'unrecognized arguments'."""
    from crossdistill.cli import build_parser

    assert getattr(build_parser().parse_args(argv), key) == expected


def test_dry_run_applies_the_overrides_on_both_sides_of_it(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path, num_classes=10))
    code, out, err = run_cli(capsys, "train", "--config", str(config), "train.batch_size=16", "--dry-run",
                             "train.epochs=5", "optim.lr=1e-3")
    assert code == 0, err
    resolved = yaml.safe_load(out[out.index("# resolved config"):out.index("# run")])
    assert resolved["train"]["batch_size"] == 16 and resolved["train"]["epochs"] == 5
    assert resolved["optim"]["lr"] == 1e-3


def test_a_multi_line_error_prints_as_one_line(capsys, monkeypatch):
    import crossdistill.cli as cli
    from crossdistill.errors import CrossDistillError

    def fails(args):
        raise CrossDistillError("what is wrong:\n    in detail\n\nhow to fix it")

    monkeypatch.setattr(cli, "_cmd_demo", fails)
    code, _, err = run_cli(capsys, "demo")
    assert code == 2 and err == "crossdistill: error: what is wrong: in detail how to fix it\n"


class _Payload:
    def __reduce__(self):
        return print, ("unpickled",)


def teacher_file(folder, transform=None, name="test_vit", truncate=False, **kwargs) -> str:
    """``teacher.checkpoint=PATH``: a tiny model's state dict (after ``transform``) saved in ``folder``."""
    import timm

    if name == "test_vit":
        kwargs = {"img_size": 32, "patch_size": 8, **kwargs}
    state = timm.create_model(name, **{"num_classes": 10, **kwargs}).state_dict()
    path = folder / f"{name}-{len(list(folder.iterdir()))}.pth"
    torch.save(transform(state) if transform else state, path)
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"teacher.checkpoint={path}"


def floats(fn):
    return lambda state: {k: fn(v) if v.is_floating_point() else v for k, v in state.items()}


ERRORS_MD_INPUTS = {  # case: (overrides made in a folder, what the message says)
    # docs/ERRORS.md, "Names and config keys"
    "unknown method": (lambda d: ["method=rsdd"], "unknown method 'rsdd'"),
    "unknown dataset": (lambda d: ["data.dataset=cifar1000"], "unknown dataset 'cifar1000'"),
    "unknown key": (lambda d: ["train.epoch=3"], "unknown config key 'train.epoch'. Did you mean: epochs?"),
    "unknown method key": (lambda d: ["method_args.kapa=0.1"], "unknown config key 'method_args.kapa'"),
    "wrong type": (lambda d: ["train.batch_size=abc"], "config key 'train.batch_size': expected int, got str 'abc'"),
    "bad lr": (lambda d: ["optim.lr=-0.1"], "config key 'optim.lr': must be > 0, got -0.1"),
    "bad kappa": (lambda d: ["method_args.kappa=-1"], "config key 'method_args.kappa': must be >= 0"),
    "bad gamma": (lambda d: ["method_args.gamma=0"], "config key 'method_args.gamma': must be >= 1"),
    "bad amp": (lambda d: ["train.amp=fp8"], "config key 'train.amp': must be auto, none, bf16 or fp16"),
    "scale_lr": (lambda d: ["optim.scale_lr=linear"], "linear scaling needs train.reference_batch"),
    "bad kwargs": (lambda d: ["student.kwargs={nope: [" + ", ".join(["1"] * 5000) + "]}"],
                   "model test_resnet: bad kwargs {'nope': [1, 1,"),
    # "Batches and data"
    "batch too large": (lambda d: ["train.batch_size=4096", "data.train_subset=null"], "fewer than one batch"),
    "no data root": (lambda d: ["data.dataset=folder", "data.root=/nope"], "data.root '/nope' does not exist"),
    "class count": (lambda d: ["num_classes=100"], "num_classes is 100 but the dataset 'digits' has 10 classes"),
    # "Checkpoints and weights"
    "missing file": (lambda d: ["teacher.checkpoint=/nope.pth"], "checkpoint file not found: /nope.pth"),
    "code in a pickle": (lambda d: [teacher_file(d, lambda s: {**s, "x": _Payload()})], "refused to load"),
    "truncated file": (lambda d: [teacher_file(d, truncate=True)], "not a readable checkpoint"),
    "another model": (lambda d: [teacher_file(d, name="test_resnet")], "does not fit test_vit: missing keys"),
    "other shapes": (lambda d: [teacher_file(d, embed_dim=32)],
                     "does not fit test_vit: 79 weight(s) have other shapes"),
    "head class count": (lambda d: [teacher_file(d, num_classes=7)],
                         "the checkpoint's classifier (head.weight) has 7 classes, but the run needs 10"),
    "int8 teacher": (lambda d: [teacher_file(d, floats(lambda v: v.to(torch.int8)))],
                     "are stored as torch.int8 where test_vit has floating-point weights"),
    "NaN teacher": (lambda d: [teacher_file(d, floats(lambda v: v * float("nan")))],
                    "parameter tensors hold NaN or infinite values"),
}


@pytest.mark.parametrize("case", list(ERRORS_MD_INPUTS))
def test_documented_errors_print_one_line(tmp_path, capsys, case):
    make_overrides, message = ERRORS_MD_INPUTS[case]
    weights = tmp_path / "weights"
    weights.mkdir()
    overrides = make_overrides(weights)
    config = write_config(tmp_path, tiny_run(tmp_path, train={"epochs": 1}))
    code, _, err = run_cli(capsys, "train", "--config", str(config), *overrides)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossdistill: error: "), err
    assert message in lines[0] and len(lines[0]) < 700
    assert not (tmp_path / "runs" / "run").exists()


def test_documented_file_errors_print_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "run.yaml"
    bad_yaml.write_text("student: !!python/object/apply:os.system ['echo unsafe']\n")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    plain = tmp_path / "plain.pth"
    torch.save({"fc.weight": torch.zeros(10, 96)}, plain)
    for argv, message in [
        (["train", "--config", str(bad_yaml)], "could not determine a constructor for the tag"),
        (["train", "--config", str(tmp_path / "a.yaml")], "config files extend each other in a cycle"),
        (["eval", "--checkpoint", str(plain)], "is a plain weights file, not a crossdistill run checkpoint"),
        (["export", str(tmp_path)], "is not a crossdistill run directory"),
    ]:
        code, _, err = run_cli(capsys, *argv)
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_params_reads_method_arguments_in_exponent_notation(capsys):
    code, out, err = run_cli(capsys, "params", "--teacher", "test_vit", "--student", "test_resnet",
                             "--set", "kappa=1e-2", "--set", "weight=1e-1", "--json")
    assert code == 0, err
    assert json.loads(out)["method"] == "rsd"
