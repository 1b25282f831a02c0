"""``crossdistill bench``: runs for a couple of steps on tiny models and reports every variant and ratio.

No timing is asserted (the machine is shared): only that everything is measured and reported.
"""

import json

import pytest
import torch

from crossdistill import rsd_loss
from crossdistill.bench import ReferenceStep, create_model_for_size, reference_rsd_loss, run_bench
from crossdistill.cli import main

TINY = [
    "--teacher",
    "test_vit",
    "--student",
    "test_resnet",
    "--img-size",
    "32",
    "--batch-size",
    "4",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--num-classes",
    "10",
]


def test_bench_cli_json_reports_all_variants_and_ratios(capsys):
    assert main(["bench", *TINY, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    variants = result["variants"]
    assert set(variants) == {
        "ours",
        "reference",
        "student_only",
        "teacher_forward",
        "ours_precomputed_teacher",
        "ours_cached",
    }
    for name, v in variants.items():
        assert v["steps"] == 2, name
        assert v["img_per_s"] > 0 and v["step_ms_median"] > 0, name
        assert v["peak_mem_mb"] is None  # CPU: no per-variant memory
    ratios = result["ratios"]
    for key in (
        "ours_over_reference",
        "ours_over_student_only",
        "cached_over_student_only",
        "method_overhead",
        "teacher_share_of_ours",
    ):
        assert ratios[key] is not None and ratios[key] == ratios[key], key  # present and not NaN
    assert result["ratios_of_medians"].keys() == ratios.keys()
    config = result["config"]
    assert (config["teacher"], config["student"], config["img_size"], config["batch_size"]) == (
        "test_vit",
        "test_resnet",
        32,
        4,
    )
    assert config["device"] == "cpu" and config["amp"] == "none"


def test_bench_text_output_and_a_logit_method(capsys):
    assert main(["bench", *TINY, "--method", "kd", "--set", "temperature=4", "--no-cache"]) == 0
    out = capsys.readouterr().out
    for label in (
        "ours (engine step)",
        "reference (official, fp32 eager)",
        "student alone (CE)",
        "teacher forward alone",
        "ours_over_reference",
        "ours_over_student_only",
        "method_overhead",
    ):
        assert label in out, label
    assert "teacher cache" not in out  # --no-cache


def test_bench_method_that_reads_teacher_stages_is_measured_without_its_teacher_but_never_cached():
    # the engine runs FitNet's teacher too (stage features), so its own cost is measurable; stages are never cached
    result = run_bench(
        "test_vit",
        "test_resnet",
        img_size=32,
        batch_size=4,
        method="fitnet",
        num_classes=10,
        steps=1,
        warmup=0,
        method_args={"img_size": 32},
    )
    assert "ours_precomputed_teacher" in result["variants"] and "ours_cached" not in result["variants"]
    # measured, not asserted: a timing; one step on a busy machine made the overhead -4.5% in CI
    assert result["ratios"]["method_overhead"] > -1 and result["ratios"]["ours_over_reference"] > 0


def test_bench_a_method_that_needs_indices_gets_a_stand_in_training_set(capsys):
    """CRD's step reads the samples' indices: every variant passes them, the banks are sized for the stand-in
    training set (it used to fail in the forward: no indices, no banks)."""
    assert main(["bench", *TINY, "--method", "crd", "--set", "num_negatives=64", "--json"]) == 0
    variants = json.loads(capsys.readouterr().out)["variants"]
    assert {"ours", "ours_precomputed_teacher", "ours_cached"} <= set(variants)
    assert all(v["img_per_s"] > 0 for v in variants.values())


def test_bench_bad_arguments_are_clear_errors(capsys):
    assert main(["bench", "--teacher", "no_such_model", "--student", "test_resnet"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["bench", *TINY[:-4], "--batch-size", "1"]) == 2
    assert "--batch-size must be >= 2" in capsys.readouterr().err


def test_reference_loss_is_the_rsd_formula():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    assert torch.allclose(reference_rsd_loss(z_s, z_t, 0.01), rsd_loss(z_s, z_t, 0.01), rtol=1e-10, atol=1e-10)
    # by hand on a 2-d case: C = Zt^T Zs / B of standardised columns
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0], [-2.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[0.5, 1.0], [1.0, 0.0], [-1.5, 2.0]], dtype=torch.float64)
    std = lambda x: (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)  # noqa: E731
    c = std(t).T @ std(s) / 3
    expected = (c[0, 0] - 1) ** 2 + (c[1, 1] - 1) ** 2 + 0.5 * (c[0, 1] ** 2 + c[1, 0] ** 2)
    assert torch.allclose(reference_rsd_loss(s, t, 0.5), expected)


def test_reference_step_trains_student_and_aad_only():
    torch.manual_seed(0)
    teacher = create_model_for_size("test_vit", 10, 32)
    student = create_model_for_size("test_resnet", 10, 32)
    step = ReferenceStep(teacher, student)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    loss = step(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)
    assert all(torch.equal(before_t[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert not teacher.training


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_models_are_built_for_the_bench_size(name):
    model = create_model_for_size(name, 10, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
