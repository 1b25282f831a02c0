"""The command line: train/eval/params, one-line errors, and torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import crossdistill
from conftest import tiny_run
from crossdistill.cli import main


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
    summary = json.loads(out[out.index("{") :])
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
    code, out, _ = run_cli(
        capsys,
        "eval",
        "--checkpoint",
        str(plain),
        "--model",
        "test_resnet",
        "--data",
        "digits",
        "--img-size",
        "32",
        "data.eval_subset=100",
        "data.num_workers=0",
        "--json",
    )
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
    code, out, _ = run_cli(
        capsys,
        "params",
        "--method",
        "rsd",
        "--teacher",
        "swin_tiny_patch4_window7_224",
        "--student",
        "resnet18",
        "--num-classes",
        "100",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["extra_trainable_parameters"] == 1_312_768
    assert result["extra_by_module"] == {"aad": 1_312_768}
    assert result["student_parameters"] == 11_227_812  # resnet18 with a 100-class head
    code, out, _ = run_cli(
        capsys,
        "params",
        "--method",
        "rsd",
        "--teacher",
        "swin_tiny_patch4_window7_224",
        "--student",
        "resnet18",
        "--set",
        "gamma=4",
        "--json",
    )
    assert json.loads(out)["extra_trainable_parameters"] == 2_625_536


def test_params_convnext_to_swin_nano_text(capsys):
    code, out, _ = run_cli(capsys, "params", "--teacher", "convnext_tiny", "--student", "swin_nano_patch4_window7_224")
    assert code == 0 and "1.313M" in out and "9.600M" in out


def test_python_dash_m_entry_point():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "crossdistill",
            "params",
            "--teacher",
            "resnet50",
            "--student",
            "deit_tiny_patch16_224",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["extra_trainable_parameters"] == 192 * 384 + 2 * 384 + 384 * 2048


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    config = write_config(tmp_path, tiny_run(tmp_path, train={"epochs": 1, "batch_size": 16}))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "crossdistill",
            "train",
            "--config",
            str(config),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "x 2 process(es)" in done.stdout and "effective batch 32" in done.stdout
    assert (tmp_path / "runs" / "run" / "last.pt").exists()


def test_dry_run_lists_what_a_run_would_stop_on_and_writes_nothing(tmp_path, capsys):
    """It used to pass with a teacher checkpoint and data that do not exist (and an exit status of 0)."""
    raw = tiny_run(tmp_path, num_classes=10, train={"reference_batch": 256})
    raw["teacher"]["checkpoint"] = str(tmp_path / "not-downloaded-yet.pth")
    raw["data"] = {"dataset": "folder", "root": str(tmp_path / "no-data-here"), "img_size": 32}
    config = write_config(tmp_path, raw)
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--dry-run")
    assert code == 2 and err.startswith(f"crossdistill: error: data.root '{tmp_path / 'no-data-here'}' does not exist")
    assert err.endswith(" (and 1 more problem(s) listed above)\n") and len(err.splitlines()) == 1
    assert f"problem: data.root '{tmp_path / 'no-data-here'}' does not exist" in out
    assert f"problem: checkpoint file not found: {tmp_path / 'not-downloaded-yet.pth'}" in out
    assert "# resolved config" in out and "effective batch 32 (recipe reference 256)" in out
    assert "warning: effective batch 32 (32 per process x 1) differs from the recipe's reference 256" in out
    assert "one step on random data" in out and "rsd" in out and "extra trainable 0.031M" in out  # checked on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--dry-run", "method_args.kappa=-1")
    assert code == 2 and out == "" and "config key 'method_args.kappa': must be >= 0" in err  # before it prints


def test_version(capsys):
    import timm

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    versions = f"crossdistill {crossdistill.__version__} (torch {torch.__version__}, timm {timm.__version__}"
    assert out.startswith(versions)


def test_switching_the_method_on_the_command_line_says_what_it_dropped(tmp_path, capsys):
    """The recipe's RSD arguments used to follow method=kd: "unknown config key 'method_args.weight'"."""
    config = write_config(tmp_path, tiny_run(tmp_path, num_classes=10, method_args={"weight": 0.1, "kappa": 0.01}))
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--dry-run", "method=kd")
    assert code == 0, err
    assert err.splitlines()[0] == (
        "crossdistill: note: method changed from rsd to kd on the command line: the method_args of rsd (kappa, "
        "weight) are dropped and kd starts from its defaults (set method_args.KEY=VALUE to change one)"
    )
    resolved = yaml.safe_load(out[out.index("# resolved config") : out.index("# run")])
    assert resolved["method"] == "kd" and resolved["method_args"] == {}
    code, out, err = run_cli(
        capsys, "train", "--config", str(config), "--dry-run", "method=kd", "method_args.temperature=2"
    )
    assert code == 0, err
    assert yaml.safe_load(out[out.index("# resolved config") : out.index("# run")])["method_args"] == {"temperature": 2}


def test_dry_run_counts_gradient_accumulation_in_the_effective_batch(tmp_path, capsys):
    raw = tiny_run(tmp_path, num_classes=10, train={"reference_batch": 256, "grad_accum_steps": 4})
    code, out, err = run_cli(capsys, "train", "--config", str(write_config(tmp_path, raw)), "--dry-run")
    assert code == 0, err
    assert "per-process batch 32 x 1 process(es) x 4 accumulation steps = effective batch 128" in out
    assert "| 2 steps/epoch x" in out  # 8 batches of 32 in groups of 4: optimiser steps, as the run counts them
    assert (
        "warning: effective batch 128 (32 per process x 1 x 4 accumulation steps) differs from the recipe's "
        "reference 256 and the learning rate is not rescaled: run on 2 processes or set train.grad_accum_steps=8 "
        "to match it, or pass optim.scale_lr=linear"
    ) in out


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
        (["sweep", "a=1", "--config", "x.yaml", "--grid", "k=1,2", "b=2"], "overrides", ["a=1", "b=2"]),
        (
            ["tune", "a=1", "--config", "x.yaml", "--space", "s.yaml", "b=2", "--trials", "3"],
            "overrides",
            ["a=1", "b=2"],
        ),
    ],
)
def test_positionals_may_follow_options(argv, key, expected):
    """argparse alone takes one run of positionals and calls the rest 'unrecognized arguments'."""
    from crossdistill.cli import build_parser

    assert getattr(build_parser().parse_args(argv), key) == expected


def test_dry_run_applies_the_overrides_on_both_sides_of_it(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path, num_classes=10))
    code, out, err = run_cli(
        capsys, "train", "--config", str(config), "train.batch_size=16", "--dry-run", "train.epochs=5", "optim.lr=1e-3"
    )
    assert code == 0, err
    resolved = yaml.safe_load(out[out.index("# resolved config") : out.index("# run")])
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
    "bad lr": (lambda d: ["optim.lr=-0.1"], "config key 'optim.lr': must be > 0 and finite, got -0.1"),
    "bad kappa": (lambda d: ["method_args.kappa=-1"], "config key 'method_args.kappa': must be >= 0"),
    "bad gamma": (lambda d: ["method_args.gamma=0"], "config key 'method_args.gamma': must be >= 1"),
    "bad amp": (lambda d: ["train.amp=fp8"], "config key 'train.amp': must be auto, none, bf16 or fp16"),
    "scale_lr": (lambda d: ["optim.scale_lr=linear"], "linear scaling needs train.reference_batch"),
    "bad kwargs": (
        lambda d: ["student.kwargs={nope: [" + ", ".join(["1"] * 5000) + "]}"],
        "model test_resnet: bad kwargs {'nope': [1, 1,",
    ),
    # "Batches and data"
    "batch too large": (lambda d: ["train.batch_size=4096", "data.train_subset=null"], "fewer than one batch"),
    "no data root": (lambda d: ["data.dataset=folder", "data.root=/nope"], "data.root '/nope' does not exist"),
    "class count": (lambda d: ["num_classes=100"], "num_classes is 100 but the dataset 'digits' has 10 classes"),
    # "Checkpoints and weights"
    "missing file": (lambda d: ["teacher.checkpoint=/nope.pth"], "checkpoint file not found: /nope.pth"),
    "code in a pickle": (lambda d: [teacher_file(d, lambda s: {**s, "x": _Payload()})], "refused to load"),
    "truncated file": (lambda d: [teacher_file(d, truncate=True)], "not a readable checkpoint"),
    "another model": (lambda d: [teacher_file(d, name="test_resnet")], "does not fit test_vit: missing keys"),
    "other shapes": (
        lambda d: [teacher_file(d, embed_dim=32)],
        "does not fit test_vit: 79 weight(s) have other shapes",
    ),
    "head class count": (
        lambda d: [teacher_file(d, num_classes=7), "method=kd"],
        "method 'kd' reads the teacher's logits, but the teacher's classifier (teacher.checkpoint ",
    ),
    "int8 teacher": (
        lambda d: [teacher_file(d, floats(lambda v: v.to(torch.int8)))],
        "are stored as torch.int8 where test_vit has floating-point weights",
    ),
    "NaN teacher": (
        lambda d: [teacher_file(d, floats(lambda v: v * float("nan")))],
        "floating-point tensors hold NaN or infinite values",
    ),
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
    code, out, err = run_cli(
        capsys,
        "params",
        "--teacher",
        "test_vit",
        "--student",
        "test_resnet",
        "--set",
        "kappa=1e-2",
        "--set",
        "weight=1e-1",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["method"] == "rsd"


# ---------------------------------------------------------------- run directories: nothing lost


def quick_config(tmp_path, data=None, **train):
    raw = tiny_run(
        tmp_path,
        method="vanilla",
        train={"epochs": 1, **train},
        data={"train_subset": 64, "eval_subset": 32, **(data or {})},
    )
    return write_config(tmp_path, raw)


def one_error_line(code, err):
    """The error of a refused command: one line (notes such as a method switch's come before it)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("crossdistill: note:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("crossdistill: error:"), err
    return lines[0]


@pytest.mark.parametrize("name", [".", "..", "a/b", "../elsewhere"])
def test_run_name_is_one_plain_folder_name(tmp_path, capsys, name):
    config = quick_config(tmp_path)
    finished = tmp_path / "runs" / "finished"
    finished.mkdir(parents=True)
    (finished / "last.pt").write_text("another run's checkpoint")
    code, _, err = run_cli(capsys, "train", "--config", str(config), f"train.run_name={name}")
    assert "config key 'train.run_name': must be one folder name inside train.output_dir" in one_error_line(code, err)
    assert (finished / "last.pt").read_text() == "another run's checkpoint" and config.exists()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["finished"]


def test_a_directory_that_holds_no_run_is_refused_and_left_alone(tmp_path, capsys):
    config = quick_config(tmp_path)
    notes = tmp_path / "runs" / "notes"
    notes.mkdir(parents=True)
    (notes / "a.txt").write_text("hi")
    (notes / "config.yaml").write_text("my: own settings\n")  # not a run's config: a user's file
    for flags in ([], ["--overwrite"], ["--resume"]):
        code, _, err = run_cli(capsys, "train", "--config", str(config), "train.run_name=notes", *flags)
        assert (
            f"{notes} is not a crossdistill run directory (it holds a.txt, config.yaml) and is left as it is"
            in one_error_line(code, err)
        )
    assert sorted(p.name for p in notes.iterdir()) == ["a.txt", "config.yaml"]
    assert (notes / "config.yaml").read_text() == "my: own settings\n"
    (tmp_path / "runs" / "empty").mkdir()
    assert run_cli(capsys, "train", "--config", str(config), "train.run_name=empty")[0] == 0  # an empty one is used


def test_overwrite_replaces_only_what_a_run_wrote(tmp_path, capsys):
    config = quick_config(tmp_path, tensorboard=True, checkpoint_every_steps=1)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    run_dir = tmp_path / "runs" / "run"
    assert list((run_dir / "checkpoints").glob("step-*.pt")) and list((run_dir / "tensorboard").iterdir())
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "checkpoints" / "README").write_text("mine too")
    (run_dir / "plots").mkdir()
    old_events = set((run_dir / "tensorboard").iterdir())
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--overwrite")
    assert code == 0, err
    assert f"kept what a run does not write in {run_dir}: checkpoints/README, notes.txt, plots/" in out
    assert (run_dir / "notes.txt").read_text() == "mine" and (
        run_dir / "checkpoints" / "README"
    ).read_text() == "mine too"
    assert (run_dir / "plots").is_dir() and (run_dir / "summary.json").exists()
    events = set((run_dir / "tensorboard").iterdir())
    assert len(events) == 1 and not events & old_events  # the earlier run's curves were replaced
    assert not (run_dir / ".crossdistill.lock").exists()


def test_user_files_named_like_run_files_are_never_deleted(tmp_path, capsys):
    """A run's file names alone do not make a file a run's: its content must be what a run writes."""
    config = quick_config(tmp_path)
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    mine = {"latest.json": '{"my": "data"}', "metrics.csv": "my,own,table\n", "summary.json": "x"}
    for name, text in mine.items():
        (run_dir / name).write_text(text)
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    assert f"{run_dir} is not a crossdistill run directory" in one_error_line(code, err)
    assert {name: (run_dir / name).read_text() for name in mine} == mine

    other_tool = tmp_path / "runs" / "weights"  # e.g. YOLO's weights/last.pt and best.pt
    (other_tool / "checkpoints").mkdir(parents=True)
    torch.save({"model": torch.zeros(3)}, other_tool / "last.pt")
    torch.save({"model": torch.ones(3)}, other_tool / "best.pt")
    torch.save({"model": torch.ones(3)}, other_tool / "checkpoints" / "step-mine.pt")
    torch.save({"model": torch.ones(3)}, other_tool / "checkpoints" / "step-000000001.pt")
    before = {p: p.read_bytes() for p in other_tool.rglob("*.pt")}
    code, _, err = run_cli(capsys, "train", "--config", str(config), "train.run_name=weights", "--overwrite")
    assert f"{other_tool} is not a crossdistill run directory" in one_error_line(code, err)
    assert {p: p.read_bytes() for p in other_tool.rglob("*.pt")} == before


def test_a_run_whose_checkpoint_was_replaced_by_another_file_keeps_it(tmp_path, capsys):
    """--overwrite would replace a last.pt that a run did not write; --resume must say it cannot load it."""
    config = quick_config(tmp_path)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    last = tmp_path / "runs" / "run" / "last.pt"
    torch.save({"model": torch.zeros(3)}, last)
    before = last.read_bytes()
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--overwrite")
    assert "holds last.pt under the name of a file a run writes, but not as a run writes it" in one_error_line(
        code, err
    )
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--resume")
    assert "is not a crossdistill run checkpoint" in one_error_line(code, err)
    assert last.read_bytes() == before


def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys, monkeypatch):
    config = quick_config(tmp_path)
    (tmp_path / "out.txt").write_text("a file")
    code, _, err = run_cli(capsys, "train", "--config", str(config), f"train.output_dir={tmp_path / 'out.txt'}")
    assert (
        f"cannot create the run directory {tmp_path / 'out.txt' / 'run'}: {tmp_path / 'out.txt'} is a file, "
        "not a directory" in one_error_line(code, err)
    )
    assert (tmp_path / "out.txt").read_text() == "a file"

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    real_mkdir = Path.mkdir

    def refuse_inside_read_only(self, *args, **kwargs):  # as a read-only mount does, even for root
        if read_only in self.parents:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse_inside_read_only)
    code, _, err = run_cli(capsys, "train", "--config", str(config), f"train.output_dir={read_only / 'runs'}")
    assert (
        f"cannot write the run directory {read_only / 'runs' / 'run'}: Permission denied; choose a writable "
        "train.output_dir" in one_error_line(code, err)
    )


def image_folder(root, per_class=8):
    from PIL import Image

    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (50 + 100 * label, 10 * i, 0)).save(folder / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_found_mid_run_is_one_line_and_leaves_no_run_directory(tmp_path, capsys, workers):
    root = image_folder(tmp_path / "images")
    (root / "train" / "dog" / "0003.png").write_bytes(b"not an image")
    config = quick_config(
        tmp_path,
        batch_size=4,
        data={
            "dataset": "folder",
            "root": str(root),
            "num_workers": workers,
            "train_subset": None,
            "eval_subset": None,
        },
    )
    code, _, err = run_cli(capsys, "train", "--config", str(config))
    line = one_error_line(code, err)
    assert f"cannot decode image file '{root / 'train' / 'dog' / '0003.png'}'" in line and "Caught" not in line
    assert not (tmp_path / "runs" / "run").exists()
    (root / "train" / "dog" / "0003.png").unlink()
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0  # fixing the input just works


def test_resume_of_a_run_directory_given_as_dot(tmp_path, capsys, monkeypatch):
    config = quick_config(tmp_path)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    monkeypatch.chdir(tmp_path / "runs" / "run")
    code, out, err = run_cli(capsys, "train", "--resume", ".")
    assert code == 0, err
    assert f"run {tmp_path / 'runs' / 'run'} is already finished (1/1 epochs trained): nothing to do" in out


def test_resuming_a_finished_run_says_so_and_keeps_its_summary(tmp_path, capsys):
    config = quick_config(tmp_path)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    summary = tmp_path / "runs" / "run" / "summary.json"
    before = summary.read_text()
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--resume", "--json")
    assert code == 0, err
    assert "is already finished (1/1 epochs trained): nothing to do. To train it longer" in out
    assert summary.read_text() == before
    assert json.loads(out[out.index("{") :])["wall_time_s"] == json.loads(before)["wall_time_s"]


def test_extending_a_finished_run_replans_its_schedule_and_records_it(tmp_path, capsys):
    config = quick_config(tmp_path)
    assert run_cli(capsys, "train", "--config", str(config))[0] == 0
    run_dir = tmp_path / "runs" / "run"
    code, out, err = run_cli(capsys, "train", "--resume", str(run_dir), "train.epochs=2")
    assert code == 0, err
    assert (
        "train.epochs changed from 1 to 2: the run continues after epoch 1 with its lr schedule (cosine) "
        "re-planned over 2 epochs (lr 1e-05 -> 0.001005); config.yaml records train.epochs=2"
    ) in out
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["epochs"] == 2
    rows = (run_dir / "metrics.csv").read_text().strip().splitlines()
    header = rows[0].split(",")
    assert float(rows[2].split(",")[header.index("lr")]) == pytest.approx(1e-5 + 0.5 * (2e-3 - 1e-5))
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2
    code, _, err = run_cli(capsys, "train", "--resume", str(run_dir), "train.epochs=1")
    assert (
        "train.epochs=1, but the run in " in one_error_line(code, err)
        and "has already trained 2 of its 2 epochs" in err
    )


def test_resume_followed_by_an_override_keeps_the_override(tmp_path, capsys):
    """argparse hands `--resume train.epochs=5` the override as its RUN_DIR; it used to vanish silently."""
    config = write_config(tmp_path, tiny_run(tmp_path, num_classes=10))
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--dry-run", "--resume", "train.epochs=5")
    assert code == 2 and "nothing to resume: no checkpoint in" in err  # --resume was kept too
    resolved = yaml.safe_load(out[out.index("# resolved config") : out.index("# run")])
    assert resolved["train"]["epochs"] == 5


def test_resume_with_a_run_dir_and_a_config_is_one_clear_line(tmp_path, capsys):
    config = write_config(tmp_path, tiny_run(tmp_path, num_classes=10))
    (tmp_path / "elsewhere").mkdir()
    code, out, err = run_cli(capsys, "train", "--config", str(config), "--resume", str(tmp_path / "elsewhere"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "give one of them" in err


@pytest.mark.parametrize("dataset,classes", [("digits", 10), ("cifar100", 100)])
def test_dry_run_knows_the_class_count_of_built_in_datasets(tmp_path, capsys, dataset, classes):
    raw = tiny_run(tmp_path)
    raw.pop("num_classes", None)
    raw["data"].update(dataset=dataset, root=str(tmp_path / "data"), download=True)  # not downloaded yet
    code, out, err = run_cli(capsys, "train", "--config", str(write_config(tmp_path, raw)), "--dry-run")
    assert code == 0, err
    assert f"{classes} classes" in out


def test_dry_run_of_an_archive_not_decoded_yet_asks_for_num_classes(tmp_path, capsys):
    import tarfile

    (tmp_path / "train" / "a").mkdir(parents=True)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "train", arcname="train")
    cache = tmp_path / "cache"
    data = {"dataset": "folder", "root": str(tmp_path / "images.tar.gz"), "cache_dir": str(cache)}
    raw = tiny_run(tmp_path, data=data)
    raw.pop("num_classes", None)
    code, out, err = run_cli(capsys, "train", "--config", str(write_config(tmp_path, raw)), "--dry-run")
    assert code == 2 and "set num_classes in the config for --dry-run, which leaves the dataset unopened" in err
    assert f"data: the archive '{tmp_path / 'images.tar.gz'}' is not decoded yet: a run decodes it once into" in out
    assert not cache.exists()  # decoding would write the cache: the dry run leaves it to the run
