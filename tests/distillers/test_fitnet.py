import copy

import pytest
import timm
import torch

from conftest import bf16_losses, distill, tiny_batch, tiny_pair, tiny_resnet, tiny_run, tiny_vit
from crossdistill import METHODS, Teacher, build_distiller
from crossdistill.distillers import method_config
from crossdistill.distillers.fitnet import FitNet, FitNetConfig
from crossdistill.errors import ConfigError
from crossdistill.models import default_stages, forward_model

resnet, vit, pair = tiny_resnet, tiny_vit, tiny_pair


def batch(seed=0, n=8):
    return tiny_batch(seed, n)


# ---------------------------------------------------------------- config


def test_registry_and_official_defaults():
    assert METHODS.get("fitnet") is FitNet and FitNet.config_cls is FitNetConfig
    cfg = method_config("fitnet", {})
    # --fitnet-loss-weight 1 x RSD's internal 0.1, --gt-loss-weight 1, --fitnet-stage 1 2 3 4
    assert (cfg.weight, cfg.w_gt, cfg.stages, cfg.img_size, cfg.norm) == (0.1, 1.0, [1, 2, 3, 4], None, False)


@pytest.mark.parametrize(
    "args, key",
    [
        ({"stages": [0, 1]}, "stages"),
        ({"stages": [5]}, "stages"),
        ({"stages": []}, "stages"),
        ({"stages": [2, 2]}, "stages"),
        ({"weight": -1.0}, "weight"),
        ({"w_gt": float("nan")}, "w_gt"),
        ({"img_size": 4}, "img_size"),
        ({"stage": [1]}, "stage"),
        ({"stages": "1"}, "stages"),
    ],
)
def test_bad_config_values_name_the_key(args, key):
    with pytest.raises(ConfigError, match=key):
        method_config("fitnet", args)


def test_needs_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_distiller("fitnet", resnet(), None, {})


# ---------------------------------------------------------------- forward


def test_loss_terms_are_weighted_ce_plus_weighted_sum_of_stage_mses():
    student, teacher = pair(resnet, vit)
    fit = build_distiller("fitnet", student, teacher, {"weight": 0.3, "w_gt": 0.5, "img_size": 32})
    x, y = batch(n=6)
    out = distill(fit, x, y)
    assert set(out.losses) == {"ce", "fitnet"} and out.logits.shape == (6, 10)
    with torch.no_grad():
        feats_t = forward_model(teacher.model, x, stages=default_stages(teacher.model)).stages
        res = forward_model(student, x, stages=default_stages(student))
        expected = 0.0
        for aligner, fs, ft in zip(fit.aligners, res.stages, feats_t):
            target = ft[:, 1:] if ft.ndim == 3 else ft  # the teacher's CLS token is not a target
            expected += (aligner(fs).double() - target.double()).pow(2).mean()
    assert out.losses["fitnet"].item() == pytest.approx(0.3 * expected.item(), rel=1e-5)
    assert torch.allclose(out.losses["ce"], 0.5 * torch.nn.functional.cross_entropy(res.logits, y), rtol=1e-5)
    assert torch.allclose(out.loss, out.losses["ce"] + out.losses["fitnet"])


def test_stage_subset_and_extra_modules():
    student, teacher = pair(resnet, vit)
    fit = build_distiller("fitnet", student, teacher, {"stages": [2, 4], "img_size": 32})
    assert fit.stages_s == [-3, -1] and fit.stages_t == [3, 5]
    assert set(fit.extra_modules()) == {"aligners"} and len(fit.aligners) == 2
    assert (
        fit.extra_parameter_count()
        == sum(p.numel() for p in fit.aligners.parameters())
        == 48 * 64 + 64 + 96 * 1024 + 1024
    )
    assert not any(name.startswith("teacher") for name, _ in fit.named_parameters())


def test_loss_is_fp32_under_bf16_autocast():
    student, teacher = pair(resnet, vit)
    fit = build_distiller("fitnet", student, teacher, {"img_size": 32})
    assert bf16_losses(fit, *batch(n=4))["fitnet"].dtype == torch.float32


def _train(student_fn, teacher_fn, steps=20):
    student, teacher = pair(student_fn, teacher_fn)
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    fit = build_distiller("fitnet", student, teacher, {"img_size": 32})
    fit.train()
    opt = torch.optim.AdamW(fit.parameters(), lr=1e-3)
    x, y = batch()
    history = []
    for step in range(steps):
        out = distill(fit, x, y)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            grads = {
                "aligners": [p.grad for p in fit.aligners.parameters()],
                "teacher": [p.grad for p in teacher.model.parameters()],
            }
        opt.step()
        history.append(out.losses["fitnet"].item())
    return fit, teacher, teacher_before, history, grads


@pytest.mark.parametrize("student_fn, teacher_fn", [(resnet, vit), (vit, resnet)], ids=["cnn->vit", "vit->cnn"])
def test_training_lowers_the_fitnet_loss_and_leaves_the_teacher_alone(student_fn, teacher_fn):
    fit, teacher, before, history, grads = _train(student_fn, teacher_fn)
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < 0.7 * history[0], history
    assert all(g is not None and g.abs().sum() > 0 for g in grads["aligners"])
    assert all(g is None for g in grads["teacher"])
    assert not teacher.model.training
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("student_fn, teacher_fn", [(resnet, vit), (vit, resnet)], ids=["cnn->vit", "vit->cnn"])
def test_fitnet_term_alone_reaches_the_student_stages(student_fn, teacher_fn):
    student, teacher = pair(student_fn, teacher_fn)
    fit = build_distiller("fitnet", student, teacher, {"img_size": 32, "w_gt": 0.0})
    distill(fit, *batch(n=4)).loss.backward()
    stem = next(p for name, p in student.named_parameters() if name.startswith(("conv1", "patch_embed")))
    assert stem.grad is not None and stem.grad.abs().sum() > 0
    head = student.get_classifier().weight
    assert head.grad is None or head.grad.abs().sum() == 0  # the head is after every stage


# ---------------------------------------------------------------- probing size


def test_probe_size_defaults_to_the_students_pretrained_input_size():
    student, teacher = pair(resnet, vit)
    assert student.pretrained_cfg["input_size"] == (3, 160, 160)
    fit = build_distiller("fitnet", student, teacher, {})
    assert fit.input_size == (160, 160)
    assert fit.aligners[0].student.grid == (40, 40) and fit.aligners[0].teacher.grid == (20, 20)
    # training at 32: every student/teacher grid ratio is the same as at 160, so the same aligners fit
    out = distill(fit, *batch(n=2))
    assert torch.isfinite(out.loss)
    assert build_distiller("fitnet", *pair(resnet, vit), {"img_size": 32}).input_size == (32, 32)


def test_probing_a_size_the_teacher_cannot_take_says_what_to_set():
    student, teacher = pair(resnet, lambda: vit(dynamic_img_size=False))
    with pytest.raises(ConfigError, match="img_size"):
        build_distiller("fitnet", student, teacher, {})  # probes at 160, the ViT takes 32 only
    assert build_distiller("fitnet", resnet(), teacher, {"img_size": 32}).input_size == (32, 32)


def test_swin_student_to_vit_teacher():
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=10,
        img_size=64,
        window_size=4,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        embed_dim=16,
    )
    teacher = Teacher(timm.create_model("test_vit", num_classes=10, img_size=64, patch_size=8))
    fit = build_distiller("fitnet", swin, teacher, {"img_size": 64})
    assert [a.mode for a in fit.aligners] == ["down", "same", "up", "up"]
    out = distill(fit, torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    out.loss.backward()
    assert torch.isfinite(out.losses["fitnet"])


def test_parameter_accounting_on_meta_models():
    from crossdistill.params import count_method_parameters

    info = count_method_parameters("fitnet", "vit_small_patch16_224", "resnet18", num_classes=100)
    # ResNet18 stages 64@56, 128@28, 256@14, 512@7 against ViT-S's 384-wide 14x14 patch grid (224 px):
    # PatchEmbed k4, PatchEmbed k2, 1x1 conv, 1x1 conv to 384*4 (+ depth-to-space), as RSD's fork builds them
    expected = (64 * 16 * 384 + 384) + (128 * 4 * 384 + 384) + (256 * 384 + 384) + (512 * 1536 + 1536)
    assert info["extra_by_module"] == {"aligners": expected}


# ---------------------------------------------------------------- engine


def test_trains_through_the_engine(tmp_path):
    from crossdistill.config import build_config
    from crossdistill.engine import train

    # data.img_size is 32 and method_args.img_size is unset: the aligners are probed at test_resnet's 160
    summary = train(build_config(tiny_run(tmp_path, method="fitnet", train={"epochs": 1})))
    record = summary.history[-1]
    assert torch.isfinite(torch.tensor([record["train_fitnet"], record["train_loss"]])).all()
    assert record["train_fitnet"] > 0 and summary.extra_parameters > 0
