"""kd_loss, dkd_loss and dist_loss against independent float64 numpy implementations of their formulas."""

import re

import numpy as np
import pytest
import torch

from crossdistill.losses.dist import dist_loss, pearson_correlation
from crossdistill.losses.dkd import dkd_loss, dkd_warmup_factor, hard_labels
from crossdistill.losses.kd import kd_loss

# ---------------------------------------------------------------- numpy references (float64)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum_i p_i log(p_i / q_i) of one pair of distributions (0 log 0 = 0)."""
    total = 0.0
    for pi, qi in zip(p, q):
        if pi > 0:
            total += pi * np.log(pi / qi)
    return total


def reference_kd(zs, zt, T):
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    return T * T * sum(np_kl(pt[b], ps[b]) for b in range(zs.shape[0])) / zs.shape[0]


def reference_dkd(zs, zt, labels, alpha, beta, T):
    batch, classes = zs.shape
    ps, pt = np_softmax(zs / T), np_softmax(zt / T)
    tckd = nckd = 0.0
    for b in range(batch):
        g = labels[b]
        # target vs. the rest
        bs = np.array([ps[b, g], 1.0 - ps[b, g]])
        bt = np.array([pt[b, g], 1.0 - pt[b, g]])
        tckd += np_kl(bt, bs)
        # distribution over the non-target classes (renormalised)
        keep = [c for c in range(classes) if c != g]
        qs = ps[b, keep] / ps[b, keep].sum()
        qt = pt[b, keep] / pt[b, keep].sum()
        nckd += np_kl(qt, qs)
    return T * T * (alpha * tckd + beta * nckd) / batch


def np_pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + eps))


def reference_dist(zs, zt, beta, gamma, tau):
    ys, yt = np_softmax(zs / tau), np_softmax(zt / tau)
    batch, classes = ys.shape
    inter = 1.0 - np.mean([np_pearson(ys[b], yt[b]) for b in range(batch)])
    intra = 1.0 - np.mean([np_pearson(ys[:, c], yt[:, c]) for c in range(classes)])
    return tau * tau * (beta * inter + gamma * intra)


def random_logits(batch, classes, seed, scale=3.0):
    """float64 logits that are exactly representable in float32 (so fp32 and fp64 calls see the same numbers)."""
    gen = np.random.default_rng(seed)
    zs = gen.normal(size=(batch, classes)) * scale
    zt = gen.normal(size=(batch, classes)) * scale + 0.5 * zs
    return zs.astype(np.float32).astype(np.float64), zt.astype(np.float32).astype(np.float64)


def rel_err(got: torch.Tensor, expected: float) -> float:
    return abs(got.item() - expected) / max(abs(expected), 1e-12)


SHAPES = [(2, 3), (4, 7), (8, 10), (32, 100), (3, 1000)]
DEGENERATE_SHAPES = [(1, 2), (2, 2), (1, 1000)]
"""One sample or two classes: Pearson correlations of 2-vectors are +-1 and the losses can be ~0, so
float32 results are compared with an absolute tolerance there; the float64 path must still agree exactly."""


def random_labels(zt: np.ndarray, seed: int) -> np.ndarray:
    """Class labels: the teacher's top class for about half the samples (as for a trained teacher), random otherwise."""
    gen = np.random.default_rng(seed)
    labels = gen.integers(0, zt.shape[1], size=zt.shape[0])
    top = gen.random(zt.shape[0]) < 0.5
    labels[top] = zt.argmax(axis=1)[top]
    return labels


TEMPERATURES = [0.5, 1.0, 4.0]

# ---------------------------------------------------------------- KD


@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_kd_matches_float64_reference(batch, classes, T):
    zs, zt = random_logits(batch, classes, seed=batch * 7 + classes)
    expected = reference_kd(zs, zt, T)
    got = kd_loss(torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32), temperature=T)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert rel_err(got, expected) < 1e-5
    got64 = kd_loss(torch.tensor(zs), torch.tensor(zt), temperature=T)
    assert got64.dtype == torch.float64 and rel_err(got64, expected) < 1e-10


def test_kd_applies_t_squared_and_batchmean():
    zs, zt = random_logits(6, 5, seed=3)
    s, t = torch.tensor(zs), torch.tensor(zt)
    # batchmean: duplicating the batch leaves the loss unchanged (a sum would double it)
    assert torch.allclose(kd_loss(torch.cat([s, s]), torch.cat([t, t]), 2.0), kd_loss(s, t, 2.0))
    # T^2: the KL of the tempered distributions, times T^2
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 3, 1), torch.softmax(t / 3, 1), reduction="batchmean")
    assert torch.allclose(kd_loss(s, t, 3.0), 9 * kl)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(16, 10) * 4
    assert kd_loss(z, z.clone(), 2.0).item() == 0.0
    assert kd_loss(z + 5.0, z, 1.0).abs().item() < 1e-6  # softmax ignores a per-sample shift
    assert kd_loss(torch.randn(16, 10), z, 1.0).item() > 0


def test_kd_extreme_teacher_logits_are_finite():
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.zeros(4, 10)
    zt[:, 0] = 500.0  # teacher probabilities underflow to exactly 0 outside class 0
    loss = kd_loss(zs, zt)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    expected = -torch.log_softmax(zs.detach(), 1)[:, 0].mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


# ---------------------------------------------------------------- DKD


@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("alpha,beta", [(1.0, 2.0), (0.5, 8.0), (1.0, 0.0), (0.0, 1.0)])
def test_dkd_matches_float64_reference(batch, classes, T, alpha, beta):
    zs, zt = random_logits(batch, classes, seed=batch * 11 + classes)
    labels = random_labels(zt, seed=batch + classes)
    expected = reference_dkd(zs, zt, labels, alpha, beta, T)
    target = torch.tensor(labels)
    got = dkd_loss(torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32), target, alpha, beta, T)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert rel_err(got, expected) < 1e-5
    got64 = dkd_loss(torch.tensor(zs), torch.tensor(zt), target, alpha, beta, T)
    assert rel_err(got64, expected) < 1e-10


@pytest.mark.parametrize("batch,classes", [(8, 10), (32, 100)])
def test_dkd_soft_mixup_targets_use_the_argmax_class(batch, classes):
    zs, zt = random_logits(batch, classes, seed=5)
    gen = np.random.default_rng(6)
    a, b = gen.integers(0, classes, size=batch), gen.integers(0, classes, size=batch)
    lam, smoothing = 0.7, 0.1
    soft = np.full((batch, classes), smoothing / classes)
    soft[np.arange(batch), a] += lam * (1 - smoothing)
    soft[np.arange(batch), b] += (1 - lam) * (1 - smoothing)
    labels = soft.argmax(axis=1)  # class a (lam > 0.5), even where a == b
    assert (labels == a).all()
    expected = reference_dkd(zs, zt, labels, 1.0, 2.0, 1.0)
    got = dkd_loss(
        torch.tensor(zs, dtype=torch.float32),
        torch.tensor(zt, dtype=torch.float32),
        torch.tensor(soft, dtype=torch.float32),
        1.0,
        2.0,
        1.0,
    )
    assert rel_err(got, expected) < 1e-5
    # the same as passing the hard labels
    hard = dkd_loss(torch.tensor(zs), torch.tensor(zt), torch.tensor(labels), 1.0, 2.0, 1.0)
    assert rel_err(hard, expected) < 1e-10


def test_dkd_is_zero_for_identical_logits():
    z = torch.randn(8, 10) * 3
    y = torch.randint(0, 10, (8,))
    assert abs(dkd_loss(z, z.clone(), y).item()) < 1e-6


def test_dkd_confident_teacher_gives_finite_loss_and_gradients():
    # the official torch.log(softmax) would take log(0) here; the log-sum-exp form stays finite
    zs = torch.zeros(4, 10)
    zs[:, 3] = -200.0  # student target probability underflows in float32
    zs.requires_grad_()
    zt = torch.randn(4, 10)
    y = torch.full((4,), 3)
    loss = dkd_loss(zs, zt, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all()
    expected = reference_dkd(zs.detach().double().numpy(), zt.double().numpy(), y.numpy(), 1.0, 2.0, 1.0)
    assert rel_err(loss, expected) < 1e-5


def test_dkd_input_errors():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_loss(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="same classes"):
        dkd_loss(z, torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="4 logits but 3 targets"):
        dkd_loss(z, z, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="soft targets have 6 classes"):
        hard_labels(torch.rand(4, 6), 5)


def test_dkd_losses_make_no_host_device_sync():
    """DKD and SD-DKD select the non-target logits with computed indices, not masked_select (a GPU sync
    per call, four per loss), and keep their class order."""
    from conftest import SYNCING_OPS, ops_called
    from crossdistill.losses.dkd import decouple_target
    from crossdistill.losses.sdd import sdd_dkd_loss

    torch.manual_seed(0)
    zs, zt, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
    rs, rt = torch.randn(8, 5, 10), torch.randn(8, 5, 10)
    for fn, args in ((dkd_loss, (zs, zt, y)), (sdd_dkd_loss, (rs, rt, y))):
        called = ops_called(fn, *args)
        assert not [op for op in called if op.startswith(SYNCING_OPS)], sorted(called)
    _, other = decouple_target(zs, y)
    expected = torch.stack([torch.cat([zs[i, : y[i]], zs[i, y[i] + 1 :]]) for i in range(8)])
    assert torch.equal(other, expected)


def test_float_class_indices_are_refused():
    with pytest.raises(ValueError, match=r"^class-index targets must be integers, got torch.float32$"):
        hard_labels(torch.zeros(4), 5)


def test_decouple_target_works_on_the_logits_device():
    """Labels on another device than the logits (CPU labels, GPU logits) are moved to the logits' device, and
    the column indices are made there; "meta" stands in for a GPU."""
    from crossdistill.losses.dkd import decouple_target

    binary, other = decouple_target(torch.randn(4, 6, device="meta"), torch.tensor([0, 5, 2, 3]))
    assert binary.device.type == other.device.type == "meta"
    assert binary.shape == (4, 2) and other.shape == (4, 5)


def test_dkd_warmup_factor_follows_the_original_schedule():
    # mdistiller: min(epoch / warmup, 1) with 1-based epochs == min((epoch + 1) / warmup, 1) 0-based
    assert [dkd_warmup_factor(e, 20) for e in (0, 1, 9, 18, 19, 20, 299)] == [0.05, 0.1, 0.5, 0.95, 1.0, 1.0, 1.0]
    assert dkd_warmup_factor(0, 1) == 1.0
    # OFA/RSD: no warm-up
    assert all(dkd_warmup_factor(e, 0) == 1.0 for e in range(5))
    with pytest.raises(ValueError, match=r"^warmup_epochs must be >= 0, got -1$"):
        dkd_warmup_factor(0, -1)


# ---------------------------------------------------------------- DIST


@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_dist_matches_float64_reference(batch, classes, tau, beta, gamma):
    zs, zt = random_logits(batch, classes, seed=batch * 13 + classes, scale=1.5)
    expected = reference_dist(zs, zt, beta, gamma, tau)
    got = dist_loss(torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32), beta, gamma, tau)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert rel_err(got, expected) < 1e-5
    got64 = dist_loss(torch.tensor(zs), torch.tensor(zt), beta, gamma, tau)
    assert rel_err(got64, expected) < 1e-10


def test_dist_is_zero_for_identical_logits():
    z = torch.randn(16, 10) * 2
    assert abs(dist_loss(z, z.clone()).item()) < 1e-5
    assert dist_loss(torch.randn(16, 10) * 2, z).item() > 0.1


def test_pearson_is_invariant_to_positive_affine_maps():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.rand(6, 20, generator=gen, dtype=torch.float64), torch.rand(6, 20, generator=gen, dtype=torch.float64)
    r = pearson_correlation(a, b)
    assert torch.allclose(pearson_correlation(a, 3.0 * b + 0.7), r, rtol=1e-6)
    assert torch.allclose(pearson_correlation(0.2 * a - 5.0, b), r, rtol=1e-6)
    assert torch.allclose(pearson_correlation(a, -b), -r, rtol=1e-6)
    expected = [np_pearson(a[i].numpy(), b[i].numpy()) for i in range(6)]
    assert np.allclose(r.numpy(), expected, rtol=1e-12)


def test_dist_invariance_of_the_teacher_logits():
    # Pearson is applied to the softmax probabilities: the loss ignores a per-sample shift of the
    # teacher's logits (softmax is shift-invariant), but scaling the logits changes the probabilities.
    gen = torch.Generator().manual_seed(5)
    zs, zt = (
        torch.randn(8, 10, generator=gen, dtype=torch.float64),
        torch.randn(8, 10, generator=gen, dtype=torch.float64),
    )
    base = dist_loss(zs, zt)
    shifted = zt + torch.randn(8, 1, generator=gen, dtype=torch.float64) * 10
    assert torch.allclose(dist_loss(zs, shifted), base, rtol=1e-10)
    assert not torch.allclose(dist_loss(zs, 3.0 * zt), base, rtol=1e-3)


def test_dist_batch_of_one_has_constant_intra_term():
    zs, zt = torch.randn(1, 10), torch.randn(1, 10)
    inter_only = dist_loss(zs, zt, beta=1.0, gamma=0.0)
    assert torch.allclose(dist_loss(zs, zt, beta=1.0, gamma=1.0), inter_only + 1.0)


# ---------------------------------------------------------------- all three: degenerate shapes, dtype, autocast, errors


LOSSES = {
    "kd": lambda s, t, y: kd_loss(s, t, 2.0),
    "dkd": lambda s, t, y: dkd_loss(s, t, y, 1.0, 2.0, 2.0),
    "dist": lambda s, t, y: dist_loss(s, t, 1.0, 1.0, 2.0),
}
REFERENCES = {
    "kd": lambda s, t, y: reference_kd(s, t, 2.0),
    "dkd": lambda s, t, y: reference_dkd(s, t, y, 1.0, 2.0, 2.0),
    "dist": lambda s, t, y: reference_dist(s, t, 1.0, 1.0, 2.0),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("batch,classes", DEGENERATE_SHAPES)
def test_degenerate_shapes(name, batch, classes):
    zs, zt = random_logits(batch, classes, seed=batch * 17 + classes)
    y = random_labels(zt, seed=batch)
    expected = REFERENCES[name](zs, zt, y)
    got64 = LOSSES[name](torch.tensor(zs), torch.tensor(zt), torch.tensor(y))
    assert abs(got64.item() - expected) <= 1e-10 * abs(expected) + 1e-13
    got = LOSSES[name](torch.tensor(zs, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32), torch.tensor(y))
    assert torch.isfinite(got) and abs(got.item() - expected) <= 1e-5 * abs(expected) + 1e-6


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_inputs_are_computed_in_fp32(name):
    torch.manual_seed(1)
    zs = (torch.randn(32, 100) * 3).bfloat16().requires_grad_()
    zt = (torch.randn(32, 100) * 3).bfloat16()
    y = torch.randint(0, 100, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](zs, zt, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = REFERENCES[name](zs.detach().double().numpy(), zt.double().numpy(), y.numpy())
    assert rel_err(loss, expected) < 1e-5
    loss.backward()
    assert zs.grad.dtype == torch.bfloat16 and torch.isfinite(zs.grad.float()).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow_only_to_the_student(name):
    zs = torch.randn(8, 10, requires_grad=True)
    zt = torch.randn(8, 10, requires_grad=True)
    LOSSES[name](zs, zt.detach(), torch.randint(0, 10, (8,))).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None


def test_defaults_are_the_papers():
    """KD at T = 1; DKD with alpha 1, beta 2, T 1 (OFA/RSD's settings); DIST with beta = gamma = tau = 1."""
    zs, zt = random_logits(8, 10, seed=22)
    s, t = torch.tensor(zs), torch.tensor(zt)
    y = torch.tensor(random_labels(zt, seed=22))
    assert kd_loss(s, t) == kd_loss(s, t, temperature=1.0)
    assert dkd_loss(s, t, y) == dkd_loss(s, t, y, alpha=1.0, beta=2.0, temperature=1.0)
    assert dist_loss(s, t) == dist_loss(s, t, beta=1.0, gamma=1.0, tau=1.0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_shape_and_temperature_errors(name):
    """Each message names the loss that refused its inputs; a temperature of exactly 0 is refused."""
    y = torch.zeros(4, dtype=torch.long)
    loss = f"{name}_loss"
    with pytest.raises(
        ValueError,
        match=rf"^{loss}: student logits \(4, 10\) and teacher logits \(4, 12\) differ in "
        r"shape; teacher and student must have the same classes$",
    ):
        LOSSES[name](torch.randn(4, 10), torch.randn(4, 12), y)
    for student, teacher in (((4, 10, 1), (4, 10, 1)), ((4, 10), (4, 10, 1)), ((4, 10, 1), (4, 10))):
        # either side not 2-D is named as such, not reported as a class mismatch
        with pytest.raises(
            ValueError,
            match=rf"^{loss} expects 2-D logits \[B, K\], got "
            rf"{re.escape(str(student))} and {re.escape(str(teacher))}$",
        ):
            LOSSES[name](torch.randn(student), torch.randn(teacher), y)
    temperature = "tau" if name == "dist" else "temperature"
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^{loss}: {temperature} must be > 0, got {bad}$"):
            {
                "kd": lambda: kd_loss(torch.randn(4, 3), torch.randn(4, 3), bad),
                "dkd": lambda: dkd_loss(torch.randn(4, 3), torch.randn(4, 3), y, temperature=bad),
                "dist": lambda: dist_loss(torch.randn(4, 3), torch.randn(4, 3), tau=bad),
            }[name]()


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("wide", ["student", "teacher"])
def test_one_float64_input_makes_the_loss_float64(name, wide):
    """Either side in float64 computes the whole loss in float64: a float64 teacher is not rounded to a
    float32 student's precision, nor the reverse (the float32 side's values are exact in float64)."""
    zs, zt = random_logits(8, 10, seed=21)
    y = random_labels(zt, seed=21)
    s, t = torch.tensor(zs), torch.tensor(zt)
    s, t = (s, t.float()) if wide == "student" else (s.float(), t)
    got = LOSSES[name](s, t, torch.tensor(y))
    assert got.dtype == torch.float64
    assert rel_err(got, REFERENCES[name](zs, zt, y)) < 1e-10
