"""CC against a float64 loop implementation of the formula the official code computes (OFA
``distillers/correlation.py``): the mean over consecutive samples of sum_d |s_i - t_i|_d * |s_i+1 - t_i+1|_d."""

import pytest
import torch

from crossdistill.losses.cc import cc_loss


def reference_cc(student, teacher) -> float:
    s, t = student.tolist(), teacher.tolist()
    delta = [[abs(a - b) for a, b in zip(row_s, row_t)] for row_s, row_t in zip(s, t)]
    pairs = [sum(a * b for a, b in zip(delta[i], delta[i + 1])) for i in range(len(delta) - 1)]
    return sum(pairs) / len(pairs)


def embedded(n=6, width=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=gen, dtype=torch.float64), torch.randn(n, width, generator=gen).double()


@pytest.mark.parametrize("n", [2, 3, 7])
def test_matches_the_float64_loop_reference(n):
    student, teacher = embedded(n=n)
    loss = cc_loss(student, teacher)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert loss.item() == pytest.approx(reference_cc(student, teacher), rel=1e-12)


def test_zero_for_equal_features_positive_otherwise_and_batch_order_matters():
    student, teacher = embedded(seed=1)
    assert cc_loss(student, student.clone()).item() == 0.0
    assert cc_loss(student, teacher).item() > 0
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = cc_loss(student[order], teacher[order]).item()
    assert shuffled == pytest.approx(reference_cc(student[order], teacher[order]), rel=1e-12)
    assert shuffled != pytest.approx(cc_loss(student, teacher).item(), rel=1e-6)  # consecutive pairs only


def test_both_sides_get_gradients():
    student, teacher = embedded(seed=2)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    cc_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0
    assert torch.allclose(student.grad, -teacher.grad)  # the loss depends on s - t only


def test_fp32_under_bf16_autocast():
    student, teacher = embedded(seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = torch.nn.functional.linear(student.float(), torch.eye(5))
        assert half.dtype == torch.bfloat16
        loss = cc_loss(half, teacher.bfloat16())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_cc(half.double(), teacher.bfloat16().double()), rel=1e-5)


@pytest.mark.parametrize(
    "student, teacher, message",
    [((1, 4), (1, 4), "at least 2"), ((3, 4), (3, 5), "differ in shape"), ((3, 4), (2, 4), "batch 3")],
)
def test_bad_inputs_are_errors(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        cc_loss(torch.randn(student), torch.randn(teacher))


@pytest.mark.parametrize("float64_side", ["student", "teacher"])
def test_a_float64_input_on_either_side_gives_a_float64_loss(float64_side):
    student, teacher = embedded(seed=4)
    student = student if float64_side == "student" else student.float()
    teacher = teacher if float64_side == "teacher" else teacher.float()
    assert cc_loss(student, teacher).dtype == torch.float64


def test_its_errors_name_it():
    with pytest.raises(ValueError, match=r"^cc_loss relates samples of a batch: it needs at least 2, got 1$"):
        cc_loss(torch.randn(1, 4), torch.randn(1, 4))
