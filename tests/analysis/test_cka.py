"""Linear CKA and minibatch CKA against an independent numpy implementation; analyze cka on a tiny run."""

import csv
import io

import numpy as np
import pytest
import torch

from conftest import tiny_run
from crossdistill.analysis import (
    MinibatchCKA,
    cka_matrix,
    linear_cka,
    minibatch_cka,
    model_layers,
    pool_features,
    unbiased_hsic,
)
from crossdistill.cli import main
from crossdistill.config import build_config
from crossdistill.engine import train
from crossdistill.errors import CrossDistillError

# ---------------------------------------------------------------- an independent reference (numpy, textbook form)


def numpy_cka(x, y):
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with HSIC(K, L) = tr(K H L H), K = X X^T (Kornblith et al.)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def numpy_unbiased_hsic(k, l_):
    """Song et al. 2012, eq. (5), written out with explicit loops over the formula's terms."""
    n = k.shape[0]
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    ones = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return (term1 + term2 - term3) / (n * (n - 3))


def correlated(n, d1, d2, noise=1.0, seed=0, latent=8):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, latent))
    x = z @ rng.standard_normal((latent, d1)) + noise * rng.standard_normal((n, d1))
    y = np.tanh(z @ rng.standard_normal((latent, d2))) + noise * rng.standard_normal((n, d2))
    return x, y


# ---------------------------------------------------------------- the math


@pytest.mark.parametrize("n,d1,d2", [(60, 12, 20), (30, 100, 7), (40, 64, 64)])  # D < N, D > N (Gram form), square
def test_linear_cka_matches_numpy_reference(n, d1, d2):
    x, y = correlated(n, d1, d2, seed=n + d1)
    expected = numpy_cka(x, y)
    assert 0.05 < expected < 0.999
    assert linear_cka(x, y) == pytest.approx(expected, abs=1e-10)
    assert linear_cka(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == pytest.approx(expected, abs=1e-5)


def test_computed_in_float64_even_for_float32_input():
    x, y = correlated(200, 16, 16, seed=3)
    x32 = torch.from_numpy(x + 1e4).float()  # a large offset: float32 centring/accumulation would lose digits
    expected = numpy_cka(x32.double().numpy(), y)
    assert linear_cka(x32, torch.from_numpy(y).float()) == pytest.approx(expected, abs=1e-6)


def test_cka_of_a_representation_with_itself_is_one():
    x, _ = correlated(50, 30, 2, seed=1)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x[:, :10] @ np.eye(10)) < 1.0


def test_invariant_to_orthogonal_maps_isotropic_scaling_and_shifts():
    rng = np.random.default_rng(5)
    x, y = correlated(80, 24, 16, seed=5)
    base = linear_cka(x, y)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    assert np.allclose(q.T @ q, np.eye(24))
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y - 2.0) == pytest.approx(base, abs=1e-10)


def test_not_invariant_to_an_arbitrary_invertible_linear_map():
    rng = np.random.default_rng(6)
    x, y = correlated(80, 24, 16, seed=6)
    q, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    a = q @ np.diag(np.logspace(-2, 2, 24))  # invertible, strongly anisotropic
    assert np.linalg.matrix_rank(a) == 24
    base, mapped = linear_cka(x, y), linear_cka(x @ a, y)
    assert mapped == pytest.approx(numpy_cka(x @ a, y), abs=1e-10)
    assert abs(mapped - base) > 0.05, (base, mapped)


def test_unbiased_hsic_matches_the_formula():
    x, y = correlated(25, 6, 9, seed=7)
    k, l_ = x @ x.T, y @ y.T
    expected = numpy_unbiased_hsic(k, l_)
    assert unbiased_hsic(torch.from_numpy(k), torch.from_numpy(l_)) == pytest.approx(expected, rel=1e-10)


def test_minibatch_cka_is_close_to_full_cka_on_large_n():
    x, y = correlated(4000, 32, 24, noise=1.5, seed=8)
    full = linear_cka(x, y)
    mini = minibatch_cka(x, y, batch_size=400)
    assert 0.1 < full < 0.95
    assert mini == pytest.approx(full, abs=0.015), (full, mini)
    # the accumulator over several layers gives the same number for the same pair
    acc = MinibatchCKA()
    for start in range(0, 4000, 400):
        acc.update([x[start : start + 400], y[start : start + 400]], [y[start : start + 400]])
    matrix = acc.compute()
    assert matrix.shape == (2, 1)
    assert matrix[0, 0] == pytest.approx(mini, abs=1e-12)
    assert matrix[1, 0] == pytest.approx(1.0, abs=1e-9)


def test_cka_matrix_is_pairwise_linear_cka():
    x1, y1 = correlated(64, 10, 12, seed=9)
    x2, y2 = correlated(64, 30, 5, seed=10)
    matrix = cka_matrix([x1, x2], [y1, y2, x1])
    expected = [[numpy_cka(a, b) for b in (y1, y2, x1)] for a in (x1, x2)]
    np.testing.assert_allclose(matrix, expected, atol=1e-10)


@pytest.mark.parametrize("fn", [linear_cka, minibatch_cka, lambda x, y: cka_matrix([x], [y])])
def test_sample_count_mismatch_is_a_clear_error(fn):
    x, y = correlated(40, 8, 8, seed=11)
    with pytest.raises(CrossDistillError, match="x has 40 samples and y has 39|40 samples and y has 39"):
        fn(x, y[:39])


def test_three_d_input_asks_for_pooling():
    with pytest.raises(CrossDistillError, match="pool or flatten"):
        linear_cka(np.zeros((4, 3, 2)), np.zeros((4, 3)))


def test_pooling_means_over_positions_without_prefix_tokens():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    assert torch.equal(pool_features(maps), maps.mean(dim=(2, 3)))
    assert pool_features(maps, pool="flatten").shape == (2, 12)
    tokens = torch.randn(2, 5, 4)  # 1 class token + 4 patch tokens
    assert torch.allclose(pool_features(tokens, prefix_tokens=1), tokens[:, 1:].mean(dim=1))


def test_layers_are_named_and_deduplicated():
    import timm

    vit = timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8)
    stages, names = model_layers(vit, stages=[1, 3, 3, 5])
    assert stages == [1, 3, 5] and names == ["blocks.1", "blocks.3", "blocks.5", "pre-logits"]
    resnet = timm.create_model("test_resnet", num_classes=10)
    assert model_layers(resnet)[1] == ["layer1", "layer2", "layer3", "layer4", "pre-logits"]


# ---------------------------------------------------------------- the command on a tiny run directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cka")
    small = {"train_subset": 64, "eval_subset": 40}
    train(build_config(tiny_run(tmp, train={"epochs": 1, "run_name": "rsd"}, data=small)), out=io.StringIO())
    train(
        build_config(tiny_run(tmp, method="vanilla", train={"epochs": 1, "run_name": "scratch"}, data=small)),
        out=io.StringIO(),
    )
    return tmp / "runs"


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_analyze_cka_on_a_run_directory_with_compare(runs, tmp_path, capsys):
    out = tmp_path / "cka"
    code = main(
        [
            "analyze",
            "cka",
            str(runs / "rsd"),
            "--compare-checkpoint",
            str(runs / "scratch" / "best.pt"),
            "--samples",
            "48",
            "--batch-size",
            "16",
            "--out",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    png, table = out / "cka.png", out / "cka.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    rows = _read_csv(table)
    # teacher test_vit (6 blocks): blocks.2-5, pre-logits; student test_resnet: layer1-4, pre-logits
    assert len(rows) == 5 * 5
    assert {r["teacher_layer"] for r in rows} == {"blocks.2", "blocks.3", "blocks.4", "blocks.5", "pre-logits"}
    assert set(rows[0]) == {"teacher_layer", "student_layer", "cka_rsd", "cka_vanilla", "diff_rsd_minus_vanilla"}
    for r in rows:
        a, b = float(r["cka_rsd"]), float(r["cka_vanilla"])
        assert 0.0 <= a <= 1.0 and 0.0 <= b <= 1.0
        assert float(r["diff_rsd_minus_vanilla"]) == pytest.approx(a - b, abs=2e-6)
    assert "48 eval images of digits" in captured.out and "randomly initialised" in captured.out
    assert f"wrote {table}" in captured.out


def test_analyze_cka_with_explicit_checkpoints_and_minibatch(runs, tmp_path, capsys):
    out = tmp_path / "mb"
    code = main(
        [
            "analyze",
            "cka",
            "--teacher",
            "test_vit",
            "--student-checkpoint",
            str(runs / "rsd" / "best.pt"),
            "--config",
            str(runs / "rsd" / "config.yaml"),
            "--samples",
            "40",
            "--batch-size",
            "20",
            "--estimator",
            "minibatch",
            "--out",
            str(out),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    import json

    result = json.loads(captured.out)
    assert result["estimator"] == "minibatch" and result["samples"] == 40
    assert np.array(result["cka"]["rsd"]).shape == (5, 5)
    assert (out / "cka.png").is_file() and (out / "cka.csv").is_file()


def test_analyze_cka_without_a_teacher_is_one_clear_line(runs, capsys):
    code = main(["analyze", "cka", str(runs / "scratch"), "--samples", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a teacher" in err and "Traceback" not in err
