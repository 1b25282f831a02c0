"""RSD's variants: projector ablation, logits target, correlation-only, global-batch statistics under DDP."""

import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import distill, run_teacher, tiny_run
from crossdistill import Teacher, build_distiller, rsd_loss
from crossdistill.config import build_config
from crossdistill.distillers.rsd import global_rsd_loss
from crossdistill.engine import train
from crossdistill.errors import ConfigError


def pair(student="test_resnet", teacher="test_vit"):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8}
    s = timm.create_model(student, num_classes=10, **(kwargs if "vit" in student else {}))
    t = Teacher(timm.create_model(teacher, num_classes=10, **(kwargs if "vit" in teacher else {})))
    return s, t


def test_without_aad_is_linear_or_identity():
    s, t = pair()  # 96 -> 64
    rsd = build_distiller("rsd", s, t, {"projector": "linear"})
    assert isinstance(rsd.adaptor, nn.Linear) and rsd.adaptor.bias is None
    assert rsd.extra_parameter_count() == 96 * 64
    s, t = pair("test_vit", "test_vit")  # 64 -> 64
    rsd = build_distiller("rsd", s, t, {"projector": "linear"})
    assert isinstance(rsd.adaptor, nn.Identity) and rsd.extra_parameter_count() == 0
    x = torch.randn(4, 3, 32, 32)
    out = distill(rsd, x, torch.randint(0, 10, (4,)))
    emb = s.forward_head(s.forward_features(x), pre_logits=True)
    assert torch.allclose(out.losses["rsd"], 0.1 * rsd_loss(emb, run_teacher(t, x).embedding), rtol=1e-5)
    with pytest.raises(ConfigError, match="method_args.projector"):
        build_distiller("rsd", s, t, {"projector": "mlp"})


def test_correlation_only_drops_the_off_diagonal_term():
    s, t = pair()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    full = build_distiller("rsd", s, t, {"kappa": 0.01})
    torch.manual_seed(1)
    corr_only = build_distiller("rsd", s, t, {"kappa": 0.0})
    corr_only.aad.load_state_dict(full.aad.state_dict())
    z_s = full.aad(s.forward_head(s.forward_features(x), pre_logits=True))
    z_t = run_teacher(t, x).embedding
    assert torch.allclose(distill(corr_only, x, y).losses["rsd"], 0.1 * rsd_loss(z_s, z_t, kappa=0.0), rtol=1e-5)
    assert distill(corr_only, x, y).losses["rsd"] < distill(full, x, y).losses["rsd"]


def test_rsd_on_logits_has_no_projector_and_uses_teacher_logits():
    s, t = pair()
    rsd = build_distiller("rsd_logits", s, t, {})
    assert rsd.extra_parameter_count() == 0
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = distill(rsd, x, y)
    expected = 0.02 * rsd_loss(s(x), run_teacher(t, x, logits=True).logits, kappa=0.01)
    assert torch.allclose(out.losses["rsd"], expected, rtol=1e-5)


def test_the_mean_reduction_is_the_sum_at_its_reference_width_and_scaled_elsewhere():
    s, t = pair()  # the test_vit teacher is 64 wide
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    total = build_distiller("rsd", s, t, {"kappa": 0.05})
    for args in ({"reduction": "mean", "reference_dim": 64}, {"reduction": "mean"}):
        torch.manual_seed(1)
        mean = build_distiller("rsd", s, t, {"kappa": 0.05, **args})
        mean.aad.load_state_dict(total.aad.state_dict())
        z_s = total.aad(s.forward_head(s.forward_features(x), pre_logits=True))
        expected = rsd_loss(z_s, run_teacher(t, x).embedding, kappa=0.05, **args)
        assert torch.allclose(distill(mean, x, y).losses["rsd"], 0.1 * expected, rtol=1e-5)
    at_64 = build_distiller("rsd", s, t, {"kappa": 0.05, "reduction": "mean", "reference_dim": 64})
    at_64.aad.load_state_dict(total.aad.state_dict())
    assert torch.allclose(distill(at_64, x, y).losses["rsd"], distill(total, x, y).losses["rsd"], rtol=1e-5)
    with pytest.raises(ConfigError, match="method_args.reduction': must be one of"):
        build_distiller("rsd", s, t, {"reduction": "avg"})
    with pytest.raises(ConfigError, match="method_args.reference_dim': must be >= 2, got 0"):
        build_distiller("rsd", s, t, {"reference_dim": 0})


@pytest.mark.parametrize(
    "method,args",
    [
        ("rsd", {"projector": "linear"}),
        ("rsd", {"kappa": 0.0}),
        ("rsd", {"reduction": "mean"}),
        ("rsd_logits", {}),
    ],
)
def test_variants_train_through_the_engine(tmp_path, method, args):
    summary = train(build_config(tiny_run(tmp_path, method=method, method_args=args, train={"epochs": 3})))
    losses = [row["train_rsd"] for row in summary.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ global batch

WORLD, PER_RANK, DIM_S, DIM_T = 2, 5, 6, 4


def _data():
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(WORLD * PER_RANK, DIM_S, generator=gen, dtype=torch.float64)
    teacher = torch.randn(WORLD * PER_RANK, DIM_T, generator=gen, dtype=torch.float64)
    weight = torch.randn(DIM_T, DIM_S, generator=gen, dtype=torch.float64)
    return inputs, teacher, weight


def _global_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        inputs, teacher, weight = _data()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        weight = weight.clone().requires_grad_()
        x_local = inputs[rows].clone().requires_grad_()
        loss = global_rsd_loss(x_local @ weight.T, teacher[rows], kappa=0.05, global_batch=True)
        loss.backward()
        grad_w = weight.grad.clone()
        dist.all_reduce(grad_w)  # what DDP does to parameter gradients: average over ranks
        grad_w /= WORLD
        local_loss = global_rsd_loss(inputs[rows] @ weight.detach().T, teacher[rows], kappa=0.05, global_batch=False)
        torch.save(
            {"loss": loss.detach(), "grad_w": grad_w, "grad_x": x_local.grad, "local_loss": local_loss},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_global_batch_rsd_equals_single_process_on_the_concatenated_batch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_global_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")

    inputs, teacher, weight = _data()
    weight = weight.clone().requires_grad_()
    x = inputs.clone().requires_grad_()
    reference = rsd_loss(x @ weight.T, teacher, kappa=0.05)
    reference.backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(got["loss"], reference.detach(), rtol=1e-5, atol=1e-8)
        # parameter gradients after DDP averaging equal the single-process gradient
        assert torch.allclose(got["grad_w"], weight.grad, rtol=1e-5, atol=1e-8)
        # each rank's samples receive world_size x their single-process gradient (DDP divides it back)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        assert torch.allclose(got["grad_x"], WORLD * x.grad[rows], rtol=1e-5, atol=1e-8)
        # and the per-rank statistics (the official default) really differ from the global ones
        assert not torch.allclose(got["local_loss"], reference.detach(), rtol=1e-3)
