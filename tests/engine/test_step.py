"""The engine's training step: the deferred (on-device) finiteness check skips exactly what the per-step check skips."""

import io

import pytest
import torch

from crossdistill.config import build_config
from crossdistill.engine import Trainer
from crossdistill.errors import CrossDistillError

from conftest import tiny_run


@pytest.fixture
def fused_nan_run(monkeypatch):
    """NaN losses at the 3rd and 4th forward (the engine's optimisers are fused on CPU and CUDA)."""
    from crossdistill.distillers.rsd import RSD

    original = RSD.forward
    calls = {"n": 0}

    def sometimes_nan(self, x, target):
        out = original(self, x, target)
        calls["n"] += 1
        if calls["n"] in (3, 4):
            out.losses["rsd"] = out.losses["rsd"] * float("nan")
        return out

    monkeypatch.setattr(RSD, "forward", sometimes_nan)
    return calls


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
