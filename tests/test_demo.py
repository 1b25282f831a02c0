"""The demo's pieces on a cut-down setting: four runs, the table, the curves PNG."""

from __future__ import annotations

import io

import yaml

from crossdistill.config import load_config
from crossdistill.demo import RUNS, recipe, run_demo


def test_the_demo_pair_is_a_cnn_teacher_and_a_vit_student_with_kd_and_rsd():
    configs = {run.key: load_config(recipe(run.recipe)) for run in RUNS}
    assert configs["teacher"].student.name == "resnet18" and configs["teacher"].method == "vanilla"
    assert configs["scratch"].student.name.startswith("vit_") and configs["scratch"].method == "vanilla"
    for key in ("kd", "rsd"):
        assert configs[key].method == key
        assert configs[key].student == configs["scratch"].student  # the same student as the scratch run
        assert (configs[key].teacher.name, configs[key].teacher.kwargs) == (
            configs["teacher"].student.name,
            configs["teacher"].student.kwargs,
        )
    assert len({c.train.run_name for c in configs.values()}) == 4


def test_the_demo_trains_four_runs_prints_one_table_and_draws_the_curves(tmp_path):
    out = io.StringIO()
    overrides = ["data.train_subset=96", "data.eval_subset=40", "train.progress=false"]
    result = run_demo(output_dir=str(tmp_path), epochs=1, out=out, overrides=overrides)
    text = out.getvalue()
    for run in RUNS:
        assert run.label in text
        assert (tmp_path / result[run.key].run_dir.split("/")[-1] / "best.pt").is_file()
    assert "RSD over the ViT alone:" in text and "over KD:" in text
    for key in ("kd", "rsd"):  # distilled from the teacher this demo just trained
        config = yaml.safe_load((tmp_path / f"student-{key}" / "config.yaml").read_text())
        assert config["teacher"]["checkpoint"] == str(tmp_path / "teacher-resnet" / "best.pt")
    assert result["rsd"].extra_parameters > 0 and result["kd"].extra_parameters == 0
    curves = tmp_path / "demo_curves.png"
    assert result["curves"] == curves and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"curves: {curves}" in text
