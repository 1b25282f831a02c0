"""End-to-end training on CPU: loss falls, resume is exact, DDP ranks agree, run directories are safe."""

import io
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import cpu_process_group, free_port, tiny_run
from crossdistill.config import build_config
from crossdistill.engine import StoppedByHook, Trainer, train
from crossdistill.errors import CrossDistillError


def test_rsd_training_loss_falls(tmp_path):
    cfg = build_config(tiny_run(tmp_path, train={"epochs": 4}))
    summary = train(cfg)
    first, last = summary.history[0], summary.history[-1]
    assert last["train_rsd"] < 0.8 * first["train_rsd"]
    assert last["train_loss"] < first["train_loss"]
    assert summary.extra_parameters > 0
    run_dir = tmp_path / "runs" / "run"
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "summary.json"):
        assert (run_dir / name).exists(), name
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["best_top1"] == summary.best_top1
    assert len((run_dir / "metrics.csv").read_text().strip().splitlines()) == 1 + 4


def test_a_run_with_val_fraction_evaluates_on_the_validation_split_and_says_so(tmp_path):
    cfg = build_config(tiny_run(tmp_path, train={"epochs": 1}, data={"val_fraction": 0.2, "eval_subset": 60}))
    out = io.StringIO()
    summary = train(cfg, out=out)
    text = out.getvalue()
    assert "256 train / 60 eval images | eval split: val (0.2 of train, per class, val_seed 0; not the test split)" in (
        text
    )
    assert "| on val |" in text
    saved = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary.eval_split == saved["eval_split"] == "val"
    plain = train(build_config(tiny_run(tmp_path, train={"epochs": 1, "run_name": "plain"})), out=io.StringIO())
    assert plain.eval_split == "test"


def test_the_epoch_hook_sees_each_epochs_row_and_can_stop_the_run_resumably(tmp_path):
    cfg = build_config(tiny_run(tmp_path, train={"epochs": 3}))
    seen = []

    def hook(epoch, row):
        seen.append((epoch, row["epoch"], row.get("eval_top1")))
        return epoch == 2

    with pytest.raises(StoppedByHook, match="stopped after epoch 2 at the request of its epoch hook"):
        train(cfg, on_epoch=hook, out=io.StringIO())
    assert [(e, r) for e, r, _ in seen] == [(1, 1), (2, 2)] and all(top1 is not None for *_, top1 in seen)
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "last.pt").exists() and not (run_dir / "summary.json").exists()  # unfinished, kept
    summary = train(cfg, resume=True, on_epoch=lambda epoch, row: None, out=io.StringIO())
    assert [row["epoch"] for row in summary.history] == [1, 2, 3]


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    sections = dict(train={"epochs": 3, "ema_decay": 0.9}, optim={"warmup_epochs": 1, "clip_grad": 1.0})
    full = Trainer(build_config(tiny_run(tmp_path / "a", **sections)))
    full.fit()

    first = Trainer(build_config(tiny_run(tmp_path / "b", **sections)))
    first.fit(stop_after=1)
    del first
    resumed = Trainer(build_config(tiny_run(tmp_path / "b", **sections)), resume=True)
    assert resumed.start_epoch == 1
    resumed.fit()

    for part in ("student", "distiller"):
        a = _weights(getattr(full, part))
        b = _weights(getattr(resumed, part))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}.{key} differs after resume"
    a_ema, b_ema = _weights(full.ema.module), _weights(resumed.ema.module)
    assert all(torch.equal(a_ema[k], b_ema[k]) for k in a_ema)
    assert [r["eval_top1"] for r in full.history] == [r["eval_top1"] for r in resumed.history]
    metrics = (tmp_path / "b" / "runs" / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(metrics) == 1 + 3


def test_existing_run_directory_is_not_overwritten_silently(tmp_path):
    cfg = build_config(tiny_run(tmp_path, method="vanilla", train={"epochs": 1}))
    train(cfg)
    checkpoint = tmp_path / "runs" / "run" / "last.pt"
    before = checkpoint.stat().st_mtime_ns
    with pytest.raises(CrossDistillError, match="already holds a run.*--resume.*--overwrite"):
        train(cfg)
    assert checkpoint.stat().st_mtime_ns == before
    train(cfg, overwrite=True)
    with pytest.raises(CrossDistillError, match="nothing to resume"):
        train(build_config(tiny_run(tmp_path, method="vanilla", train={"run_name": "other"})), resume=True)


def test_batch_size_one_for_rsd_is_a_clear_error(tmp_path):
    with pytest.raises(CrossDistillError, match="at least 2 samples per batch"):
        train(build_config(tiny_run(tmp_path, train={"batch_size": 1})))


def test_batch_larger_than_the_dataset(tmp_path):
    with pytest.raises(CrossDistillError, match="fewer than one batch"):
        train(build_config(tiny_run(tmp_path, train={"batch_size": 512})))


def test_unknown_model_name(tmp_path):
    raw = tiny_run(tmp_path)
    raw["student"]["name"] = "resnet181"
    with pytest.raises(CrossDistillError, match="unknown model 'resnet181'.*resnet18"):
        train(build_config(raw))


def test_missing_dataset_path(tmp_path):
    raw = tiny_run(
        tmp_path,
        data={"dataset": "folder", "root": str(tmp_path / "no-such-dir"), "train_subset": None, "eval_subset": None},
    )
    with pytest.raises(CrossDistillError, match="no-such-dir"):
        train(build_config(raw))


def test_teacher_checkpoint_from_an_earlier_run(tmp_path):
    """A vanilla run trains a teacher; its best.pt is a teacher checkpoint for RSD, normalisation included."""
    teacher_raw = tiny_run(tmp_path, method="vanilla", train={"epochs": 1, "run_name": "teacher"})
    teacher_raw["student"] = tiny_run(tmp_path)["teacher"]
    train(build_config(teacher_raw))
    raw = tiny_run(tmp_path, train={"epochs": 1})
    raw["teacher"]["checkpoint"] = str(tmp_path / "runs" / "teacher" / "best.pt")
    trainer = Trainer(build_config(raw))
    saved = torch.load(raw["teacher"]["checkpoint"], weights_only=True)["student"]
    for key, value in trainer.distiller.teacher.model.state_dict().items():
        assert torch.equal(value, saved[key])
    assert not trainer.distiller.teacher.renormalizes
    raw["num_classes"] = 12
    with pytest.raises(CrossDistillError, match="num_classes is 12"):
        Trainer(build_config({**raw, "train": {**raw["train"], "run_name": "x"}}))


def _ddp_worker(rank: int, world_size: int, port: int, raw: dict, out_dir: str) -> None:
    with cpu_process_group(rank, world_size, port) as env:
        trainer = Trainer(build_config(raw), env=env)
        summary = trainer.fit()
        params = {k: v.detach().clone() for k, v in trainer.distiller.named_parameters()}
        torch.save(
            {"params": params, "top1": summary.last_top1, "steps": trainer.steps_per_epoch},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


def _ddp_run_worker(rank: int, world_size: int, port: int, raw: dict, out_file: str, resume: bool) -> None:
    with cpu_process_group(rank, world_size, port) as env:
        trainer = Trainer(build_config(raw), env=env, resume=resume, out=io.StringIO())
        trainer.fit()
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}, out_file)


@pytest.mark.slow
def test_two_process_mid_epoch_resume_is_exact(tmp_path):
    """Each rank continues its own random streams (mixup draws here) after a mid-epoch resume: the
    checkpoint holds every rank's RNG state, not rank 0's for all."""
    sections = dict(
        train={"epochs": 1, "batch_size": 8, "mixup": 0.8, "checkpoint_every_steps": 4, "keep_step_checkpoints": 10},
        # a loader worker: with none, the per-sample seeding would reseed the main process's RNGs
        data={"train_subset": 128, "num_workers": 1},
    )

    def run(folder, resume):
        raw = tiny_run(tmp_path / folder, **sections)
        mp.start_processes(
            _ddp_run_worker,
            args=(2, free_port(), raw, str(tmp_path / f"{folder}.pt"), resume),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        return torch.load(tmp_path / f"{folder}.pt", weights_only=True)

    reference = run("ref", False)
    run("resumed", False)
    run_dir = tmp_path / "resumed" / "runs" / "run"
    (run_dir / "last.pt").unlink()
    (run_dir / "latest.json").unlink()
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*.pt")] == ["step-000000004.pt"]  # of 8 steps
    resumed = run("resumed", True)
    for key in reference:
        assert torch.equal(reference[key], resumed[key]), key


@pytest.mark.slow
def test_two_process_ddp_ranks_end_with_identical_weights(tmp_path):
    raw = tiny_run(tmp_path, train={"epochs": 1, "batch_size": 16, "log_every": 2})
    mp.start_processes(
        _ddp_worker, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    log = (tmp_path / "runs" / "run" / "train.log").read_text().splitlines()  # rank 0's alone
    assert sum(" step " in line and "img/s" in line for line in log) == 4 and sum("done:" in line for line in log) == 1
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 256 // (16 * 2)
    assert r0["params"].keys() == r1["params"].keys()
    assert any(k.startswith("aad.") for k in r0["params"])
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    assert r0["top1"] == r1["top1"]  # evaluation is sharded and all-reduced
    assert (tmp_path / "runs" / "run" / "last.pt").exists()


def test_training_options_bf16_channels_last_mixup_ema_clip(tmp_path):
    raw = tiny_run(
        tmp_path,
        train={
            "epochs": 2,
            "amp": "bf16",
            "channels_last": True,
            "mixup": 0.8,
            "cutmix": 1.0,
            "ema_decay": 0.9,
            "tensorboard": True,
        },
        optim={
            "opt": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "sched": "step",
            "decay_epochs": 1,
            "warmup_epochs": 1,
            "clip_grad": 5.0,
        },
    )
    summary = train(build_config(raw))
    for row in summary.history:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k.startswith("train_"))
        assert "ema_top1" in row and "eval_top5" in row
    assert summary.ema_best_top1 is not None
    best = torch.load(tmp_path / "runs" / "run" / "best.pt", weights_only=True)
    assert best["student_ema"] is not None and best["student_ema"].keys() == best["student"].keys()
    assert list((tmp_path / "runs" / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_scheduler_warmup_then_decay(tmp_path):
    raw = tiny_run(
        tmp_path,
        method="vanilla",
        train={"epochs": 4},
        optim={"lr": 0.01, "warmup_epochs": 2, "warmup_lr": 1e-4, "sched": "cosine", "min_lr": 1e-5},
    )
    lrs = [row["lr"] for row in train(build_config(raw)).history]
    assert lrs[0] < lrs[1] <= 0.01 and lrs[3] < lrs[2]


def test_effective_batch_warning_and_linear_lr_scaling(tmp_path):
    import io

    out = io.StringIO()
    raw = tiny_run(
        tmp_path, method="vanilla", train={"epochs": 1, "reference_batch": 256}, optim={"lr": 0.1, "sched": "none"}
    )
    trainer = Trainer(build_config(raw), out=out)
    trainer.describe()
    text = out.getvalue()
    assert "effective batch 32" in text
    assert "differs from the recipe's reference 256" in text and "optim.scale_lr=linear" in text
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)

    out = io.StringIO()
    raw = tiny_run(
        tmp_path,
        method="vanilla",
        train={"epochs": 1, "reference_batch": 256, "run_name": "scaled"},
        optim={"lr": 0.1, "sched": "none", "scale_lr": "linear"},
    )
    trainer = Trainer(build_config(raw), out=out)
    trainer.describe()
    assert "lr 0.0125 = 0.1 x 32/256" in out.getvalue() and "differs from" not in out.getvalue()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_a_run_that_fails_on_bad_input_leaves_no_run_directory(tmp_path):
    raw = tiny_run(tmp_path, data={"dataset": "folder", "root": str(tmp_path / "missing")})
    with pytest.raises(CrossDistillError):
        train(build_config(raw))
    assert not (tmp_path / "runs" / "run").exists()
    train(build_config(tiny_run(tmp_path, train={"epochs": 1})))  # fixing the input just works


def _ddp_state_worker(rank: int, world_size: int, port: int, raw: dict, out_dir: str) -> None:
    with cpu_process_group(rank, world_size, port) as env:
        trainer = Trainer(build_config(raw), env=env, out=io.StringIO())
        trainer.fit()
        state = {k: v.detach().clone() for k, v in trainer.distiller.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_process_crd_keeps_one_memory_bank_with_every_ranks_samples(tmp_path):
    """Each rank gathers the batch of all ranks before updating its banks: both ranks end with the same banks
    and Z, and every sample's row moved, the other rank's included (DDP's buffer broadcast from rank 0 alone
    would drop rank 1's updates)."""
    from crossdistill.distillers.crd import CRDMemory

    raw = tiny_run(
        tmp_path,
        method="crd",
        method_args={"num_negatives": 32, "feat_dim": 8},
        train={"epochs": 1, "batch_size": 16},
        data={"train_subset": 128},
    )
    mp.start_processes(
        _ddp_state_worker, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, join=True, start_method="spawn"
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    banks = [key for key in r0 if key.startswith("memory.")]
    assert banks == ["memory.student", "memory.teacher", "memory.z"]
    for key in banks + [key for key in r0 if key.startswith(("embed_s.", "embed_t."))]:
        assert torch.equal(r0[key], r1[key]), key  # (BatchNorm statistics: each rank's last forward)
    trainer = Trainer(build_config({**raw, "train": {**raw["train"], "run_name": "bound"}}), out=io.StringIO())
    initial = CRDMemory(8)
    initial.bind(trainer.data.train.targets, raw["train"]["seed"])
    for side in ("student", "teacher"):
        moved = (r0[f"memory.{side}"] != getattr(initial, side)).any(dim=1)
        assert bool(moved.all()), f"{int((~moved).sum())} of 128 {side} rows never updated"
