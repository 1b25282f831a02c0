"""The CRD loss against a float64 loop over the published formula (Tian et al. 2020, eq. 17-18 with the NCE
of their code): P = exp(<v, m>/T) / Z, h = P / (P + K/N), loss = -(sum log h(pos) + sum log(1 - h(neg))) / B."""

import math

import pytest
import torch

from crossdistill.losses import contrast_exp, crd_nce_loss
from crossdistill.losses.crd import CRD_EPS


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
