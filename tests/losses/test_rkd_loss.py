"""RKD against a float64 loop implementation of the paper's potentials (Park et al., CVPR 2019, eqs. 3-6),
averaged as the official code averages them (smooth-L1 with mean reduction over every matrix entry)."""

import itertools
import math

import pytest
import torch

from crossdistill.losses.rkd import rkd_loss


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reference_distances(e: list[list[float]], squared: bool) -> list[list[float]]:
    """psi_D(t_i, t_j) = |t_i - t_j| / mu, mu the mean distance over the pairs i != j; 0 on the diagonal."""
    n = len(e)
    dist = [[0.0] * n for _ in range(n)]
    for i, j in itertools.product(range(n), repeat=2):
        if i != j:
            sq = sum((a - b) ** 2 for a, b in zip(e[i], e[j]))
            dist[i][j] = sq if squared else math.sqrt(sq)
    mu = sum(map(sum, dist)) / (n * (n - 1))
    return [[d / mu for d in row] for row in dist]


def reference_angles(e: list[list[float]]) -> list[float]:
    """psi_A(t_i, t_j, t_k) = <e_ij, e_ik>, e_ij = (t_j - t_i) / |t_j - t_i| (0 for j == i), every (i, j, k)."""
    n = len(e)

    def unit(i, j):
        diff = [b - a for a, b in zip(e[i], e[j])]
        norm = math.sqrt(sum(v * v for v in diff))
        return [v / norm for v in diff] if norm > 0 else [0.0] * len(diff)

    return [sum(a * b for a, b in zip(unit(i, j), unit(i, k))) for i, j, k in itertools.product(range(n), repeat=3)]


def reference_rkd(student, teacher, w_d=25.0, w_a=50.0, squared=False) -> tuple[float, float, float]:
    s, t = student.tolist(), teacher.tolist()
    d_s, d_t = reference_distances(s, squared), reference_distances(t, squared)
    diffs_d = [a - b for row_s, row_t in zip(d_s, d_t) for a, b in zip(row_s, row_t)]
    diffs_a = [a - b for a, b in zip(reference_angles(s), reference_angles(t))]
    loss_d = sum(map(huber, diffs_d)) / len(diffs_d)
    loss_a = sum(map(huber, diffs_a)) / len(diffs_a)
    return w_d * loss_d + w_a * loss_a, max(map(abs, diffs_d)), min(map(abs, diffs_d))


def outlier_batch(n=5, width=6, seed=0):
    """A student with one far sample (normalised distances to it differ from the teacher's by more than 1, so
    both branches of the smooth-L1 are used) and a teacher of another width."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(n, width, generator=gen, dtype=torch.float64)
    student[0] += 40.0
    teacher = torch.randn(n, width // 2, generator=gen, dtype=torch.float64)
    return student, teacher


@pytest.mark.parametrize("squared", [False, True])
def test_matches_the_float64_loop_reference(squared):
    student, teacher = outlier_batch()
    expected, largest, smallest = reference_rkd(student, teacher, squared=squared)
    assert largest > 1 > smallest  # the quadratic and the linear part of the smooth-L1 both count
    loss = rkd_loss(student, teacher, 25.0, 50.0, squared=squared)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_weights_scale_the_distance_and_angle_terms_separately():
    student, teacher = outlier_batch(seed=1)
    distance = reference_rkd(student, teacher, 1.0, 0.0)[0]
    angle = reference_rkd(student, teacher, 0.0, 1.0)[0]
    assert rkd_loss(student, teacher, 1.0, 0.0).item() == pytest.approx(distance, rel=1e-9)
    assert rkd_loss(student, teacher, 0.0, 1.0).item() == pytest.approx(angle, rel=1e-9)
    assert rkd_loss(student, teacher, 3.0, 7.0).item() == pytest.approx(3 * distance + 7 * angle, rel=1e-9)
    assert distance > 0 and angle > 0


def test_relations_ignore_scale_shift_and_rotation_of_either_side():
    student, teacher = outlier_batch(seed=2)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    moved = 3.5 * student @ rotation + 2.0
    assert rkd_loss(moved, teacher).item() == pytest.approx(rkd_loss(student, teacher).item(), rel=1e-9)
    assert rkd_loss(student, 0.1 * teacher - 1).item() == pytest.approx(rkd_loss(student, teacher).item(), rel=1e-9)
    assert rkd_loss(teacher, teacher.clone()).item() == pytest.approx(0.0, abs=1e-12)


def test_a_repeated_sample_counts_in_the_mean_distance_as_the_code_counts_it():
    # two equal samples: their distance is sqrt(eps) (clamped), a positive entry of OFA's d[d > 0]
    student, teacher = outlier_batch(n=4, seed=3)
    student[2] = student[1]
    expected = reference_rkd(student, teacher)[0]
    assert rkd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_teacher_side_gets_no_gradient_and_the_student_does():
    student, teacher = outlier_batch(seed=4)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    rkd_loss(student, teacher).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_fp32_under_bf16_autocast_and_float32_inputs():
    student, teacher = outlier_batch(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.nn.functional.linear(student.float(), torch.eye(6))
        assert half.dtype == torch.bfloat16
        loss = rkd_loss(half, teacher.bfloat16())
    assert loss.dtype == torch.float32
    expected = reference_rkd(half.double(), teacher.bfloat16().double())[0]
    assert loss.item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(
    "student, teacher, message",
    [
        ((1, 4), (1, 4), "at least 2"),
        ((3, 4), (2, 4), "batch 3 and teacher batch 2"),
        ((3, 4, 1), (3, 4), "2-D embeddings"),
    ],
)
def test_bad_inputs_are_errors(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        rkd_loss(torch.randn(student), torch.randn(teacher))


def test_eps_must_be_positive():
    with pytest.raises(ValueError, match="eps must be > 0"):
        rkd_loss(torch.randn(3, 4), torch.randn(3, 4), eps=0.0)


def test_under_bf16_autocast_it_computes_as_float32_does_outside():
    """Its products (the Gram matrix, the angle cosines) are on autocast's bfloat16 list: computed in float32."""
    student, teacher = outlier_batch(seed=6)
    student, teacher = student.float(), teacher.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = rkd_loss(student, teacher)
    assert inside.dtype == torch.float32
    # float32 rounding only (bfloat16 products would be off by about 1e-3)
    assert inside.item() == pytest.approx(reference_rkd(student.double(), teacher.double())[0], rel=1e-5)


@pytest.mark.parametrize("float64_side", ["student", "teacher"])
def test_a_float64_input_on_either_side_computes_both_sides_in_float64(float64_side):
    student, teacher = outlier_batch(seed=7)
    student = student if float64_side == "student" else student.float()
    teacher = teacher if float64_side == "teacher" else teacher.float()
    loss = rkd_loss(student, teacher)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(rkd_loss(student.double(), teacher.double()).item(), rel=1e-12)


def test_eps_reaches_the_distances_of_both_sides():
    from crossdistill.losses.rkd import rkd_distances

    student, teacher = outlier_batch(seed=8)
    student[1], teacher[2] = student[0], teacher[0]  # a pair at distance 0 on each side: the floor eps applies
    eps = 0.5
    expected = torch.nn.functional.smooth_l1_loss(rkd_distances(student, eps=eps), rkd_distances(teacher, eps=eps))
    loss = rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0, eps=eps)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert loss.item() != pytest.approx(rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0).item())


def test_distances_are_not_squared_by_default_and_stay_on_the_embeddings_device():
    from crossdistill.losses.rkd import rkd_distances

    student, _ = outlier_batch(seed=9)
    assert torch.equal(rkd_distances(student), rkd_distances(student, squared=False))
    assert not torch.allclose(rkd_distances(student), rkd_distances(student, squared=True))
    assert rkd_distances(torch.empty(4, 3, device="meta")).device.type == "meta"


def test_its_errors_name_it_and_the_batch_it_got():
    with pytest.raises(ValueError, match=r"^rkd_loss relates samples of a batch: it needs at least 2, got 1$"):
        rkd_loss(torch.randn(1, 4), torch.randn(1, 4))
