"""AT against a float64 loop implementation of the paper's attention map (Zagoruyko & Komodakis, ICLR 2017:
Q = sum_c |A_c|^p, here averaged over channels as the official code does, normalised per sample) and the
official code's loss (mean of squared differences); and the resize to the teacher's grid, by hand."""

import math

import pytest
import torch

from crossdistill.losses.at import at_loss, attention_map, resize_attention


def reference_attention(feat, p) -> list[list[float]]:
    """[B, C, H, W] -> per sample, the L2-normalised raster list of mean_c |f|^p."""
    b, c, h, w = feat.shape
    f = feat.tolist()
    maps = []
    for n in range(b):
        q = [sum(abs(f[n][k][i][j]) ** p for k in range(c)) / c for i in range(h) for j in range(w)]
        norm = math.sqrt(sum(v * v for v in q))
        maps.append([v / norm for v in q])
    return maps


def reference_at(a_s, a_t) -> float:
    diffs = [(x - y) ** 2 for row_s, row_t in zip(a_s, a_t) for x, y in zip(row_s, row_t)]
    return sum(diffs) / len(diffs)


def features(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_same_grid_matches_the_float64_loop_reference(p):
    student, teacher = features((3, 5, 4, 6), 0), features((3, 7, 4, 6), 1)  # channels may differ
    loss = at_loss(student, teacher, p)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    expected = reference_at(reference_attention(student, p), reference_attention(teacher, p))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_odd_p_uses_the_absolute_value():
    student, teacher = features((2, 4, 3, 3), 2), features((2, 4, 3, 3), 3)
    assert at_loss(student, teacher, 3.0).item() == pytest.approx(at_loss(student.abs(), -teacher.abs(), 3.0).item())


def area_reference(a: list[list[float]], size) -> list[list[float]]:
    """Mean of each k x k block (integer ratios)."""
    kh, kw = len(a) // size[0], len(a[0]) // size[1]
    return [
        [sum(a[i * kh + di][j * kw + dj] for di in range(kh) for dj in range(kw)) / (kh * kw) for j in range(size[1])]
        for i in range(size[0])
    ]


def bilinear_reference(a: list[list[float]], size) -> list[list[float]]:
    """Half-pixel-centred linear interpolation along each axis (align_corners=False), edges clamped."""

    def taps(out_index, n_in, n_out):
        x = max((out_index + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(x)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        return lo, hi, x - lo

    out = []
    for i in range(size[0]):
        r0, r1, fr = taps(i, len(a), size[0])
        row = []
        for j in range(size[1]):
            c0, c1, fc = taps(j, len(a[0]), size[1])
            top = a[r0][c0] * (1 - fc) + a[r0][c1] * fc
            bottom = a[r1][c0] * (1 - fc) + a[r1][c1] * fc
            row.append(top * (1 - fr) + bottom * fr)
        out.append(row)
    return out


def normalised(rows: list[list[float]]) -> list[float]:
    flat = [v for row in rows for v in row]
    norm = math.sqrt(sum(v * v for v in flat))
    return [v / norm for v in flat]


@pytest.mark.parametrize(
    "student_grid, teacher_grid, resize",
    [((8, 8), (4, 4), area_reference), ((6, 4), (3, 2), area_reference), ((2, 3), (4, 6), bilinear_reference)],
    ids=["area 8->4", "area 6x4->3x2", "bilinear 2x3->4x6"],
)
def test_the_student_attention_is_resized_to_the_teacher_grid_before_normalising(student_grid, teacher_grid, resize):
    student, teacher = features((2, 3, *student_grid), 4), features((2, 5, *teacher_grid), 5)
    raw = [
        [[sum(student[n, k, i, j].item() ** 2 for k in range(3)) / 3 for j in range(student_grid[1])]
         for i in range(student_grid[0])]
        for n in range(2)
    ]  # fmt: skip
    a_s = [normalised(resize(raw[n], teacher_grid)) for n in range(2)]
    expected = reference_at(a_s, reference_attention(teacher, 2))
    assert at_loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)


def test_resize_modes():
    a = torch.arange(16.0).reshape(1, 4, 4)
    assert resize_attention(a, (4, 4)) is a
    assert torch.equal(resize_attention(a, (2, 2)), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))  # area
    grown = resize_attention(torch.tensor([[[0.0, 4.0]]]), (1, 4))
    assert torch.allclose(grown, torch.tensor([[[0.0, 1.0, 3.0, 4.0]]]))  # bilinear, half-pixel centres
    mixed = resize_attention(torch.ones(1, 4, 2), (2, 4))  # one side shrinks, the other grows: bilinear
    assert mixed.shape == (1, 2, 4) and torch.allclose(mixed, torch.ones(1, 2, 4))


def test_gradient_reaches_the_student_and_the_loss_is_zero_for_proportional_energy():
    student = features((2, 4, 4, 4), 6).requires_grad_(True)
    at_loss(student, features((2, 6, 2, 2), 7)).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    teacher = features((2, 6, 4, 4), 8)
    assert at_loss(3 * teacher[:, :4], teacher[:, :4]).item() == pytest.approx(0.0, abs=1e-15)
    assert attention_map(teacher, 2).shape == (2, 4, 4)


def test_fp32_under_bf16_autocast():
    student, teacher = features((2, 4, 4, 4), 9), features((2, 4, 4, 4), 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.nn.functional.conv2d(student.float(), torch.eye(4).view(4, 4, 1, 1))
        assert half.dtype == torch.bfloat16
        loss = at_loss(half, teacher.bfloat16())
    assert loss.dtype == torch.float32
    expected = reference_at(reference_attention(half.double(), 2), reference_attention(teacher.bfloat16().double(), 2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "student, teacher, p, message",
    [
        ((2, 4, 3), (2, 4, 3, 3), 2.0, "feature maps"),
        ((2, 4, 3, 3), (3, 4, 3, 3), 2.0, "batch 2 and teacher batch 3"),
        ((2, 4, 3, 3), (2, 4, 3, 3), 0.5, "p must be >= 1"),
    ],
)
def test_bad_inputs_are_errors(student, teacher, p, message):
    with pytest.raises(ValueError, match=message):
        at_loss(torch.randn(student), torch.randn(teacher), p)


@pytest.mark.parametrize(
    "batch, grid, size, mode",
    [
        (1, (6, 6), (2, 2), "area"),  # both sides shrink (a batch of 1, unlike the grid's sides)
        (2, (6, 6), (6, 2), "area"),  # one side kept, the other shrinks by 3 (area and bilinear differ there)
        (2, (6, 6), (2, 6), "area"),
        (2, (6, 12), (2, 9), "area"),  # each side against its own target, not the other's
        (2, (6, 1), (2, 2), "bilinear"),  # the last side grows
        (2, (1, 6), (2, 2), "bilinear"),  # the first side grows
    ],
)
def test_each_side_is_compared_with_its_own_target_size(batch, grid, size, mode):
    attention = features((batch, *grid), 11).abs()
    options = {"mode": "area"} if mode == "area" else {"mode": "bilinear", "align_corners": False}
    expected = torch.nn.functional.interpolate(attention.unsqueeze(1), size=size, **options).squeeze(1)
    assert torch.equal(resize_attention(attention, size), expected)


def test_the_attention_map_squares_by_default():
    feat = features((2, 3, 4, 4), 12)
    assert torch.equal(attention_map(feat), feat.abs().pow(2).mean(dim=1))


@pytest.mark.parametrize("float64_side", ["student", "teacher"])
def test_a_float64_input_on_either_side_gives_a_float64_loss(float64_side):
    student, teacher = features((2, 4, 4, 4), 13), features((2, 5, 2, 2), 14)
    student = student if float64_side == "student" else student.float()
    teacher = teacher if float64_side == "teacher" else teacher.float()
    loss = at_loss(student, teacher)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(at_loss(student.double(), teacher.double()).item(), rel=1e-12)
