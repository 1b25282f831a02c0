"""RSD's AAD projector: the official layout, init and parameter count."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import crossdistill
from crossdistill import AADProjector
from crossdistill.models import Teacher, embedding_dim


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_public_name():
    from crossdistill.models import AADProjector as inner

    assert crossdistill.AADProjector is inner


def test_layout():
    torch.manual_seed(0)
    aad = AADProjector(512, 768, gamma=2)
    layers = list(aad.children())
    assert [type(m) for m in layers] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    first, bn, gelu, last = layers
    assert (first.in_features, first.out_features) == (512, 1024)
    assert (last.in_features, last.out_features) == (1024, 768)
    assert first.bias is None and last.bias is None
    assert bn.num_features == 1024 and bn.affine and bn.track_running_stats
    assert bn.eps == 1e-5 and bn.momentum == 0.1
    assert torch.equal(bn.weight, torch.ones(1024)) and torch.equal(bn.bias, torch.zeros(1024))
    assert gelu.approximate == "none"
    assert (aad.student_dim, aad.teacher_dim, aad.gamma) == (512, 768, 2)


def test_forward_shape_and_grad():
    aad = AADProjector(16, 24).train()
    x = torch.randn(4, 16, requires_grad=True)
    y = aad(x)
    assert y.shape == (4, 24)
    y.square().sum().backward()
    assert x.grad is not None
    assert all(p.grad is not None for p in aad.parameters())


def test_linear_init_is_trunc_normal_std_002():
    torch.manual_seed(0)
    aad = AADProjector(512, 768, gamma=2)
    for linear in linears(aad):
        w = linear.weight.detach()
        assert abs(w.std().item() - 0.02) < 0.002, w.std()  # within 10 %
        assert abs(w.mean().item()) < 0.002
        # torch's trunc_normal_ bounds are absolute (a=-2, b=2), i.e. 100 std at std 0.02:
        # in effect an untruncated normal, as the official code (timm's trunc_normal_) has it
        assert w.abs().max().item() <= 2.0
        assert w.abs().max().item() > 3 * 0.02  # not a uniform (kaiming) init in [-1/sqrt(fan_in), ...]


def test_parameter_count_resnet18_to_swin_tiny():
    """1,312,768 = 512*1024 + 2*1024 (BN affine) + 1024*768, the widths read from the real models."""
    student = timm.create_model("resnet18", pretrained=False)
    teacher = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    aad = AADProjector(embedding_dim(student), embedding_dim(teacher), gamma=2)
    assert trainable(aad) == 1_312_768
    distiller = crossdistill.build_distiller("rsd", student, Teacher(teacher), {})
    assert distiller.extra_parameter_count() == 1_312_768
    assert trainable(distiller.aad) == 1_312_768


@pytest.mark.parametrize("student_dim,teacher_dim", [(512, 768), (192, 384), (1280, 768)])
def test_gamma_sets_hidden_width(student_dim, teacher_dim):
    two = AADProjector(student_dim, teacher_dim, gamma=2)
    four = AADProjector(student_dim, teacher_dim, gamma=4)
    assert two[0].out_features == 2 * student_dim
    assert four[0].out_features == 4 * student_dim == 2 * two[0].out_features
    assert four[1].num_features == 4 * student_dim and four[3].in_features == 4 * student_dim
    hidden = lambda g: g * student_dim  # noqa: E731
    for gamma, aad in ((2, two), (4, four)):
        assert trainable(aad) == student_dim * hidden(gamma) + 2 * hidden(gamma) + hidden(gamma) * teacher_dim
    assert AADProjector(student_dim, teacher_dim, gamma=1)[0].out_features == student_dim


def test_default_gamma_is_two():
    assert AADProjector(8, 8)[0].out_features == 16


def test_integral_float_gamma_is_accepted():
    aad = AADProjector(8, 8, gamma=3.0)
    assert aad.gamma == 3 and isinstance(aad.gamma, int) and aad[0].out_features == 24


@pytest.mark.parametrize("gamma", [0, -1, 1.5, 0.5])
def test_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        AADProjector(512, 768, gamma=gamma)


@pytest.mark.parametrize("dims", [(0, 768), (512, 0), (-1, 8)])
def test_bad_widths(dims):
    with pytest.raises(ValueError, match=f"^AADProjector widths must be positive, got {dims[0]} -> {dims[1]}$"):
        AADProjector(*dims)


def test_a_width_of_one_is_valid():
    """The smallest widths are legal (a 1-d embedding, a 1-d teacher target)."""
    aad = AADProjector(1, 1, gamma=1)
    assert [aad[0].in_features, aad[0].out_features, aad[3].out_features] == [1, 1, 1]
