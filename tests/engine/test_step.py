"""The engine's training step: the deferred (on-device) finiteness check skips exactly what the per-step check skips."""

import io

import pytest
import torch

from conftest import tiny_run
from crossdistill.config import build_config
from crossdistill.engine import Trainer
from crossdistill.errors import CrossDistillError


@pytest.fixture
def fused_nan_run(rsd_nan_at_calls_3_and_4):
    """NaN losses at the 3rd and 4th forward (the engine's optimisers are fused on CPU and CUDA)."""
    return rsd_nan_at_calls_3_and_4


def _train(tmp_path, name, every, calls, optim=None, **train):
    calls["n"] = 0
    out = io.StringIO()
    raw = tiny_run(
        tmp_path,
        train={"epochs": 1, "run_name": name, "finite_check_every": every, **train},
        optim=optim or {"sched": "none"},
    )
    trainer = Trainer(build_config(raw), out=out)
    summary = trainer.fit()
    return trainer, summary, out.getvalue()


def full_state(trainer) -> dict[str, torch.Tensor]:
    """Copies of everything a step may change: weights and buffers (student, extra modules), EMA, optimiser state."""
    state = {f"distiller.{k}": v for k, v in trainer.distiller.state_dict().items()}
    if trainer.ema is not None:
        state.update({f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()})
    for index, per_param in trainer.optimizer.state_dict()["state"].items():
        state.update({f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in per_param.items()})
    return {k: v.detach().clone() for k, v in state.items()}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal bit for bit: a NaN where there was NaN, -0.0 where there was -0.0."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(_bits(a[key]), _bits(b[key])), key


def test_deferred_check_skips_on_the_device_like_the_per_step_check(tmp_path, fused_nan_run):
    """With a learning-rate schedule and an EMA too: both paths advance the schedule on a skipped step
    (by position in the run) and leave the EMA alone, so they end bitwise equal."""
    schedule = {"sched": "cosine", "warmup_epochs": 0}
    sync, sync_summary, sync_out = _train(tmp_path, "sync", 1, fused_nan_run, optim=schedule, ema_decay=0.9)
    deferred, summary, out = _train(tmp_path, "deferred", 5, fused_nan_run, optim=schedule, ema_decay=0.9)
    assert deferred.step_fn.deferred and not sync.step_fn.deferred
    assert deferred.optimizer.defaults.get("fused")
    assert summary.history[0]["skipped_steps"] == sync_summary.history[0]["skipped_steps"] == 2
    assert {k: v for k, v in summary.history[0].items() if k.startswith("train_")} == {
        k: v for k, v in sync_summary.history[0].items() if k.startswith("train_")
    }
    assert_bitwise_equal(full_state(sync), full_state(deferred))
    assert sync.optimizer.param_groups[0]["lr"] == deferred.optimizer.param_groups[0]["lr"]
    for text in (out, sync_out):
        assert "non-finite loss or gradient at epoch 1, step 3" in text and "step 4" in text


@pytest.mark.parametrize(
    "every,accum,nan_calls",
    [(1, 1, (3, 4)), (5, 1, (3, 4)), (1, 2, (4,)), (5, 2, (3,))],
    ids=["per-step-check", "deferred-check", "per-step-check-accum-2nd", "deferred-check-accum-1st"],
)
def test_a_skipped_step_leaves_weights_buffers_optimiser_and_ema_bitwise_unchanged(
    tmp_path, monkeypatch, fused_nan_run, every, accum, nan_calls
):
    """The forward of a step whose loss turns out NaN has already moved the BatchNorm statistics (of the
    student and of the AAD projector); skipping the step must undo that, and must not move the EMA. With
    gradient accumulation one NaN micro-batch (the first or the last of its step) skips the whole step."""
    from crossdistill.engine.step import TrainStep

    fused_nan_run["nan"] = nan_calls
    before_step: list[dict[str, torch.Tensor]] = []
    original = TrainStep.step

    def recording(self, *args, **kwargs):
        before_step.append(full_state(trainer))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "step", recording)
    raw = tiny_run(
        tmp_path,
        train={"epochs": 1, "finite_check_every": every, "ema_decay": 0.9, "grad_accum_steps": accum},
        optim={"sched": "none"},
        data={"train_subset": 192},
    )
    trainer = Trainer(build_config(raw), out=io.StringIO())
    summary = trainer.fit()
    assert trainer.step_fn.deferred == (every > 1)
    assert len(before_step) == trainer.steps_per_epoch == 6 // accum
    skipped = [(c - 1) // accum for c in nan_calls]  # the optimiser steps holding a NaN forward
    assert summary.history[0]["skipped_steps"] == len(set(skipped))
    # the state before the first step after the NaN ones is the state before the first NaN one, bit for bit
    assert_bitwise_equal(before_step[skipped[0]], before_step[skipped[-1] + 1])
    states = [*before_step, full_state(trainer)]
    good = skipped[-1] + 1  # and the next good step moves them again
    moved = [k for k in states[good] if not torch.equal(states[good][k], states[good + 1][k])]
    assert any("aad" in k and "running_var" in k for k in moved)  # a good step does move them
    assert any(k.startswith("ema.") for k in moved) and any(k.startswith("optimizer.") for k in moved)


def test_deferred_check_still_stops_after_too_many_nonfinite_steps(tmp_path, fused_nan_run):
    with pytest.raises(CrossDistillError, match=r"2 non-finite steps .*epoch 1, step 4.*'rsd': nan"):
        _train(tmp_path, "strict", 5, fused_nan_run, max_nonfinite_steps=1)


def test_the_check_interval_defaults_and_fallback(tmp_path):
    trainer = Trainer(build_config(tiny_run(tmp_path, train={"epochs": 1})), out=io.StringIO())
    assert trainer.step_fn.finite_check_every == 1 and not trainer.step_fn.deferred  # CPU default: per step
    raw = tiny_run(tmp_path, train={"epochs": 1, "finite_check_every": 20, "run_name": "lamb"}, optim={"opt": "lamb"})
    trainer = Trainer(build_config(raw), out=io.StringIO())
    assert trainer.step_fn.finite_check_every == 1 and not trainer.step_fn.deferred  # lamb has no fused kernel


def test_decay_bias_and_norm_switches_timms_weight_decay_exemption():
    import torch

    from crossdistill.config import OptimConfig
    from crossdistill.engine.step import build_optimizer

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 8, 8))
    exempt = build_optimizer(model, OptimConfig(weight_decay=0.1), 0.1, torch.device("cpu"))
    decay = {id(p): g["weight_decay"] for g in exempt.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.1 and decay[id(model[0].bias)] == 0.0 and decay[id(model[1].weight)] == 0.0
    every = build_optimizer(model, OptimConfig(weight_decay=0.1, decay_bias_and_norm=True), 0.1, torch.device("cpu"))
    assert {g["weight_decay"] for g in every.param_groups} == {0.1}
    assert sum(len(g["params"]) for g in every.param_groups) == len(list(model.parameters()))


def test_sync_batchnorm_converts_the_student_and_projectors_not_the_teacher(tmp_path):
    import torch

    from crossdistill.config import build_config
    from crossdistill.engine.setup import build_run
    from crossdistill.engine.step import use_sync_batchnorm

    raw = tiny_run(tmp_path, method="rsd", teacher={"name": "test_resnet", "kwargs": {}})  # a CNN teacher: BatchNorm
    distiller = build_run(build_config(raw)).distiller
    batchnorm = torch.nn.modules.batchnorm._BatchNorm
    teacher_bn = [m for m in distiller.teacher.model.modules() if isinstance(m, batchnorm)]
    count = use_sync_batchnorm(distiller)
    student = [m for m in distiller.student.modules() if isinstance(m, batchnorm)]
    trainable = [m for m in distiller.modules() if isinstance(m, batchnorm)]  # student and AAD projector
    assert count == len(trainable) > len(student) > 0 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in trainable)
    assert teacher_bn and [m for m in distiller.teacher.model.modules() if isinstance(m, batchnorm)] == teacher_bn
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in distiller.teacher.model.modules())


def test_sync_bn_under_ddp_on_cpu_is_a_clear_error(tmp_path):
    from crossdistill.engine.distributed import DistEnv

    raw = tiny_run(tmp_path, train={"sync_bn": True})
    with pytest.raises(CrossDistillError, match=r"train.sync_bn needs CUDA devices .* set train.sync_bn=false"):
        Trainer(build_config(raw), env=DistEnv(rank=0, world_size=2), out=io.StringIO())
    assert not (tmp_path / "runs").exists()


def test_a_parameters_first_update_is_never_skipped_on_the_device():
    """Fused optimisers create a parameter's state on its first update; skipped there (found_inf) they leave
    it uninitialised. A parameter that gets its first gradient late must take the per-step check."""
    from crossdistill.engine.step import TrainStep

    early, late = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleList([early, late])
    # one group each: torch's fused SGD cannot mix parameters with and without momentum buffers in a group
    optimizer = torch.optim.SGD(
        [{"params": early.parameters()}, {"params": late.parameters()}], lr=0.1, momentum=0.9, fused=True
    )
    step = TrainStep(model, optimizer, device=torch.device("cpu"), finite_check_every=5)
    early(torch.randn(2, 4)).sum().backward()
    assert step.deferred and not step.optimizer_state_ready()  # the first update of `early`
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert step.optimizer_state_ready()  # `late` has no gradient: nothing would be skipped at its first update
    (early(torch.randn(2, 4)).sum() + late(torch.randn(2, 4)).sum()).backward()
    assert not step.optimizer_state_ready()  # `late` is about to be updated for the first time
    optimizer.step()
    assert step.optimizer_state_ready() and step._state_ready


def test_resume_keeps_this_runs_fused_optimiser_over_the_checkpoints_flags(tmp_path):
    """torch's load_state_dict copies the checkpoint's `fused` flag into the groups: a checkpoint from a
    non-fused optimiser turned fusion off while the step still skipped on the device (a crash)."""
    from crossdistill.checkpoint import save_atomic

    raw = tiny_run(tmp_path, train={"epochs": 1, "finite_check_every": 2}, data={"train_subset": 128})
    Trainer(build_config(raw), out=io.StringIO()).fit()
    path = tmp_path / "runs" / "run" / "last.pt"
    state = torch.load(path, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = None  # as a checkpoint of a non-fused optimiser has it
    save_atomic(state, path)
    raw["train"]["epochs"] = 2
    resumed = Trainer(build_config(raw), resume=True, out=io.StringIO())
    assert all(group["fused"] for group in resumed.optimizer.param_groups)
    summary = resumed.fit()
    assert len(summary.history) == 2 and summary.history[-1]["skipped_steps"] == 0


def test_under_ddp_nonfinite_flags_are_collected_only_where_every_rank_does():
    """Rank 0 alone updates the progress bar; collecting there could stop rank 0 (too many non-finite
    steps) while the other ranks wait in the next collective."""
    from crossdistill.engine.step import collect_nonfinite_now

    common = dict(global_step=4, last_step=False, checkpoint_now=False, stop_requested=False, watching_stop=True)
    assert collect_nonfinite_now(2, 20, report_now=True, distributed=False, **common)
    assert not collect_nonfinite_now(2, 20, report_now=True, distributed=True, **common)
    assert not collect_nonfinite_now(2, 20, report_now=False, distributed=True, **{**common, "stop_requested": True})
    assert collect_nonfinite_now(2, 20, report_now=False, distributed=True, **{**common, "global_step": 9})
    for key in ("last_step", "checkpoint_now"):
        assert collect_nonfinite_now(2, 20, report_now=False, distributed=True, **{**common, key: True})
    assert collect_nonfinite_now(20, 20, report_now=False, distributed=True, **common)


class _TinyClassifier(torch.nn.Module):
    """Conv -> BatchNorm -> linear, returning what TrainStep reads from a distiller's output."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 6 * 6, 3),
        )

    def forward(self, images, target, teacher=None, indices=None):
        from types import SimpleNamespace

        loss = torch.nn.functional.cross_entropy(self.net(images), target)
        return SimpleNamespace(loss=loss, losses={"ce": loss.detach()})


@pytest.mark.parametrize("accum", [1, 2], ids=["one-batch", "accumulated"])
@pytest.mark.parametrize("path", ["per-step-check", "deferred-check", "fp16-scaler"])
def test_one_nan_pixel_leaves_the_model_and_its_batchnorm_statistics_bitwise_unchanged(path, accum):
    """With ``accum`` 2 the NaN pixel is in the first micro-batch of the step, the second is clean."""
    from conftest import SYNCING_OPS, ops_called
    from crossdistill.engine.step import MicroBatch, TrainStep

    torch.manual_seed(0)
    model = _TinyClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu") if path == "fp16-scaler" else None
    step = TrainStep(
        model,
        optimizer,
        device=torch.device("cpu"),
        scaler=scaler,
        finite_check_every=5 if path == "deferred-check" else 1,
    )
    images, target = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    clean = [MicroBatch(images.flip(0), target.flip(0))] * (accum - 1)
    for _ in range(2):  # the optimiser state exists: the deferred path skips on the device from now on
        step.step([MicroBatch(images, target), *clean], accum)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer_before = {
        f"{i}.{k}": torch.as_tensor(v).clone() for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()
    }
    poisoned = images.clone()
    poisoned[1, 0, 4, 4] = float("nan")
    poisoned_step = lambda: step.step([MicroBatch(poisoned, target), *clean], accum)  # noqa: E731
    if path == "deferred-check":  # and it reads nothing on the host
        syncing = sorted(op for op in ops_called(poisoned_step) if op.startswith(SYNCING_OPS))
        assert not syncing, syncing
        assert [tag for tag, _ in step.collect_nonfinite()] == [None]
    else:
        result = poisoned_step()
        assert not result.finite if scaler is None else bool(result.skipped_on_device)
    assert_bitwise_equal(before, model.state_dict())
    assert_bitwise_equal(
        optimizer_before,
        {f"{i}.{k}": torch.as_tensor(v) for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()},
    )
    step(images, target)  # and the next good step moves them again
    assert not torch.equal(before["net.1.running_mean"], model.state_dict()["net.1.running_mean"])


def test_a_tensor_snapshot_restores_bit_for_bit_only_where_the_device_flag_says():
    from crossdistill.engine.snapshot import TensorSnapshot

    tensors = [torch.tensor([-0.0, 1.5, float("nan")]), torch.tensor(7), torch.ones(2, 3).t(), torch.tensor([0.25])]
    original = [t.clone() for t in tensors]
    snapshot = TensorSnapshot(tensors)
    snapshot.take()
    for flag, expected in ((False, "changed"), (True, "original"), (None, "original")):
        for t in tensors:
            t.copy_(torch.full_like(t, float("inf")) if t.is_floating_point() else t + 1)
        changed = [t.clone() for t in tensors]
        snapshot.restore() if flag is None else snapshot.restore(where=torch.tensor(flag))
        assert_bitwise_equal(dict(enumerate(tensors)), dict(enumerate(original if expected == "original" else changed)))
