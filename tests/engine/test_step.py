"""The engine's training step: the deferred (on-device) finiteness check skips exactly what the per-step check skips."""

import io

import pytest
import torch

from crossdistill.config import build_config
from crossdistill.engine import Trainer
from crossdistill.errors import CrossDistillError

from conftest import tiny_run


@pytest.fixture
def fused_nan_run(rsd_nan_at_calls_3_and_4):
    """NaN losses at the 3rd and 4th forward (the engine's optimisers are fused on CPU and CUDA)."""
    return rsd_nan_at_calls_3_and_4


def _train(tmp_path, name, every, calls, **train):
    calls["n"] = 0
    out = io.StringIO()
    raw = tiny_run(tmp_path, train={"epochs": 1, "run_name": name, "finite_check_every": every, **train},
                   optim={"sched": "none"})
    trainer = Trainer(build_config(raw), out=out)
    summary = trainer.fit()
    return trainer, summary, out.getvalue()


def test_deferred_check_skips_on_the_device_like_the_per_step_check(tmp_path, fused_nan_run):
    sync, sync_summary, sync_out = _train(tmp_path, "sync", 1, fused_nan_run)
    deferred, summary, out = _train(tmp_path, "deferred", 5, fused_nan_run)
    assert deferred.step_fn.deferred and not sync.step_fn.deferred
    assert deferred.optimizer.defaults.get("fused")
    assert summary.history[0]["skipped_steps"] == sync_summary.history[0]["skipped_steps"] == 2
    assert {k: v for k, v in summary.history[0].items() if k.startswith("train_")} == \
        {k: v for k, v in sync_summary.history[0].items() if k.startswith("train_")}
    for key, value in sync.distiller.state_dict().items():
        assert torch.equal(value, deferred.distiller.state_dict()[key]), key
    for text in (out, sync_out):
        assert "non-finite loss or gradient at epoch 1, step 3" in text and "step 4" in text


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
    from crossdistill.engine.trainer import build_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2))
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
    from crossdistill.engine.trainer import use_sync_batchnorm

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
    from crossdistill.engine.trainer import TrainStep

    early, late = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    model = torch.nn.ModuleList([early, late])
    # one group each: torch's fused SGD cannot mix parameters with and without momentum buffers in a group
    optimizer = torch.optim.SGD([{"params": early.parameters()}, {"params": late.parameters()}], lr=0.1,
                                momentum=0.9, fused=True)
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
    from crossdistill.engine.trainer import collect_nonfinite_now

    common = dict(global_step=4, last_step=False, checkpoint_now=False, stop_requested=False, watching_stop=True)
    assert collect_nonfinite_now(2, 20, report_now=True, distributed=False, **common)
    assert not collect_nonfinite_now(2, 20, report_now=True, distributed=True, **common)
    assert not collect_nonfinite_now(2, 20, report_now=False, distributed=True, **{**common, "stop_requested": True})
    assert collect_nonfinite_now(2, 20, report_now=False, distributed=True, **{**common, "global_step": 9})
    for key in ("last_step", "checkpoint_now"):
        assert collect_nonfinite_now(2, 20, report_now=False, distributed=True, **{**common, key: True})
    assert collect_nonfinite_now(20, 20, report_now=False, distributed=True, **common)
