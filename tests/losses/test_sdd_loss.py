"""SDD losses against an independent float64 numpy implementation of the official computation.

The reference follows the official code's own layout (``mdistiller/models/*/utils.py`` SPP and
``mdistiller/distillers/KD.py`` ``sdd_kd_loss`` / ``SDD_DKD.py`` ``multi_dkd``): region features
[B, C, N], logits [B, K, N] flattened region-major to [N * B, K], the four masks
(global right/wrong x local right/wrong) built over the repeated targets, weights 1 / 1 / 2 / 2,
and ``sum(loss * index) / (N * B)``.
"""

import math

import numpy as np
import pytest
import torch

from crossdistill.losses.dkd import dkd_loss
from crossdistill.losses.kd import kd_loss
from crossdistill.losses.sdd import (
    check_scales,
    complementary_mask,
    num_regions,
    region_pool,
    sdd_dkd_loss,
    sdd_kd_loss,
    sdd_region_weights,
)

SCALES = [(1,), (1, 2), (1, 2, 4)]

# ---------------------------------------------------------------- numpy references (float64)


def np_adaptive_avg_pool(x: np.ndarray, out: int) -> np.ndarray:
    """[B, C, H, W] -> [B, C, out, out], PyTorch's adaptive windows [floor(i*H/out), ceil((i+1)*H/out))."""
    batch, channels, height, width = x.shape
    result = np.zeros((batch, channels, out, out))
    for i in range(out):
        h0, h1 = (i * height) // out, -((-(i + 1) * height) // out)
        for j in range(out):
            w0, w1 = (j * width) // out, -((-(j + 1) * width) // out)
            result[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return result


def np_spp(x: np.ndarray, scales, grid=4) -> np.ndarray:
    """Official SPP: pool to grid x grid first, every scale from that grid; [B, C, N] (1x1, 2x2, 4x4 order)."""
    source = x if grid is None else np_adaptive_avg_pool(x, grid)
    parts = [np_adaptive_avg_pool(source, s).reshape(x.shape[0], x.shape[1], s * s) for s in scales]
    return np.concatenate(parts, axis=2)


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.array([sum(pi * math.log(pi / qi) for pi, qi in zip(pr, qr) if pi > 0) for pr, qr in zip(p, q)])


def official_rows(patch_logits: np.ndarray) -> np.ndarray:
    """[B, K, N] -> [N * B, K] (``permute(2, 0, 1)`` then reshape): row n * B + b is region n of sample b."""
    batch, classes, regions = patch_logits.shape
    return patch_logits.transpose(2, 0, 1).reshape(regions * batch, classes)


def official_index(out_t: np.ndarray, target: np.ndarray, regions: int, complementary=2.0) -> np.ndarray:
    """The official four-mask weights over the N * B rows."""
    batch = target.shape[0]
    target_r = np.tile(target, regions)
    pred = out_t.argmax(axis=1)
    local_true = pred == target_r
    global_true = np.tile(pred[:batch] == target, regions)
    not_global_row = np.ones(regions * batch, dtype=bool)
    not_global_row[:batch] = False
    gt_lw = ~local_true & global_true & not_global_row
    gw_lt = local_true & ~global_true & not_global_row
    gw_lw = ~local_true & ~global_true
    gt_lt = local_true & global_true
    assert gt_lw.sum() + gw_lt.sum() + gw_lw.sum() + gt_lt.sum() == regions * batch
    index = np.zeros(regions * batch)
    index[gw_lw | gt_lt] = 1.0
    index[gw_lt | gt_lw] = complementary
    return index


def reference_sdd_kd(out_s, out_t, target, T, complementary=2.0):
    rows = out_s.shape[0]
    regions = rows // target.shape[0]
    per_row = T * T * np_kl_rows(np_softmax(out_t / T), np_softmax(out_s / T))
    return float((per_row * official_index(out_t, target, regions, complementary)).sum() / rows)


def reference_sdd_dkd(out_s, out_t, target, alpha, beta, T, complementary=2.0):
    rows, classes = out_s.shape
    regions = rows // target.shape[0]
    target_r = np.tile(target, regions)
    ps, pt = np_softmax(out_s / T), np_softmax(out_t / T)
    per_row = np.zeros(rows)
    for r in range(rows):
        g = target_r[r]
        bs = np.array([ps[r, g], 1.0 - ps[r, g]])
        bt = np.array([pt[r, g], 1.0 - pt[r, g]])
        tckd = np_kl_rows(bt[None], bs[None])[0]
        others = [k for k in range(classes) if k != g]
        ns = np_softmax(out_s[r, others] / T)
        nt = np_softmax(out_t[r, others] / T)
        nckd = np_kl_rows(nt[None], ns[None])[0]
        per_row[r] = (alpha * tckd + beta * nckd) * T * T
    return float((per_row * official_index(out_t, target, regions, complementary)).sum() / rows)


# ---------------------------------------------------------------- fixtures


def random_problem(scales, seed=0, batch=6, classes=3, size=7):
    """Random final maps (7x7: the adaptive 4x4 windows overlap) and linear heads for student and teacher."""
    rng = np.random.default_rng(seed)
    feat_s = rng.normal(size=(batch, 5, size, size))
    feat_t = rng.normal(size=(batch, 8, size, size))
    w_s, b_s = rng.normal(size=(classes, 5)), rng.normal(size=classes)
    w_t, b_t = 2.0 * rng.normal(size=(classes, 8)), rng.normal(size=classes)
    # region logits the official way: SPP [B, C, N] -> fc on every region -> [B, K, N]
    patch_s = np.einsum("bcn,kc->bkn", np_spp(feat_s, scales), w_s) + b_s[None, :, None]
    patch_t = np.einsum("bcn,kc->bkn", np_spp(feat_t, scales), w_t) + b_t[None, :, None]
    # half the samples labelled with the teacher's global prediction, so both global outcomes occur
    target = rng.integers(0, classes, size=batch)
    global_pred = patch_t[:, :, 0].argmax(axis=1)
    target[: batch // 2] = global_pred[: batch // 2]
    target[batch // 2 :] = (global_pred[batch // 2 :] + 1) % classes
    torch_in = dict(
        feat_s=torch.from_numpy(feat_s),
        feat_t=torch.from_numpy(feat_t),
        w_s=torch.from_numpy(w_s),
        b_s=torch.from_numpy(b_s),
        w_t=torch.from_numpy(w_t),
        b_t=torch.from_numpy(b_t),
        target=torch.from_numpy(target),
    )
    return patch_s, patch_t, target, torch_in


def torch_region_logits(t, scales, grid=4):
    zs = region_pool(t["feat_s"], scales, grid) @ t["w_s"].T + t["b_s"]
    zt = region_pool(t["feat_t"], scales, grid) @ t["w_t"].T + t["b_t"]
    return zs, zt


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("grid", [4, None])
@pytest.mark.parametrize("scales", SCALES)
def test_region_pool_matches_numpy_spp(scales, grid):
    x = np.random.default_rng(3).normal(size=(2, 3, 7, 9))
    ours = region_pool(torch.from_numpy(x), scales, grid)
    assert ours.shape == (2, num_regions(scales), 3)
    np.testing.assert_allclose(ours.numpy(), np_spp(x, scales, grid).transpose(0, 2, 1), rtol=1e-12, atol=1e-12)


def test_region_layout_and_grid_semantics():
    x = torch.arange(2 * 4 * 4, dtype=torch.float64).view(1, 2, 4, 4)
    regions = region_pool(x, (1, 2, 4))
    assert num_regions((1, 2, 4)) == 21 and regions.shape == (1, 21, 2)
    torch.testing.assert_close(regions[0, 0], x.mean(dim=(2, 3))[0])  # region 0: global average
    torch.testing.assert_close(regions[0, 1], x[0, :, :2, :2].mean(dim=(1, 2)))  # 2x2 grid, row-major
    torch.testing.assert_close(regions[0, 2], x[0, :, :2, 2:].mean(dim=(1, 2)))
    torch.testing.assert_close(regions[0, 5:], x[0].flatten(1).T)  # 4x4 grid = the map itself
    # on a 7x7 map the official 4x4 detour differs from pooling the map directly
    y = torch.randn(1, 3, 7, 7, dtype=torch.float64)
    assert not torch.allclose(region_pool(y, (1,), 4), region_pool(y, (1,), None))
    torch.testing.assert_close(region_pool(y, (1,), None)[:, 0], y.mean(dim=(2, 3)))


@pytest.mark.parametrize("bad", [(), (2, 4), (1, 4, 2), (1, 1), (1, 8), (0, 1)])
def test_bad_scales_are_rejected(bad):
    with pytest.raises(ValueError):
        check_scales(bad, 4)
    assert check_scales((1, 8), None) == (1, 8)


# ---------------------------------------------------------------- losses vs the official formula


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_sdd_kd_matches_official_formula(scales, T):
    patch_s, patch_t, target, t = random_problem(scales, seed=len(scales))
    zs, zt = torch_region_logits(t, scales)
    ours = sdd_kd_loss(zs, zt, t["target"], temperature=T)
    assert ours.dtype == torch.float64
    ref = reference_sdd_kd(official_rows(patch_s), official_rows(patch_t), target, T)
    assert ours.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.5, 2.0, 2.0)])
def test_sdd_dkd_matches_official_formula(scales, alpha, beta, T):
    patch_s, patch_t, target, t = random_problem(scales, seed=10 + len(scales))
    zs, zt = torch_region_logits(t, scales)
    ours = sdd_dkd_loss(zs, zt, t["target"], alpha=alpha, beta=beta, temperature=T)
    ref = reference_sdd_dkd(official_rows(patch_s), official_rows(patch_t), target, alpha, beta, T)
    assert ours.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("scales", [(1, 2), (1, 2, 4)])
def test_split_has_both_kinds_and_the_weight_matters(scales):
    patch_s, patch_t, target, t = random_problem(scales, seed=5, batch=8)
    zs, zt = torch_region_logits(t, scales)
    mask = complementary_mask(zt, t["target"])
    index = official_index(official_rows(patch_t), target, num_regions(scales))
    # our [B, N] mask is the official [N * B] index, transposed back
    np.testing.assert_array_equal(mask.numpy().T.reshape(-1), index == 2.0)
    assert mask.any() and (~mask[:, 1:]).any() and not mask[:, 0].any()
    weights = sdd_region_weights(zt, t["target"], 3.0)
    assert set(weights.unique().tolist()) == {1.0, 3.0}
    for w in (0.0, 1.0, 3.0):
        ref = reference_sdd_kd(official_rows(patch_s), official_rows(patch_t), target, 4.0, complementary=w)
        ours = sdd_kd_loss(zs, zt, t["target"], 4.0, complementary_weight=w)
        assert ours.item() == pytest.approx(ref, rel=1e-10)
    assert sdd_kd_loss(zs, zt, t["target"], 4.0, 3.0) > sdd_kd_loss(zs, zt, t["target"], 4.0, 1.0)


def test_complementary_cases_by_hand():
    # 1 sample, 3 regions, 2 classes, label 0
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]])  # global right, local wrong, local right
    mask = complementary_mask(teacher, torch.tensor([0]))
    assert mask.tolist() == [[False, True, False]]
    mask = complementary_mask(teacher, torch.tensor([1]))  # global wrong: local right is complementary
    assert mask.tolist() == [[False, True, False]]
    # global wrong (class 1), local wrong with another class (2)
    teacher3 = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]])
    assert complementary_mask(teacher3, torch.tensor([0])).tolist() == [[False, False]]  # both wrong: consistent


def test_single_global_region_is_plain_kd_and_dkd():
    gen = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 1, 7, generator=gen), torch.randn(5, 1, 7, generator=gen)
    y = torch.randint(0, 7, (5,), generator=gen)
    torch.testing.assert_close(sdd_kd_loss(zs, zt, y, 2.0), kd_loss(zs[:, 0], zt[:, 0], 2.0))
    torch.testing.assert_close(sdd_dkd_loss(zs, zt, y, 1.0, 8.0, 4.0), dkd_loss(zs[:, 0], zt[:, 0], y, 1.0, 8.0, 4.0))


def test_soft_targets_use_argmax_and_loss_is_fp32_under_autocast():
    patch_s, patch_t, target, t = random_problem((1, 2), seed=2)
    zs, zt = torch_region_logits(t, (1, 2))
    soft = torch.nn.functional.one_hot(t["target"], 3).double() * 0.8 + 0.2 / 3
    torch.testing.assert_close(sdd_dkd_loss(zs, zt, soft), sdd_dkd_loss(zs, zt, t["target"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdd_kd_loss(zs.bfloat16(), zt.bfloat16(), t["target"])
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(sdd_kd_loss(zs, zt, t["target"]).item(), rel=0.05)


def test_gradient_reaches_student_only_and_shapes_are_checked():
    patch_s, patch_t, target, t = random_problem((1, 2, 4), seed=4)
    zs, zt = torch_region_logits(t, (1, 2, 4))
    zs = zs.clone().requires_grad_(True)
    sdd_dkd_loss(zs, zt, t["target"]).backward()
    assert zs.grad is not None and torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        sdd_kd_loss(zs[:, :3], zt, t["target"])
    with pytest.raises(ValueError):
        sdd_kd_loss(zs[0], zt[0], t["target"])
    with pytest.raises(ValueError):
        sdd_dkd_loss(zs, zt, t["target"][:2])


SDD_LOSSES = {"sdd_kd_loss": sdd_kd_loss, "sdd_dkd_loss": sdd_dkd_loss}


def test_defaults_are_the_official_ones():
    """T = 4 and complementary weight 2 for both (``KD.py``, ``SDD_DKD.py``), alpha 1 and beta 8 for SD-DKD."""
    _, _, _, t = random_problem((1, 2), seed=6)
    zs, zt = torch_region_logits(t, (1, 2))
    y = t["target"]
    assert sdd_kd_loss(zs, zt, y) == sdd_kd_loss(zs, zt, y, temperature=4.0, complementary_weight=2.0)
    assert sdd_dkd_loss(zs, zt, y) == sdd_dkd_loss(
        zs, zt, y, alpha=1.0, beta=8.0, temperature=4.0, complementary_weight=2.0
    )


@pytest.mark.parametrize("name", sorted(SDD_LOSSES))
def test_errors_name_the_loss(name):
    """Each message names the loss that refused its inputs; a temperature of exactly 0 is refused."""
    zs, zt, y = torch.randn(6, 5, 3), torch.randn(6, 5, 3), torch.zeros(6, dtype=torch.long)
    loss = SDD_LOSSES[name]
    with pytest.raises(
        ValueError,
        match=rf"^{name} expects student and teacher region logits of one shape "
        r"\[B, N, K\], got \(6, 5, 3\) and \(6, 4, 3\)$",
    ):
        loss(zs, zt[:, :4], y)
    with pytest.raises(ValueError, match=rf"^{name}: 6 samples of region logits but 2 targets$"):
        loss(zs, zt, y[:2])
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^{name}: temperature must be > 0, got {bad}$"):
            loss(zs, zt, y, temperature=bad)


def float64_region_problem(seed):
    """Region logits in float64 whose values are all float32 numbers (so a float32 copy is exact)."""
    _, _, _, t = random_problem((1, 2, 4), seed=seed)
    zs, zt = torch_region_logits(t, (1, 2, 4))
    return zs.float().double(), zt.float().double(), t["target"]


@pytest.mark.parametrize("name", sorted(SDD_LOSSES))
@pytest.mark.parametrize("wide", ["student", "teacher"])
def test_one_float64_input_makes_the_loss_float64(name, wide):
    """Either side in float64 computes the loss in float64: nothing is rounded to the float32 side's precision."""
    zs, zt, y = float64_region_problem(seed=7)
    want = SDD_LOSSES[name](zs, zt, y)
    zs, zt = (zs, zt.float()) if wide == "student" else (zs.float(), zt)
    got = SDD_LOSSES[name](zs, zt, y)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(SDD_LOSSES))
def test_a_float32_teacher_does_not_round_the_complementary_weight_of_a_float64_loss(name):
    """Found by mutation testing: the weights took the teacher's dtype and were rounded before the float64 loss."""
    zs, zt, y = float64_region_problem(seed=7)
    want = SDD_LOSSES[name](zs, zt, y, complementary_weight=0.3)  # 0.3 is not a float32 number
    got = SDD_LOSSES[name](zs, zt.float(), y, complementary_weight=0.3)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(SDD_LOSSES))
def test_bfloat16_region_logits_are_computed_in_float32(name):
    """Half-precision inputs, with or without autocast, are widened before the softmaxes: the loss is the
    float32 loss of the same values, not a bfloat16 computation (relative errors ~1e-2)."""
    _, _, _, t = random_problem((1, 2), seed=8, classes=10)
    zs, zt = torch_region_logits(t, (1, 2))
    zs16, zt16 = zs.bfloat16(), zt.bfloat16()
    got = SDD_LOSSES[name](zs16, zt16, t["target"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, SDD_LOSSES[name](zs16.float(), zt16.float(), t["target"]))


def test_sdd_dkd_needs_two_classes_and_takes_two():
    y = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^sdd_dkd_loss needs at least 2 classes, got 1$"):
        sdd_dkd_loss(torch.randn(3, 5, 1), torch.randn(3, 5, 1), y)
    # two classes: the non-target distribution has one class, so NCKD is 0 and the loss is the TCKD
    zs, zt = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    assert sdd_dkd_loss(zs, zt, y, alpha=1.0, beta=8.0).item() == pytest.approx(
        sdd_dkd_loss(zs, zt, y, alpha=1.0, beta=0.0).item(), rel=1e-12
    )
    assert sdd_dkd_loss(zs, zt, y).item() > 0


@pytest.mark.parametrize(
    "scales,pool_grid,message",
    [
        ((), 4, r"SDD needs at least one scale, e\.g\. \(1, 2, 4\)"),
        ((1, 2.0), 4, r"SDD scales must be positive integers, got \(1, 2\.0\)"),
        ((True, 2), 4, r"SDD scales must be positive integers, got \(True, 2\)"),  # True == 1, but not a scale
        ((1, 0), 4, r"SDD scales must be positive integers, got \(1, 0\)"),
        ((2, 4), 4, r"SDD scales must start with 1 \(region 0 is the global region\), got \(2, 4\)"),
        ((1, 4, 2), 4, r"SDD scales must be strictly increasing, got \(1, 4, 2\)"),
        ((1, 2, 8), 4, r"SDD pool_grid must be >= the largest scale \(8\), got 4"),
        ((1,), 0, r"SDD pool_grid must be >= the largest scale \(1\), got 0"),
    ],
)
def test_scale_errors_say_what_is_wrong(scales, pool_grid, message):
    with pytest.raises(ValueError, match=rf"^{message}$"):
        check_scales(scales, pool_grid)
    if scales:  # region_pool checks its scales against its grid the same way
        with pytest.raises(ValueError, match=rf"^{message}$"):
            region_pool(torch.zeros(1, 2, 8, 8), scales, pool_grid)


def test_a_one_cell_grid_takes_the_global_scale():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert check_scales((1,), 1) == (1,)
    torch.testing.assert_close(region_pool(x, (1,), 1)[:, 0], x.mean(dim=(2, 3)))


def test_region_pool_needs_a_4d_map():
    with pytest.raises(ValueError, match=r"^region_pool expects a \[B, C, H, W\] map, got shape \(2, 3, 5\)$"):
        region_pool(torch.zeros(2, 3, 5))


def test_region_weights_have_the_loss_dtype_and_the_teacher_device():
    _, _, _, t = random_problem((1, 2), seed=5, batch=8)
    _, zt = torch_region_logits(t, (1, 2))
    weights = sdd_region_weights(zt, t["target"], 0.3)
    assert weights.dtype == torch.float64 and set(weights.unique().tolist()) == {0.3, 1.0}  # 0.3 not rounded
    assert sdd_region_weights(zt.bfloat16(), t["target"]).dtype == torch.float32
    on_meta = sdd_region_weights(zt.to("meta"), t["target"].to("meta"))  # "meta" stands in for a GPU
    assert on_meta.device.type == "meta"
