import numpy as np
import pytest
import torch

from crossdistill.losses.fitnet import fitnet_loss


def numpy_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    a64 = a.detach().double().numpy()
    b64 = b.detach().double().numpy()
    return float(np.sum((a64 - b64) ** 2) / a64.size)


@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (3, 16, 12), (2, 1, 1, 1)])
def test_matches_float64_numpy_mse_over_all_elements(shape):
    torch.manual_seed(0)
    s, t = torch.randn(shape) * 3, torch.randn(shape)
    loss = fitnet_loss(s, t)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(numpy_mse(s, t), rel=1e-6)
    # the official F.mse_loss(reduction="mean") computes the same quantity
    assert torch.allclose(loss, torch.nn.functional.mse_loss(s, t))


def test_gradient_is_two_diff_over_count_and_teacher_untouched():
    torch.manual_seed(1)
    s = torch.randn(2, 6, 4, 4, requires_grad=True)
    t = torch.randn(2, 6, 4, 4)
    fitnet_loss(s, t).backward()
    expected = 2 * (s.detach().double().numpy() - t.double().numpy()) / s.numel()
    np.testing.assert_allclose(s.grad.double().numpy(), expected, rtol=1e-5, atol=1e-9)


def test_zero_for_identical_features_and_float64_stays_float64():
    x = torch.randn(3, 5, 7, dtype=torch.float64)
    assert fitnet_loss(x, x.clone()).item() == 0.0
    loss = fitnet_loss(x, torch.zeros_like(x))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(numpy_mse(x, torch.zeros_like(x)), rel=1e-12)


def test_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    s = torch.randn(4, 17, 32)
    t = torch.randn(4, 17, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_half = torch.nn.functional.linear(s, torch.eye(32))  # autocast makes this bf16
        assert s_half.dtype == torch.bfloat16
        loss = fitnet_loss(s_half, t.bfloat16())
    assert loss.dtype == torch.float32
    # the squares and the mean are taken in fp32 on the (bf16-rounded) inputs
    assert loss.item() == pytest.approx(numpy_mse(s_half.float(), t.bfloat16().float()), rel=1e-6)


@pytest.mark.parametrize("shapes", [((2, 16, 8), (2, 17, 8)), ((2, 1, 8), (2, 16, 8)), ((2, 8, 4, 4), (2, 8, 2, 2))])
def test_shape_mismatch_is_an_error_not_a_broadcast(shapes):
    a, b = shapes
    with pytest.raises(ValueError, match="differ in shape"):
        fitnet_loss(torch.randn(a), torch.randn(b))


def test_the_shape_error_names_both_shapes_and_the_fix():
    with pytest.raises(ValueError) as err:
        fitnet_loss(torch.randn(2, 3), torch.randn(2, 4))
    assert str(err.value) == (
        "fitnet_loss: aligned student feature (2, 3) and teacher feature (2, 4) differ in shape; "
        "align the student feature to the teacher's first (crossdistill.models.aligners)"
    )


def test_empty_features_are_an_error_and_a_single_element_is_not():
    with pytest.raises(ValueError, match=r"^fitnet_loss: empty features \(0, 4\)$"):
        fitnet_loss(torch.zeros(0, 4), torch.zeros(0, 4))
    assert fitnet_loss(torch.ones(1, 1), torch.zeros(1, 1)).item() == 1.0
