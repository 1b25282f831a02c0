"""Gradient accumulation (``train.grad_accum_steps``): N batches of B train as one batch of N x B would.

The comparisons use a student without batch statistics (a LayerNorm ViT) and a method whose loss is a
per-sample mean (KD): with BatchNorm or RSD's correlation, statistics over B and over N x B differ by design.
"""

import io

import pytest
import torch

from conftest import TINY_TEACHER, free_port, tiny_batch, tiny_run, tiny_vit
from crossdistill.config import OptimConfig, TrainConfig, build_config
from crossdistill.engine import Trainer
from crossdistill.engine.step import MicroBatch, TrainStep, build_train_step
from crossdistill.models import Teacher

SHALLOW_VIT = {"name": "test_vit", "kwargs": {**TINY_TEACHER["kwargs"], "depth": 2}}
VIT_KD = dict(method="kd", student=SHALLOW_VIT, teacher=SHALLOW_VIT)
SGD_CLIPPED = {"opt": "sgd", "lr": 0.05, "momentum": 0.9, "sched": "cosine", "warmup_epochs": 1, "clip_grad": 1.0}
"""SGD, not Adam, for float32 comparisons: Adam scales a gradient of rounding noise (a ViT's key bias, whose true
gradient is 0) up to a full step, so two equal computations rounded differently drift apart there."""


def _kd_step(**optim) -> TrainStep:
    """The engine's step for a float64 KD distiller: tiny ViT student and teacher, seeded alike every call."""
    from crossdistill.distillers import build_distiller

    torch.manual_seed(0)
    distiller = build_distiller("kd", tiny_vit(depth=2), Teacher(tiny_vit(depth=2)), {}).double()
    train = TrainConfig(amp="none", channels_last=False)
    return build_train_step(distiller, train, OptimConfig(opt="adamw", lr=1e-2, **optim), torch.device("cpu"))


def test_accumulating_n_batches_is_one_step_on_their_concatenation():
    """float64, AdamW, gradient clipping that bites: the averaged gradient is the big batch's gradient,
    clipped once per optimiser step."""
    accum = 3
    big, small = _kd_step(clip_grad=0.5), _kd_step(clip_grad=0.5)
    for seed in range(2):
        images, target = tiny_batch(seed, n=4 * accum)
        images = images.double()
        whole = big(images, target)
        parts = small.step(
            (MicroBatch(*part) for part in zip(images.chunk(accum), target.chunk(accum))), accum, tag=seed
        )
        assert whole.grad_norm > 0.5  # clipped
        torch.testing.assert_close(parts.grad_norm, whole.grad_norm, rtol=1e-10, atol=0)
        torch.testing.assert_close(parts.loss, whole.loss.detach(), rtol=1e-10, atol=0)
        assert parts.losses.keys() == whole.losses.keys()
    assert small.updates == big.updates == 2
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def _vit_kd_run(tmp_path, name, batch_size, accum, **train):
    raw = tiny_run(
        tmp_path,
        **VIT_KD,
        train={"epochs": 2, "run_name": name, "batch_size": batch_size, "grad_accum_steps": accum, **train},
        optim=SGD_CLIPPED,
        data={"train_subset": 64, "eval_subset": 20},
    )
    trainer = Trainer(build_config(raw), out=io.StringIO())
    return trainer, trainer.fit()


def test_a_run_with_accumulation_trains_as_the_run_with_the_bigger_batch(tmp_path):
    """Same samples in the same order, same schedule, same EMA: the same weights (up to float32 rounding)."""
    big, big_summary = _vit_kd_run(tmp_path, "big", 32, 1, ema_decay=0.9)
    small, small_summary = _vit_kd_run(tmp_path, "small", 16, 2, ema_decay=0.9)
    assert small.steps_per_epoch == big.steps_per_epoch == 2 and small.lr_plan.effective_batch == 32
    assert [r["lr"] for r in small_summary.history] == [r["lr"] for r in big_summary.history]
    for key in ("train_loss", "train_kd", "train_ce", "train_grad_norm"):
        assert small_summary.history[-1][key] == pytest.approx(big_summary.history[-1][key], rel=1e-4), key
    for part in (lambda t: t.student, lambda t: t.ema.module):
        for (name, a), b in zip(part(big).named_parameters(), part(small).parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_an_epoch_whose_batch_count_is_not_a_multiple_ends_with_a_shorter_step(tmp_path, monkeypatch):
    """5 batches, 3 per step: steps of 3 and 2 batches; step checkpoints are counted in optimiser steps."""
    counts = []
    original = TrainStep.step

    def recording(self, micro_batches, count, tag=None):
        counts.append(count)
        return original(self, micro_batches, count, tag)

    monkeypatch.setattr(TrainStep, "step", recording)
    raw = tiny_run(
        tmp_path,
        method="vanilla",
        student=SHALLOW_VIT,
        train={"epochs": 2, "grad_accum_steps": 3, "checkpoint_every_steps": 1, "keep_step_checkpoints": 9},
        data={"train_subset": 160, "eval_subset": 20},
    )
    trainer = Trainer(build_config(raw), out=io.StringIO())
    summary = trainer.fit()
    assert counts == [3, 2, 3, 2] and trainer.steps_per_epoch == 2
    steps = sorted(p.name for p in (tmp_path / "runs" / "run" / "checkpoints").glob("step-*.pt"))
    assert steps == ["step-000000001.pt", "step-000000003.pt"]  # not at an epoch's end: last.pt is
    assert all(row["skipped_steps"] == 0 for row in summary.history)


class _RecordsSync(torch.nn.Module):
    """A linear classifier that records, at each forward, whether DDP will all-reduce this backward."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(6, 3)
        self.ddp: list = []  # the DDP wrapper, in a list: as an attribute it would become a submodule
        self.synced: list[bool] = []

    def forward(self, images, target, teacher=None, indices=None):
        from types import SimpleNamespace

        self.synced.append(self.ddp[0].require_backward_grad_sync)
        loss = torch.nn.functional.cross_entropy(self.net(images), target)
        return SimpleNamespace(loss=loss, losses={"ce": loss})


def test_under_ddp_only_the_last_micro_batch_all_reduces(tmp_path):
    """``no_sync`` for all but the last micro-batch (a one-process gloo group), and the step equals the
    step on the concatenated batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, plain = _RecordsSync(), _RecordsSync()
        plain.load_state_dict(model.state_dict())
        ddp = DistributedDataParallel(model)
        model.ddp.append(ddp)
        plain.ddp.append(ddp)
        step = TrainStep(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), device=torch.device("cpu"), distributed=True)
        reference = TrainStep(plain, torch.optim.SGD(plain.parameters(), lr=0.1), device=torch.device("cpu"))
        images, target = torch.randn(9, 6), torch.randint(0, 3, (9,))
        result = step.step((MicroBatch(i, t) for i, t in zip(images.chunk(3), target.chunk(3))), 3)
        assert result.finite and model.synced == [False, False, True]
        reference(images, target)
        for a, b in zip(model.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_the_effective_batch_counts_accumulation_in_the_lr_scaling_and_the_warning(tmp_path):
    out = io.StringIO()
    raw = tiny_run(
        tmp_path,
        method="vanilla",
        train={"epochs": 1, "reference_batch": 256, "grad_accum_steps": 2},
        optim={"lr": 0.1, "sched": "none", "scale_lr": "linear"},
    )
    trainer = Trainer(build_config(raw), out=out)
    trainer.describe()
    text = out.getvalue()
    assert "per-process batch 32 x 1 process(es) x 2 accumulation steps = effective batch 64" in text
    assert "lr 0.025 = 0.1 x 64/256" in text
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)

    out = io.StringIO()
    raw["optim"]["scale_lr"], raw["train"]["run_name"] = "none", "unscaled"
    Trainer(build_config(raw), out=out).describe()
    assert (
        "warning: effective batch 64 (32 per process x 1 x 2 accumulation steps) differs from the recipe's reference "
        "256 and the learning rate is not rescaled: run on 4 processes or set train.grad_accum_steps=8 to match it, "
        "or pass optim.scale_lr=linear (lr 0.1 -> 0.025)."
    ) in out.getvalue()


def test_grad_accum_steps_must_be_at_least_one(tmp_path):
    from crossdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"config key 'train.grad_accum_steps': must be >= 1, got 0"):
        build_config(tiny_run(tmp_path, train={"grad_accum_steps": 0}))


@pytest.mark.slow
def test_two_process_accumulation_trains_as_the_bigger_per_process_batch(tmp_path):
    """Under DDP each rank accumulates its own shard's batches; the ranks agree, and equal the run whose
    per-process batch is twice as big."""
    import torch.multiprocessing as mp
    from test_training import _ddp_worker

    def run(name, batch_size, accum):
        raw = tiny_run(
            tmp_path / name,
            **VIT_KD,
            train={"epochs": 1, "batch_size": batch_size, "grad_accum_steps": accum},
            optim=SGD_CLIPPED,
            data={"train_subset": 128, "eval_subset": 20},
        )
        out = tmp_path / name
        mp.start_processes(_ddp_worker, args=(2, free_port(), raw, str(out)), nprocs=2, join=True, start_method="spawn")
        return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    big, small = run("big", 16, 1), run("small", 8, 2)
    assert big[0]["steps"] == small[0]["steps"] == 128 // (16 * 2)
    student = [key for key in big[0]["params"] if key.startswith("student.")]
    assert student
    for key in student:
        assert torch.equal(small[0]["params"][key], small[1]["params"][key]), key
        torch.testing.assert_close(small[0]["params"][key], big[0]["params"][key], rtol=1e-4, atol=1e-5, msg=key)
