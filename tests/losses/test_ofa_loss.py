import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossdistill.losses.ofa import ofa_loss, ofa_target_mask


def reference_ofa(z_s, z_t, labels, eps, temperature):
    """The OFA loss in float64 numpy, written from the formula with explicit per-class weights:
    (1 + p_t,y)^eps - 1 on the target class y, p_t,c^eps on the other classes."""
    z_s = np.asarray(z_s, dtype=np.float64) / temperature
    z_t = np.asarray(z_t, dtype=np.float64) / temperature
    total = 0.0
    for zs, zt, y in zip(z_s, z_t, labels):
        log_p_s = zs - zs.max() - np.log(np.exp(zs - zs.max()).sum())
        p_t = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
        weights = p_t**eps
        weights[y] = (1.0 + p_t[y]) ** eps - 1.0
        total += -(weights * log_p_s).sum()
    return total / len(labels)


def official_form(z_s, z_t, mask, eps, temperature=1.0):
    """The official expression, torch.log(softmax) included."""
    p_s = F.softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    return torch.sum(-((p_t + mask) ** eps - mask) * torch.log(p_s), dim=-1).mean()


def random_case(batch=7, classes=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(batch, classes, generator=g) * scale
    z_t = torch.randn(batch, classes, generator=g) * scale
    labels = torch.randint(0, classes, (batch,), generator=g)
    return z_s, z_t, labels


@pytest.mark.parametrize("eps", [1.0, 1.5, 0.5, 2.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_float64_reference_with_hard_targets(eps, temperature):
    z_s, z_t, labels = random_case(seed=int(eps * 10 + temperature))
    got = ofa_loss(z_s, z_t, ofa_target_mask(labels, z_s.shape[1]), eps, temperature)
    want = reference_ofa(z_s.numpy(), z_t.numpy(), labels.numpy(), eps, temperature)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert abs(got.item() - want) / abs(want) < 1e-5


@pytest.mark.parametrize("eps", [1.0, 1.5])
def test_soft_targets_use_their_argmax(eps):
    z_s, z_t, _ = random_case(seed=3)
    torch.manual_seed(4)
    # mixup-like soft labels with label smoothing: the mask is the argmax class
    soft = torch.distributions.Dirichlet(torch.ones(z_s.shape[1])).sample((z_s.shape[0],))
    soft = 0.9 * soft + 0.1 / z_s.shape[1]
    labels = soft.argmax(-1)
    mask = ofa_target_mask(soft, z_s.shape[1])
    assert torch.equal(mask, F.one_hot(labels, z_s.shape[1]))
    got = ofa_loss(z_s, z_t, mask, eps)
    want = reference_ofa(z_s.numpy(), z_t.numpy(), labels.numpy(), eps, 1.0)
    assert abs(got.item() - want) / abs(want) < 1e-5


def test_eps_one_is_soft_target_cross_entropy_and_ignores_the_target():
    # eps = 1: weights (p_t + m) - m = p_t, so L = -sum p_t log p_s = KL(p_t || p_s) + H(p_t)
    z_s, z_t, labels = random_case(seed=5)
    for temperature in (1.0, 3.0):
        got = ofa_loss(z_s, z_t, ofa_target_mask(labels, 11), 1.0, temperature)
        other = ofa_loss(z_s, z_t, ofa_target_mask((labels + 1) % 11, 11), 1.0, temperature)
        p_t = F.softmax(z_t / temperature, dim=1)
        soft_ce = F.cross_entropy(z_s / temperature, p_t)
        kl = F.kl_div(F.log_softmax(z_s / temperature, dim=1), p_t, reduction="batchmean")
        entropy = -(p_t * p_t.log()).sum(-1).mean()
        assert torch.allclose(got, other, rtol=1e-6)
        assert torch.allclose(got, soft_ce, rtol=1e-6)
        assert torch.allclose(got, kl + entropy, rtol=1e-5)


def test_eps_above_one_puts_more_weight_on_the_target_class():
    z_s, z_t, labels = random_case(seed=6)
    mask = ofa_target_mask(labels, 11)
    z = z_s.clone().requires_grad_(True)
    ofa_loss(z, z_t, mask, 1.0).backward()
    g1 = z.grad.clone()
    z.grad = None
    ofa_loss(z, z_t, mask, 2.0).backward()
    g2 = z.grad
    # the target logit is pulled up harder (more negative gradient) with eps = 2
    target_grad = lambda g: g.gather(1, labels[:, None]).squeeze(1)  # noqa: E731
    assert (target_grad(g2) < target_grad(g1)).all()


def test_gradient_matches_the_closed_form():
    # dL/dz_s = (sum_c w_c * p_s - w) / (B T) with w = (p_t + m)^eps - m
    z_s, z_t, labels = random_case(seed=8)
    mask = ofa_target_mask(labels, 11).double()
    eps, temperature = 1.5, 2.0
    z = z_s.double().requires_grad_(True)
    ofa_loss(z, z_t.double(), mask, eps, temperature).backward()
    p_s = F.softmax(z_s.double() / temperature, 1)
    w = (F.softmax(z_t.double() / temperature, 1) + mask) ** eps - mask
    want = (w.sum(1, keepdim=True) * p_s - w) / (z_s.shape[0] * temperature)
    assert torch.allclose(z.grad, want, atol=1e-12)


def test_log_softmax_agrees_with_the_official_log_of_softmax():
    for seed in range(4):
        z_s, z_t, labels = random_case(batch=16, classes=100, seed=seed, scale=5.0)
        mask = ofa_target_mask(labels, 100)
        for eps in (1.0, 1.5):
            ours, official = ofa_loss(z_s, z_t, mask, eps), official_form(z_s, z_t, mask.float(), eps)
            assert abs(ours.item() - official.item()) / official.item() < 1e-6


def test_extreme_logits_stay_finite_where_log_of_softmax_does_not():
    z_s = torch.tensor([[200.0, 0.0, -10.0]])
    z_t = torch.tensor([[0.0, 1.0, 0.0]])
    mask = ofa_target_mask(torch.tensor([1]), 3)
    assert not torch.isfinite(official_form(z_s, z_t, mask.float(), 1.0))
    got = ofa_loss(z_s, z_t, mask, 1.0)
    want = reference_ofa(z_s.numpy(), z_t.numpy(), [1], 1.0, 1.0)
    assert torch.isfinite(got) and abs(got.item() - want) / want < 1e-5


def test_float32_under_bf16_autocast():
    z_s, z_t, labels = random_case(seed=9)
    mask = ofa_target_mask(labels, 11)
    zs16, zt16 = z_s.bfloat16(), z_t.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ofa_loss(zs16, zt16, mask, 1.5, 2.0)
    assert got.dtype == torch.float32
    want = reference_ofa(zs16.float().numpy(), zt16.float().numpy(), labels.numpy(), 1.5, 2.0)
    assert abs(got.item() - want) / want < 1e-5


def test_float64_stays_float64():
    z_s, z_t, labels = random_case(seed=10)
    got = ofa_loss(z_s.double(), z_t.double(), ofa_target_mask(labels, 11), 1.5)
    assert got.dtype == torch.float64
    assert abs(got.item() - reference_ofa(z_s.numpy(), z_t.numpy(), labels.numpy(), 1.5, 1.0)) < 1e-12


def test_bad_inputs_are_clear_errors():
    z = torch.randn(4, 5)
    mask = ofa_target_mask(torch.tensor([0, 1, 2, 3]), 5)
    with pytest.raises(ValueError, match="same shape"):
        ofa_loss(z, torch.randn(4, 6), mask, 1.0)
    with pytest.raises(ValueError, match="target_mask"):
        ofa_loss(z, z, mask[:3], 1.0)
    with pytest.raises(ValueError, match="temperature"):
        ofa_loss(z, z, mask, 1.0, temperature=0.0)
    with pytest.raises(ValueError, match="classes"):
        ofa_target_mask(torch.rand(4, 6), 5)
    with pytest.raises(ValueError, match="targets must be"):
        ofa_target_mask(torch.zeros(4, 5, 1), 5)


def test_target_mask_is_a_long_one_hot_on_the_labels_device():
    mask = ofa_target_mask(torch.tensor([2, 0, 1]), 4)
    assert mask.dtype == torch.long  # what F.one_hot gives, which the scatter replaces
    assert mask.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    # built where the labels are (a GPU batch gets a GPU mask); "meta" stands in for a second device
    assert ofa_target_mask(torch.tensor([2, 0, 1], device="meta"), 4).device.type == "meta"


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float64, torch.float16])
def test_the_mask_dtype_changes_neither_the_value_nor_the_dtype_of_the_loss(mask_dtype):
    """The loss dtype follows the student logits (float32 here), whatever the mask is stored as."""
    z_s, z_t, labels = random_case(seed=11)
    mask = ofa_target_mask(labels, 11)
    want = ofa_loss(z_s, z_t, mask, 1.5, 2.0)
    got = ofa_loss(z_s, z_t, mask.to(mask_dtype), 1.5, 2.0)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_the_loss_warns_nothing():
    """Softmax over the classes is asked for by dim: torch warns (every step) when the dim is left implicit."""
    z_s, z_t, labels = random_case(seed=12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ofa_loss(z_s, z_t, ofa_target_mask(labels, 11), 1.5, 2.0)
