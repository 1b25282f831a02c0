"""rsd_loss against an independent float64 implementation of the official formula."""

import re

import numpy as np
import pytest
import torch

from crossdistill import rsd_loss


def reference_rsd(z_s: np.ndarray, z_t: np.ndarray, kappa: float) -> float:
    """The official code's formula, written out in numpy float64."""

    def standardise(x):
        return (x - x.mean(axis=0)) / (x.std(axis=0, ddof=0) + 1e-5)

    batch = z_s.shape[0]
    c = standardise(z_t).T @ standardise(z_s) / batch
    total = 0.0
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            total += (c[i, j] - 1.0) ** 2 if i == j else kappa * c[i, j] ** 2
    return total


@pytest.mark.parametrize("batch,dim", [(2, 3), (8, 16), (32, 64), (128, 24), (5, 200)])
@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.5])
def test_matches_float64_reference(batch, dim, kappa):
    gen = np.random.default_rng(batch * 1000 + dim)
    z_s = gen.normal(size=(batch, dim)) * gen.uniform(0.1, 3.0, size=dim) + gen.normal(size=dim)
    z_t = gen.normal(size=(batch, dim)) * 2.0 + 0.5 * z_s
    expected = reference_rsd(z_s, z_t, kappa)
    got = rsd_loss(torch.tensor(z_s, dtype=torch.float32), torch.tensor(z_t, dtype=torch.float32), kappa=kappa)
    assert got.dtype == torch.float32
    assert abs(got.item() - expected) / abs(expected) < 1e-5
    got64 = rsd_loss(torch.tensor(z_s), torch.tensor(z_t), kappa=kappa)
    assert abs(got64.item() - expected) / abs(expected) < 1e-10


def test_is_a_sum_not_a_mean():
    # Identical, perfectly standardisable embeddings: C = I (up to eps), so the loss is ~0;
    # independent embeddings: the diagonal alone contributes about D.
    torch.manual_seed(0)
    z = torch.randn(4096, 32, dtype=torch.float64)
    assert rsd_loss(z, z, kappa=0.0).item() < 1e-6
    independent = rsd_loss(torch.randn(4096, 32, dtype=torch.float64), z, kappa=0.0).item()
    assert 30 < independent < 34


def test_bf16_autocast_inputs_are_computed_in_fp32():
    torch.manual_seed(1)
    z_s32, z_t32 = torch.randn(64, 48), torch.randn(64, 48)
    z_s, z_t = z_s32.bfloat16().requires_grad_(), z_t32.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rsd_loss(z_s, z_t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = reference_rsd(z_s.detach().double().numpy(), z_t.double().numpy(), 0.01)
    assert abs(loss.item() - expected) / expected < 1e-5
    loss.backward()
    assert torch.isfinite(z_s.grad.float()).all()


def test_batch_of_one_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 samples"):
        rsd_loss(torch.randn(1, 8), torch.randn(1, 8))


def test_zero_variance_feature_gives_finite_loss_and_gradients():
    torch.manual_seed(2)
    z_s = torch.randn(16, 8)
    z_s[:, 3] = 1.5  # a dead unit: constant across the batch
    z_s.requires_grad_()
    z_t = torch.randn(16, 8)
    z_t[:, 5] = -2.0
    loss = rsd_loss(z_s, z_t)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z_s.grad).all()
    # the constant column standardises to zeros: the formula's value with those columns zeroed
    expected = reference_rsd(z_s.detach().double().numpy(), z_t.double().numpy(), 0.01)
    assert abs(loss.item() - expected) / expected < 1e-5


def test_identical_samples_do_not_produce_nan():
    z = torch.ones(4, 6, requires_grad=True)
    loss = rsd_loss(z, torch.ones(4, 6))
    loss.backward()
    assert loss.item() == pytest.approx(6.0)  # C = 0: only the diagonal terms (0 - 1)^2
    assert torch.isfinite(z.grad).all()


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"^rsd_loss: student \(4, 8\) and teacher \(4, 16\) embeddings differ in shape; "
        r"project the student to the teacher width first \(AADProjector\)$",
    ):
        rsd_loss(torch.randn(4, 8), torch.randn(4, 16))


@pytest.mark.parametrize("z_s,z_t", [((4, 8, 1), (4, 8)), ((4, 8), (4, 8, 1)), ((8,), (8,))])
def test_embeddings_that_are_not_2d_are_a_clear_error(z_s, z_t):
    """Either side not [B, D] is named as such, shapes and all (not reported as a width mismatch)."""
    with pytest.raises(
        ValueError,
        match=rf"^rsd_loss expects 2-D embeddings \[B, D\], got "
        rf"{re.escape(str(z_s))} and {re.escape(str(z_t))}$",
    ):
        rsd_loss(torch.randn(z_s), torch.randn(z_t))


def reference_mean_rsd(z_s: np.ndarray, z_t: np.ndarray, kappa: float, reference_dim: int = 768) -> float:
    """The width-free loss written from its definition: the mean of the D diagonal terms times reference_dim, plus
    kappa times the mean of the D(D - 1) off-diagonal terms times reference_dim (reference_dim - 1)."""

    def standardise(x):
        return (x - x.mean(axis=0)) / (x.std(axis=0, ddof=0) + 1e-5)

    c = standardise(z_t).T @ standardise(z_s) / z_s.shape[0]
    eye = np.eye(c.shape[0], dtype=bool)
    on = np.mean((c[eye] - 1.0) ** 2)
    off = np.mean(c[~eye] ** 2)
    return reference_dim * on + kappa * reference_dim * (reference_dim - 1) * off


def correlated_pair(batch: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    z_s = gen.normal(size=(batch, dim)) * gen.uniform(0.1, 3.0, size=dim) + gen.normal(size=dim)
    return z_s, gen.normal(size=(batch, dim)) * 2.0 + 0.5 * z_s


@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.5])
def test_the_mean_reduction_equals_the_official_sum_at_the_swin_t_width(kappa):
    z_s, z_t = (torch.tensor(a) for a in correlated_pair(64, 768, seed=7))
    total = rsd_loss(z_s, z_t, kappa=kappa)
    mean = rsd_loss(z_s, z_t, kappa=kappa, reduction="mean")
    assert mean.dtype == torch.float64
    assert abs(mean.item() - total.item()) / total.item() < 1e-12
    assert abs(total.item() - reference_rsd(z_s.numpy(), z_t.numpy(), kappa)) / total.item() < 1e-10


# D = 2: the narrowest teacher with off-diagonal terms (its 2 terms are rescaled like any other width's)
@pytest.mark.parametrize(
    "batch,dim,reference_dim", [(8, 16, 768), (32, 64, 768), (128, 24, 512), (5, 200, 2), (16, 2, 768)]
)
@pytest.mark.parametrize("kappa", [0.0, 0.01, 0.5])
def test_the_mean_reduction_matches_its_float64_reference(batch, dim, reference_dim, kappa):
    z_s, z_t = correlated_pair(batch, dim, seed=batch * 1000 + dim)
    expected = reference_mean_rsd(z_s, z_t, kappa, reference_dim)
    got = rsd_loss(torch.tensor(z_s), torch.tensor(z_t), kappa=kappa, reduction="mean", reference_dim=reference_dim)
    assert abs(got.item() - expected) / abs(expected) < 1e-10
    got32 = rsd_loss(
        torch.tensor(z_s, dtype=torch.float32),
        torch.tensor(z_t, dtype=torch.float32),
        kappa=kappa,
        reduction="mean",
        reference_dim=reference_dim,
    )
    assert got32.dtype == torch.float32 and abs(got32.item() - expected) / abs(expected) < 1e-5


def test_the_mean_reduction_gives_independent_features_the_same_loss_at_every_width():
    # independent embeddings: every C_ii is ~0, so the diagonal's mean is ~1 at any width; the sum grows with D
    torch.manual_seed(0)
    for dim in (16, 64, 256):
        z_s, z_t = torch.randn(8192, dim, dtype=torch.float64), torch.randn(8192, dim, dtype=torch.float64)
        assert rsd_loss(z_s, z_t, kappa=0.0, reduction="mean").item() == pytest.approx(768, rel=0.02)
        assert rsd_loss(z_s, z_t, kappa=0.0).item() == pytest.approx(dim, rel=0.02)
        # off-diagonal C_ij ~ N(0, 1/B): the mean of their squares is 1/B at every width (within 4 standard errors
        # of a mean of D(D - 1) squared normals), while their sum grows with D^2
        off = rsd_loss(z_s, z_t, kappa=1.0, reduction="mean").item() - rsd_loss(z_s, z_t, 0.0, "mean").item()
        assert off == pytest.approx(768 * 767 / 8192, rel=4 * (2 / (dim * (dim - 1))) ** 0.5)


def test_the_mean_reduction_of_one_feature_has_no_off_diagonal_term():
    z_s, z_t = torch.randn(16, 1, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    loss = rsd_loss(z_s, z_t, kappa=0.5, reduction="mean")
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(768 * rsd_loss(z_s, z_t, kappa=0.0).item(), rel=1e-12)


def test_a_bad_reduction_or_reference_width_is_a_clear_error():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=re.escape("reduction must be one of ('sum', 'mean'), got 'avg'")):
        rsd_loss(z, z, reduction="avg")
    with pytest.raises(ValueError, match="reference_dim must be at least 2, got 1"):
        rsd_loss(z, z, reduction="mean", reference_dim=1)
