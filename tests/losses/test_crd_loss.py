"""The CRD loss against a float64 loop over the published formula (Tian et al. 2020, eq. 17-18 with the NCE
of their code): P = exp(<v, m>/T) / Z, h = P / (P + K/N), loss = -(sum log h(pos) + sum log(1 - h(neg))) / B."""

import math

import pytest
import torch

from crossdistill.losses import bank_contrast_exp, contrast_exp, crd_nce_loss
from crossdistill.losses.crd import CRD_EPS, FULL_BANK_RATIO


def reference(anchor, rows, temperature, z, num_data):
    batch, width = rows.shape[0], rows.shape[1]
    k = width - 1
    noise = k / num_data
    total = 0.0
    for i in range(batch):
        for j in range(width):
            dot = sum(float(anchor[i, d]) * float(rows[i, j, d]) for d in range(anchor.shape[1]))
            p = math.exp(dot / temperature) / z
            if j == 0:
                total += math.log(p / (p + noise + CRD_EPS))
            else:
                total += math.log(noise / (p + noise + CRD_EPS))
    return -total / batch


def unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("batch, k, width", [(3, 4, 5), (2, 1, 3)])
def test_matches_the_loop_reference_in_float64(batch, k, width):
    anchor, rows = unit(batch, width, seed=0), unit(batch, k + 1, width, seed=1)
    exps = contrast_exp(anchor, rows, 0.07)
    assert exps.dtype == torch.float64 and exps.shape == (batch, k + 1)
    z, num_data = float(exps.mean()) * 50, 50
    loss = crd_nce_loss(exps / z, num_data)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference(anchor, rows, 0.07, z, num_data), rel=1e-12)


def test_a_closer_positive_lowers_the_loss_and_half_inputs_give_float32():
    anchor, rows = unit(4, 8, seed=2), unit(4, 17, 8, seed=3)
    exps = contrast_exp(anchor, rows, 0.1)
    z = exps.mean() * 1000
    aligned = rows.clone()
    aligned[:, 0] = anchor
    assert crd_nce_loss(contrast_exp(anchor, aligned, 0.1) / z, 1000) < crd_nce_loss(exps / z, 1000)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = contrast_exp(anchor.bfloat16(), rows.bfloat16(), 0.1)
        assert half.dtype == torch.float32 and crd_nce_loss(half.bfloat16() / z.float(), 1000).dtype == torch.float32


def test_shapes_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="contrast_exp"):
        contrast_exp(torch.zeros(2, 3), torch.zeros(2, 4, 5), 0.07)
    with pytest.raises(ValueError, match="K >= 1"):
        crd_nce_loss(torch.ones(2, 1), 10)


@pytest.mark.parametrize("whole_bank", [True, False])
def test_scores_against_the_bank_match_the_loop_reference_either_way(whole_bank):
    # rows drawn with replacement (a row twice in one sample, as CRD's negatives may be), the positive first
    anchor, bank = unit(3, 6, seed=4), unit(9, 6, seed=5)
    sample = torch.tensor([[0, 4, 4, 8], [1, 0, 2, 2], [7, 3, 5, 6]])
    exps = bank_contrast_exp(anchor, bank, sample, 0.07, whole_bank=whole_bank)
    assert exps.dtype == torch.float64 and exps.shape == (3, 4)
    z = float(exps.mean()) * 9
    expected = reference(anchor, bank[sample], 0.07, z, 9)
    assert crd_nce_loss(exps / z, 9).item() == pytest.approx(expected, rel=1e-12)


def test_the_whole_bank_is_scored_only_when_it_is_small_beside_the_sample(monkeypatch):
    """One [B, N] product when N <= 16 (1 + K) (CIFAR's 50,000 rows at K = 16,384), the gathered rows beyond
    (ImageNet's 1.28 M, where [B, N] scores would take gigabytes); gradients flow to the anchors either way."""
    import crossdistill.losses.crd as module

    calls = []
    monkeypatch.setattr(module, "contrast_exp", lambda *args: calls.append("gathered") or contrast_exp(*args))
    bank, anchor = unit(FULL_BANK_RATIO * 4, 5, seed=6), unit(2, 5, seed=7).requires_grad_()
    sample = torch.randint(0, bank.shape[0], (2, 4), generator=torch.Generator().manual_seed(8))
    whole = bank_contrast_exp(anchor, bank, sample, 0.1)
    assert calls == []
    gathered = bank_contrast_exp(anchor, torch.cat([bank, bank[:1]]), sample, 0.1)
    assert calls == ["gathered"]
    torch.testing.assert_close(whole, gathered, rtol=1e-12, atol=0)
    whole.sum().backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0


def test_bank_scores_of_half_inputs_are_float32_and_bad_shapes_are_refused():
    anchor, bank = unit(2, 4, seed=9), unit(6, 4, seed=10)
    sample = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bank_contrast_exp(anchor.bfloat16(), bank.bfloat16(), sample, 0.1).dtype == torch.float32
    with pytest.raises(ValueError, match="bank_contrast_exp"):
        bank_contrast_exp(anchor, torch.zeros(6, 5), sample, 0.1)


def test_the_bank_may_change_in_place_before_the_backward_pass():
    # CRD updates its memory bank inside the forward pass, after scoring against it
    anchor, bank = unit(2, 4, seed=11).requires_grad_(), unit(6, 4, seed=12)
    sample = torch.tensor([[0, 1, 2], [3, 4, 5]])
    bank_contrast_exp(anchor, bank, sample, 0.1, whole_bank=True).sum().backward()
    expected = anchor.grad.clone()
    anchor.grad = None
    exps = bank_contrast_exp(anchor, bank, sample, 0.1, whole_bank=True)
    bank.mul_(0.5)
    exps.sum().backward()
    torch.testing.assert_close(anchor.grad, expected, rtol=0, atol=0)


@pytest.mark.parametrize("float64_side", ["anchor", "memory"])
def test_a_float64_input_on_either_side_gives_float64_scores(float64_side):
    anchor, bank = unit(2, 4, seed=13), unit(6, 4, seed=14)
    anchor = anchor if float64_side == "anchor" else anchor.float()
    bank = bank if float64_side == "memory" else bank.float()
    anchor.requires_grad_(True)  # the whole-bank product keeps a copy of the bank: in the scores' dtype too
    sample = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for whole_bank in (True, False):
        assert bank_contrast_exp(anchor, bank, sample, 0.1, whole_bank=whole_bank).dtype == torch.float64
    assert contrast_exp(anchor, bank[sample], 0.1).dtype == torch.float64


@pytest.mark.parametrize(
    "anchor, rows",
    [((2, 4, 1), (2, 5, 4)), ((2, 4), (3, 5, 4)), ((2, 4), (2, 5)), ((2, 4), (2, 5, 3))],
)
def test_each_shape_mismatch_of_the_scores_is_refused_with_the_expected_shapes(anchor, rows):
    message = f"contrast_exp: anchors {anchor} and memory rows {rows} do not match ([B, D] and [B, 1 + K, D])"
    with pytest.raises(ValueError) as raised:
        contrast_exp(torch.zeros(anchor), torch.zeros(rows), 0.07)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "anchor, bank, sample",
    [((4,), (6, 4), (2, 3)), ((2, 4), (6,), (2, 3)), ((2, 4), (6, 4), (6,)), ((2, 4), (6, 5), (2, 3))],
)
def test_each_shape_mismatch_of_the_bank_scores_is_refused(anchor, bank, sample):
    with pytest.raises(ValueError, match="^bank_contrast_exp: anchors"):
        bank_contrast_exp(torch.zeros(anchor), torch.zeros(bank), torch.zeros(sample, dtype=torch.long), 0.07)
