"""RKD, CC and AT: configs, loss terms as the engine computes them, training across architectures (a CNN
student with a token teacher and the reverse), parameter counts, and runs through the command line."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import bf16_losses, distill, run_teacher, tiny_batch, tiny_pair, tiny_resnet, tiny_run, tiny_vit
from crossdistill import METHODS, build_distiller
from crossdistill.cli import main
from crossdistill.distillers import method_config
from crossdistill.distillers.at import AT, ATConfig
from crossdistill.distillers.cc import CC, CCConfig
from crossdistill.distillers.rkd import RKD, RKDConfig
from crossdistill.errors import ConfigError
from crossdistill.losses import at_loss, cc_loss, rkd_loss
from crossdistill.models import default_stages, forward_model
from crossdistill.params import count_method_parameters

METHOD_NAMES = ("rkd", "cc", "at")
DIRECTIONS = [(tiny_resnet, tiny_vit), (tiny_vit, tiny_resnet)]
DIRECTION_IDS = ["cnn->token", "token->cnn"]


# ---------------------------------------------------------------- configs


def test_registry_and_reference_defaults():
    assert (METHODS.get("rkd"), METHODS.get("cc"), METHODS.get("at")) == (RKD, CC, AT)
    assert (RKD.config_cls, CC.config_cls, AT.config_cls) == (RKDConfig, CCConfig, ATConfig)
    rkd = method_config("rkd", {})  # OFA train.py: --rkd-distance-weight 25 --rkd-angle-weight 50 --rkd-eps 1e-12
    assert (rkd.distance_weight, rkd.angle_weight, rkd.eps, rkd.squared, rkd.weight, rkd.w_gt) == (
        25.0,
        50.0,
        1e-12,
        False,
        1.0,
        1.0,
    )
    cc = method_config("cc", {})  # --correlation-scale 0.02 --correlation-feat-dim 128
    assert (cc.scale, cc.feat_dim, cc.weight, cc.w_gt) == (0.02, 128, 1.0, 1.0)
    at = method_config("at", {})  # the official --beta 1e+3, p = 2, FitNet's four stages
    assert (at.weight, at.p, at.stages, at.w_gt) == (1000.0, 2.0, [1, 2, 3, 4], 1.0)


@pytest.mark.parametrize(
    "method, args, message",
    [
        ("rkd", {"eps": 0.0}, "'method_args.eps': must be a finite number > 0.0, got 0.0"),
        ("rkd", {"distance_weight": -1.0}, "'method_args.distance_weight': must be a finite number >= 0.0"),
        ("rkd", {"angle_weight": float("nan")}, "'method_args.angle_weight'"),
        ("rkd", {"weight": float("inf")}, "'method_args.weight'"),
        ("rkd", {"w_gt": -0.5}, "'method_args.w_gt'"),
        ("rkd", {"squared": "yes"}, "'method_args.squared'"),
        ("cc", {"feat_dim": 0}, "'method_args.feat_dim': must be >= 1, got 0"),
        ("cc", {"scale": -0.02}, "'method_args.scale'"),
        ("cc", {"weight": float("nan")}, "'method_args.weight'"),
        ("cc", {"feat_dim": 1.5}, "'method_args.feat_dim'"),
        ("at", {"p": 0.5}, "'method_args.p': must be a finite number >= 1.0, got 0.5"),
        ("at", {"weight": -1.0}, "'method_args.weight'"),
        ("at", {"stages": [0]}, "'method_args.stages'"),
        ("at", {"stages": [2, 2]}, "'method_args.stages'"),
        ("at", {"beta": 1000}, "unknown config key 'method_args.beta'"),
    ],
)
def test_bad_values_name_the_key(method, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        method_config(method, args)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_needs_a_teacher(method):
    with pytest.raises(ConfigError, match=f"method '{method}' needs a teacher"):
        method_config(method, {}, teacher=None)


def test_teacher_request_and_cacheability():
    student, teacher = tiny_pair()
    for method in ("rkd", "cc"):  # the embedding only: the teacher cache can store it
        distiller = build_distiller(method, copy.deepcopy(student), teacher, {})
        assert distiller.teacher_request().outputs == ("embedding",) and distiller.teacher_cacheable
    at = build_distiller("at", student, teacher, {"stages": [2, 4]})
    assert at.stages_s == [-3, -1] and at.stages_t == [3, 5]  # test_vit: 6 blocks, its last four are the stages
    assert at.teacher_request().stages == (3, 5) and not at.teacher_cacheable


def test_at_names_itself_when_a_model_has_no_four_stages():
    student, teacher = tiny_pair()
    student.feature_info = student.feature_info[:2]
    with pytest.raises(ConfigError, match="AT cannot pick the student's stages"):
        build_distiller("at", student, teacher, {})


# ---------------------------------------------------------------- loss terms


def test_rkd_terms_are_the_weighted_loss_on_both_embeddings():
    student, teacher = tiny_pair()
    args = {"distance_weight": 2.0, "angle_weight": 3.0, "weight": 0.5, "w_gt": 0.25, "squared": True, "eps": 1e-9}
    rkd = build_distiller("rkd", student, teacher, args)
    x, y = tiny_batch(n=6)
    out = distill(rkd, x, y)
    assert set(out.losses) == {"ce", "rkd"} and out.logits.shape == (6, 10)
    with torch.no_grad():
        res = forward_model(student, x)
        expected = 0.5 * rkd_loss(res.embedding, run_teacher(teacher, x).embedding, 2.0, 3.0, True, 1e-9)
    assert torch.allclose(out.losses["rkd"], expected, rtol=1e-5)
    assert torch.allclose(out.losses["ce"], 0.25 * F.cross_entropy(res.logits, y), rtol=1e-5)
    assert torch.allclose(out.loss, out.losses["ce"] + out.losses["rkd"])
    assert rkd.extra_modules() == {} and rkd.extra_parameter_count() == 0


def test_cc_terms_embed_both_sides_and_both_embeddings_train():
    student, teacher = tiny_pair()
    cc = build_distiller("cc", student, teacher, {"scale": 0.1, "weight": 2.0, "w_gt": 0.5, "feat_dim": 16})
    x, y = tiny_batch(n=6)
    out = distill(cc, x, y)
    assert set(out.losses) == {"ce", "cc"}
    with torch.no_grad():
        res = forward_model(student, x)
        expected = 2.0 * 0.1 * cc_loss(cc.embed_s(res.embedding), cc.embed_t(run_teacher(teacher, x).embedding))
    assert torch.allclose(out.losses["cc"], expected, rtol=1e-5)
    assert torch.allclose(out.losses["ce"], 0.5 * F.cross_entropy(res.logits, y), rtol=1e-5)
    assert set(cc.extra_modules()) == {"embed_s", "embed_t"}
    assert (cc.embed_s.in_features, cc.embed_t.in_features, cc.embed_t.out_features) == (
        student.num_features,
        teacher.dim,
        16,
    )
    out.losses["cc"].backward()
    assert cc.embed_t.weight.grad.abs().sum() > 0 and cc.embed_s.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_at_terms_compare_each_stage_on_the_teachers_grid_without_the_class_token():
    student, teacher = tiny_pair()  # ResNet stages 8x8 .. 1x1 at 32 px; ViT: a class token and 4x4 patches
    at = build_distiller("at", student, teacher, {"weight": 10.0, "p": 2.0, "w_gt": 0.5})
    x, y = tiny_batch(n=4)
    out = distill(at, x, y)
    assert set(out.losses) == {"ce", "at"}
    with torch.no_grad():
        res = forward_model(student, x, stages=default_stages(student))
        feats_t = run_teacher(teacher, x, stages=default_stages(teacher.model)).stages
        expected = 0.0
        for feat_s, feat_t in zip(res.stages, feats_t):
            assert feat_t.shape[1] == 1 + 16
            grid_t = feat_t[:, 1:].reshape(4, 4, 4, -1).permute(0, 3, 1, 2)  # patches in raster order
            expected += at_loss(feat_s, grid_t)
    assert [f.shape[-1] for f in res.stages] == [8, 4, 2, 1]  # resized by area, kept, bilinear, bilinear
    assert torch.allclose(out.losses["at"], 10.0 * expected, rtol=1e-5)
    assert torch.allclose(out.losses["ce"], 0.5 * F.cross_entropy(res.logits, y), rtol=1e-5)
    assert at.extra_modules() == {} and at.extra_parameter_count() == 0


def test_at_token_student_drops_its_class_token():
    student, teacher = tiny_pair(tiny_vit, tiny_resnet)
    at = build_distiller("at", student, teacher, {"stages": [1]})
    x, y = tiny_batch(n=4)
    with torch.no_grad():
        feat_s = forward_model(student, x, stages=at.stages_s).stages[0]
        feat_t = run_teacher(teacher, x, stages=at.stages_t).stages[0]
        map_s = feat_s[:, 1:].reshape(4, 4, 4, -1).permute(0, 3, 1, 2)
        expected = 1000.0 * at_loss(map_s, feat_t)
    assert torch.allclose(distill(at, x, y).losses["at"], expected, rtol=1e-5)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_terms_are_fp32_under_bf16_autocast(method):
    student, teacher = tiny_pair()
    assert bf16_losses(build_distiller(method, student, teacher, {}), *tiny_batch(n=4))[method].dtype == torch.float32


@pytest.mark.parametrize("method", ("rkd", "cc"))
def test_a_batch_of_one_is_a_clear_error(method):
    student, teacher = tiny_pair()
    with pytest.raises(ValueError, match="at least 2"):
        distill(build_distiller(method, student, teacher, {}).eval(), *tiny_batch(n=1))


# ---------------------------------------------------------------- training across architectures


@pytest.mark.parametrize("student_fn, teacher_fn", DIRECTIONS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_adamw_steps_lower_the_term_and_leave_the_teacher_alone(method, student_fn, teacher_fn):
    student, teacher = tiny_pair(student_fn, teacher_fn)
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    distiller = build_distiller(method, student, teacher, {}).train()
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    x, y = tiny_batch(n=8)
    terms, totals = [], []
    for _ in range(12):
        out = distill(distiller, x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        terms.append(out.losses[method].item())
        totals.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(terms + totals)))
    assert terms[-1] < 0.5 * terms[0], terms
    assert totals[-1] < 0.5 * totals[0], totals
    assert all(p.grad is None for p in teacher.model.parameters()) and not teacher.model.training
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key


# ---------------------------------------------------------------- parameters


def test_params_counts_the_two_cc_embeddings_and_nothing_for_rkd_and_at(capsys):
    cc = count_method_parameters("cc", "vit_small_patch16_224", "resnet18", num_classes=100)
    assert cc["extra_by_module"] == {"embed_s": 512 * 128 + 128, "embed_t": 384 * 128 + 128}
    wider = count_method_parameters("cc", "vit_small_patch16_224", "resnet18", 100, ["feat_dim=256"])
    assert wider["extra_trainable_parameters"] == (512 + 384) * 256 + 2 * 256
    for method in ("rkd", "at"):
        info = count_method_parameters(method, "vit_small_patch16_224", "resnet18", num_classes=100)
        assert info["extra_trainable_parameters"] == 0 and info["extra_by_module"] == {}
    code = main(["params", "--method", "cc", "--teacher", "vit_small_patch16_224", "--student", "resnet18", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["extra_trainable_parameters"] == 114944


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_train_from_the_command_line(tmp_path, capsys, method):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run(tmp_path, method="kd", train={"epochs": 1})))
    code = main(["train", "--config", str(config), f"method={method}"])
    assert code == 0, capsys.readouterr()
    run_dir = tmp_path / "runs" / "run"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"] == method
    record = json.loads((run_dir / "summary.json").read_text())["history"][-1]
    assert record[f"train_{method}"] > 0 and torch.isfinite(torch.tensor(record["train_loss"]))


ONE_SAMPLE = "needs at least 2 samples per batch and process (its loss uses batch statistics); train.batch_size is 1"


@pytest.mark.parametrize(
    "method, override, message",
    [
        ("rkd", "method_args.eps=0", "config key 'method_args.eps': must be a finite number > 0.0, got 0.0"),
        ("cc", "method_args.feat_dim=0", "config key 'method_args.feat_dim': must be >= 1, got 0"),
        ("at", "method_args.p=0.5", "config key 'method_args.p': must be a finite number >= 1.0, got 0.5"),
        ("rkd", "train.batch_size=1", f"method 'rkd' {ONE_SAMPLE}"),
        ("cc", "train.batch_size=1", f"method 'cc' {ONE_SAMPLE}"),
    ],
)
def test_documented_errors_print_one_line(tmp_path, capsys, method, override, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run(tmp_path, method=method, train={"epochs": 1})))
    code = main(["train", "--config", str(config), override])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and lines == [f"crossdistill: error: {message}"]
    assert not (tmp_path / "runs" / "run").exists()
