"""sd_kd and sd_dkd: region logits across architectures, loss wiring, training steps, parameters, engine runs."""

import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer
from timm.models.swin_transformer import SwinTransformer

from conftest import bf16_losses, distill, tiny_batch
from crossdistill import METHODS, Teacher, build_distiller
from crossdistill.distillers.sdd import SDDKDConfig, SDKDConfig, region_logits, token_grid
from crossdistill.errors import ConfigError
from crossdistill.losses.dkd import dkd_loss
from crossdistill.losses.kd import kd_loss
from crossdistill.losses.sdd import region_pool, sdd_dkd_loss, sdd_kd_loss
from crossdistill.models import FINAL, forward_model
from crossdistill.params import count_method_parameters

METHOD_NAMES = ["sd_kd", "sd_dkd"]
PAIRS = ["cnn", "token", "cnn_student_vit_teacher"]


def vit(seed: int, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=8, **kwargs)  # 4x4 patch grid


def cnn(name: str, seed: int, output_stride: int = 8):
    # output_stride 8: a 4x4 final map at 32 px, so the 2x2 and 4x4 regions differ from the global one
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10, output_stride=output_stride)


def tiny_pair(kind: str = "cnn"):
    if kind == "cnn":
        return cnn("test_resnet", 0), Teacher(cnn("test_convnext", 1, output_stride=16))
    if kind == "token":
        return vit(0), Teacher(vit(1))
    return cnn("test_resnet", 0), Teacher(vit(1))


batch = tiny_batch


def test_registered_with_official_defaults():
    assert set(METHOD_NAMES) <= set(METHODS.names())
    assert METHODS.get("sd_kd").config_cls is SDKDConfig and METHODS.get("sd_dkd").config_cls is SDDKDConfig
    # SDD train.py --M '[1,2,4]'; KD.py / SDD_DKD.py weight 2 on complementary regions; SPP's 4x4 grid;
    # mdistiller CFG.KD (T 4, CE 0.1, KD 0.9) and CFG.DKD (alpha 1, beta 8, T 4, CE 1); no warm-up (train.py)
    assert dataclasses.asdict(SDKDConfig()) == {
        "scales": (1, 2, 4),
        "complementary_weight": 2.0,
        "pool_grid": 4,
        "temperature": 4.0,
        "weight": 0.9,
        "ce_weight": 0.1,
    }
    assert dataclasses.asdict(SDDKDConfig()) == {
        "scales": (1, 2, 4),
        "complementary_weight": 2.0,
        "pool_grid": 4,
        "alpha": 1.0,
        "beta": 8.0,
        "temperature": 4.0,
        "weight": 1.0,
        "ce_weight": 1.0,
        "warmup_epochs": 0,
    }


# ---------------------------------------------------------------- region logits per architecture


def tiny_swin():
    torch.manual_seed(0)
    return SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=10
    )  # NHWC final map, 4x4 at 32 px


def tiny_mixer():
    torch.manual_seed(0)
    model = MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)  # 16 tokens, no prefix
    torch.nn.init.normal_(model.head.weight, std=0.1)  # timm zero-initialises the Mixer head
    return model


AVG_HEAD_MODELS = {
    "resnet": lambda: cnn("test_resnet", 0),
    "convnext": lambda: cnn("test_convnext", 0),  # head: pool -> LayerNorm -> fc
    "efficientnet": lambda: timm.create_model("test_efficientnet", num_classes=10),
    "vit_avg": lambda: vit(0, global_pool="avg"),  # head: pool -> fc_norm -> fc
    "mixer": tiny_mixer,
    "swin": tiny_swin,
}


@pytest.mark.parametrize("name", list(AVG_HEAD_MODELS))
def test_scale_one_region_is_the_models_own_prediction_for_average_pooling_heads(name):
    model = AVG_HEAD_MODELS[name]().eval()
    x = torch.randn(3, 3, 32, 32)
    out = forward_model(model, x, stages=[FINAL])
    regions = region_logits(model, out.stages[0], x.shape[-2:], (1, 2, 4))
    assert regions.shape == (3, 21, 10)
    torch.testing.assert_close(regions[:, 0], out.logits, rtol=1e-4, atol=1e-5)
    if name != "efficientnet":  # (its final map is 1x1 at 32 px)
        assert not torch.allclose(regions[:, 1], regions[:, 0])


def test_region_logits_of_a_cnn_are_its_fc_on_pooled_regions():
    model = cnn("test_resnet", 0).eval()
    x = torch.randn(2, 3, 32, 32)
    fmap = forward_model(model, x, stages=[FINAL]).stages[0]
    expected = model.fc(region_pool(fmap, (1, 2)))
    torch.testing.assert_close(region_logits(model, fmap, x.shape[-2:], (1, 2)), expected)


def test_class_token_vit_regions_use_the_patch_grid_after_the_final_norm():
    model = vit(0).eval()  # global_pool 'token'; forward_features applies model.norm to every token
    x = torch.randn(2, 3, 32, 32)
    tokens = forward_model(model, x, stages=[FINAL]).stages[0]
    assert tokens.shape == (2, 1 + 16, 64)
    assert token_grid(model, 16, (32, 32)) == (4, 4)
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)  # class token dropped
    expected = model.head(model.fc_norm(region_pool(grid, (1, 2, 4))))
    torch.testing.assert_close(region_logits(model, tokens, x.shape[-2:], (1, 2, 4)), expected)
    # the grid is row-major: region 1 (top-left 2x2 cell) pools tokens 0, 1, 4, 5 of the patch sequence
    top_left = tokens[:, 1:][:, [0, 1, 4, 5]].mean(dim=1)
    torch.testing.assert_close(region_logits(model, tokens, x.shape[-2:], (1, 2), None)[:, 1], model.head(top_left))


def test_swin_final_map_is_pooled_in_its_own_layout():
    model = tiny_swin().eval()
    x = torch.randn(2, 3, 32, 32)
    nhwc = model.forward_features(x)
    assert nhwc.shape == (2, 4, 4, 32) and model.output_fmt == "NHWC"
    fmap = forward_model(model, x, stages=[FINAL]).stages[0]
    torch.testing.assert_close(fmap, nhwc.permute(0, 3, 1, 2))
    expected = model.head.fc(region_pool(fmap, (1, 2, 4)))
    torch.testing.assert_close(region_logits(model, fmap, x.shape[-2:]), expected)


# ---------------------------------------------------------------- loss wiring


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_loss_terms_are_weighted_ce_plus_weighted_sdd(name, pair):
    student, teacher = tiny_pair(pair)
    args = {"scales": [1, 2], "complementary_weight": 3.0, "temperature": 2.0, "weight": 0.7, "ce_weight": 0.3}
    distiller = build_distiller(name, student, teacher, args)
    x, y = batch()
    student.eval()  # no dropout/BN updates: the manual recomputation below sees the same student
    out = distill(distiller, x, y)
    assert set(out.losses) == {"ce", "sdd"} and out.logits.shape == (8, 10)
    with torch.no_grad():
        ft = forward_model(teacher.model, x, stages=[FINAL]).stages[0]
        fs = forward_model(student, x, stages=[FINAL])
        rt = region_logits(teacher.model, ft, (32, 32), (1, 2))
        rs = region_logits(student, fs.stages[0], (32, 32), (1, 2))
        if name == "sd_kd":
            expected = sdd_kd_loss(rs, rt, y, 2.0, 3.0)
        else:
            expected = sdd_dkd_loss(rs, rt, y, 1.0, 8.0, 2.0, 3.0)
    torch.testing.assert_close(out.logits.detach(), fs.logits)
    torch.testing.assert_close(out.losses["ce"].detach(), 0.3 * F.cross_entropy(fs.logits, y))
    torch.testing.assert_close(out.losses["sdd"].detach(), 0.7 * expected)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_scale_one_only_is_the_plain_loss_on_the_logits(name):
    student, teacher = tiny_pair("cnn_student_vit_teacher")  # ViT teacher: class-token logits, not pooled patches
    distiller = build_distiller(name, student, teacher, {"scales": [1], "temperature": 2.0})
    x, y = batch()
    student.eval()
    out = distill(distiller, x, y)
    with torch.no_grad():
        zt, zs = teacher.model(x), student(x)
        expected = kd_loss(zs, zt, 2.0) if name == "sd_kd" else dkd_loss(zs, zt, y, 1.0, 8.0, 2.0)
    weight = distiller.cfg.weight
    torch.testing.assert_close(out.losses["sdd"].detach(), weight * expected)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_student_is_trained_teacher_is_not_and_no_parameters_are_added(name):
    student, teacher = tiny_pair("cnn")
    distiller = build_distiller(name, student, teacher, {})
    distill(distiller, *batch()).losses["sdd"].backward()  # the SDD term alone reaches backbone and classifier
    assert student.fc.weight.grad.abs().sum() > 0 and student.conv1[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    assert distiller.extra_modules() == {} and distiller.extra_parameter_count() == 0


@pytest.mark.parametrize("name", METHOD_NAMES)
@pytest.mark.parametrize(
    "teacher,student",
    [
        ("resnet34", "resnet18"),
        ("resnet50", "mobilenetv1_100"),
        ("vit_small_patch16_224", "resnet18"),
        ("swin_tiny_patch4_window7_224", "deit_tiny_patch16_224"),
    ],
)
def test_count_method_parameters_reports_zero_extra(name, teacher, student):
    report = count_method_parameters(name, teacher, student, num_classes=1000, method_args=["scales=[1,2]"])
    assert report["extra_trainable_parameters"] == 0 and report["extra_by_module"] == {}
    assert report["method_args"]["scales"] == (1, 2)


@pytest.mark.parametrize("pair", ["cnn", "token"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_twenty_adamw_steps_lower_the_loss(name, pair):
    student, teacher = tiny_pair(pair)
    distiller = build_distiller(name, student, teacher, {"scales": [1, 2, 4]})
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    x, y = batch(seed=3)
    totals, sdd = [], []
    for _ in range(20):
        out = distill(distiller, x, y)
        assert all(torch.isfinite(v) for v in out.losses.values())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        totals.append(out.loss.item())
        sdd.append(out.losses["sdd"].item())
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < 0.7 * totals[0], totals
    assert sdd[-1] < sdd[0], sdd  # the distillation term itself falls, not only the CE


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_bf16_autocast_gives_fp32_losses(name):
    student, teacher = tiny_pair("token")
    distiller = build_distiller(name, student, teacher, {})
    assert bf16_losses(distiller, *batch())["sdd"].dtype == torch.float32


def test_sd_dkd_warmup_follows_the_epoch():
    student, teacher = tiny_pair("cnn")
    student.eval()
    x, y = batch()
    warm = build_distiller("sd_dkd", student, teacher, {"warmup_epochs": 4})
    off = build_distiller("sd_dkd", student, teacher, {})
    with torch.no_grad():
        full = distill(off, x, y).losses["sdd"]
        for epoch, factor in [(0, 0.25), (1, 0.5), (3, 1.0), (50, 1.0)]:
            warm.on_epoch_start(epoch, 100)
            torch.testing.assert_close(distill(warm, x, y).losses["sdd"], factor * full)


BAD = [
    ("sd_kd", {"scales": [2, 4]}, "scales"),
    ("sd_kd", {"scales": []}, "scales"),
    ("sd_kd", {"scales": [1, 4, 2]}, "scales"),
    ("sd_kd", {"scales": [1, 1]}, "scales"),
    ("sd_dkd", {"scales": [1, 8]}, "pool_grid"),
    ("sd_dkd", {"pool_grid": 1}, "pool_grid"),
    ("sd_kd", {"complementary_weight": -1.0}, "complementary_weight"),
    ("sd_kd", {"temperature": 0.0}, "temperature"),
    ("sd_dkd", {"beta": -1.0}, "beta"),
    ("sd_dkd", {"alpha": float("nan")}, "alpha"),
    ("sd_dkd", {"warmup_epochs": -1}, "warmup_epochs"),
    ("sd_kd", {"weight": -0.5}, "weight"),
    ("sd_kd", {"ce_weight": -0.5}, "ce_weight"),
    ("sd_kd", {"scales": "1,2"}, "scales"),
    ("sd_dkd", {"scale": [1, 2]}, "scale"),
]


@pytest.mark.parametrize("name,args,key", BAD)
def test_bad_values_name_the_key(name, args, key):
    with pytest.raises(ConfigError, match=rf"'method_args\.{key}'"):
        build_distiller(name, *tiny_pair("cnn"), args)


def test_larger_scales_work_without_the_4x4_detour():
    student, teacher = tiny_pair("cnn")
    out = distill(build_distiller("sd_kd", student, teacher, {"scales": [1, 2, 4, 8], "pool_grid": None}), *batch())
    assert torch.isfinite(out.loss)


def test_methods_need_a_teacher():
    for name in METHOD_NAMES:
        with pytest.raises(ValueError, match="needs a teacher"):
            build_distiller(name, tiny_pair()[0], None, {})


# ---------------------------------------------------------------- through the engine


@pytest.mark.parametrize("name,args", [("sd_kd", {}), ("sd_dkd", {"scales": [1, 2], "warmup_epochs": 1})])
def test_runs_through_the_engine(tmp_path, name, args):
    from conftest import tiny_run
    from crossdistill.config import build_config
    from crossdistill.engine import train

    summary = train(build_config(tiny_run(tmp_path, method=name, method_args=args, train={"epochs": 1})))
    assert len(summary.history) == 1
    for key in ("train_loss", "train_ce", "train_sdd"):
        assert math.isfinite(summary.history[0][key]), summary.history[0]
    assert summary.extra_parameters == 0
