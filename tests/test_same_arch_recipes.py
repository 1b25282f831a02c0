"""The ImageNet same-architecture recipes (configs/imagenet/same_arch/): load, resolve and build on the meta device.

As everywhere under ``configs/``, YAML files inside a ``_base`` directory are partial configs
(``_base/common.yaml`` and one file per pair); every other file is a complete run.
"""

from pathlib import Path

import pytest
import timm
import torch

from crossdistill.config import load_config
from crossdistill.distillers import METHODS, build_distiller, method_config
from crossdistill.engine.setup import build_scheduler, lr_plan
from crossdistill.engine.step import build_optimizer
from crossdistill.models import Teacher

ROOT = Path(__file__).resolve().parents[1] / "configs" / "imagenet" / "same_arch"
RECIPES = sorted(p for p in ROOT.rglob("*.yaml") if "_base" not in p.relative_to(ROOT).parts)
PAIRS = {"r34_r18": ("resnet34.tv_in1k", "resnet18"), "r50_mv1": ("resnet50.tv_in1k", "mobilenetv1_100")}
METHOD_FILES = {"scratch", "kd", "dkd", "dist", "rsd", "sd_kd", "sd_dkd"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_pair_has_every_method():
    assert {p.name for p in (ROOT / "_base").glob("*.yaml")} == {"common.yaml", "r34_r18.yaml", "r50_mv1.yaml"}
    for pair in PAIRS:
        assert {p.stem for p in RECIPES if p.parent.name == pair} == METHOD_FILES, pair


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_loads_and_builds_on_meta(path):
    cfg = load_config(path)
    assert cfg.num_classes == 1000
    teacher_name, student_name = PAIRS[path.parent.name]
    assert cfg.student.name == student_name and not cfg.student.pretrained
    assert cfg.method == {"scratch": "vanilla"}.get(path.stem, path.stem)
    needs_teacher = METHODS.get(cfg.method).needs_teacher
    if needs_teacher:
        assert cfg.teacher.name == teacher_name and cfg.teacher.pretrained and cfg.teacher.checkpoint is None
    else:
        assert cfg.teacher is None
    args = method_config(cfg.method, cfg.method_args, teacher=cfg.teacher)
    with torch.device("meta"):
        student = timm.create_model(
            cfg.student.name, pretrained=False, num_classes=cfg.num_classes, **cfg.student.kwargs
        )
        teacher = None
        if needs_teacher:
            teacher = Teacher(
                timm.create_model(cfg.teacher.name, pretrained=False, num_classes=cfg.num_classes, **cfg.teacher.kwargs)
            )
        distiller = build_distiller(cfg.method, student, teacher, args)
    assert distiller.student is student
    if cfg.method != "rsd":  # RSD trains its AAD projector; the logit methods add nothing
        assert distiller.extra_parameter_count() == 0


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_recipe_uses_the_official_imagenet_setting(path):
    cfg = load_config(path)
    d, o, t = cfg.data, cfg.optim, cfg.train
    assert (d.dataset, d.train_split, d.eval_split, d.img_size) == ("folder", "train", "val", 224)
    assert d.mean == (0.485, 0.456, 0.406) and d.std == (0.229, 0.224, 0.225)
    assert (d.crop_pct, d.interpolation, d.train_interpolation) == (0.875, "bilinear", "bilinear")
    assert d.color_jitter is None and d.auto_augment is None and d.re_prob == 0.0
    assert (o.momentum, o.weight_decay, o.warmup_epochs) == (0.9, 1e-4, 0)
    if path.stem == "dist":  # the DIST code: Nesterov SGD, biases and 1-D parameters not decayed
        assert o.opt == "sgd" and not o.decay_bias_and_norm
    else:  # mdistiller and SDD: torch.optim.SGD with momentum (no Nesterov), every parameter decayed
        assert o.opt == "momentum" and o.decay_bias_and_norm
    assert t.sync_bn == path.stem.startswith("sd_")  # SDD's ImageNet script uses SyncBatchNorm
    assert (o.sched, o.decay_epochs, o.decay_rate) == ("step", 30, 0.1)
    assert (t.epochs, t.label_smoothing, t.mixup, t.cutmix) == (100, 0.0, 0.0, 0.0)
    # lr 0.1 per 256 images; 8 GPUs x batch_size = reference_batch
    assert o.lr / t.reference_batch == pytest.approx(0.1 / 256)
    assert t.batch_size * 8 == t.reference_batch
    if cfg.teacher is not None:  # torchvision weights, trained with the data's normalisation: no re-normalising
        pretrained = timm.models.get_pretrained_cfg(cfg.teacher.name)
        assert pretrained.tag == "tv_in1k" and tuple(pretrained.mean) == d.mean and tuple(pretrained.std) == d.std


def test_step_schedule_decays_at_30_60_90():
    cfg = load_config(ROOT / "r34_r18" / "kd.yaml")
    o = cfg.optim
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr, momentum=o.momentum)
    gpus = cfg.train.reference_batch // cfg.train.batch_size  # the reference run's: the lr as the recipe gives it
    scheduler = build_scheduler(optimizer, cfg, lr_plan(cfg, gpus), steps_per_epoch=100)
    lrs = {}
    for epoch in range(cfg.train.epochs):
        scheduler.step(epoch)
        lrs[epoch] = optimizer.param_groups[0]["lr"]
    expected = {0: 0.2, 29: 0.2, 30: 0.02, 59: 0.02, 60: 0.002, 89: 0.002, 90: 0.0002, 99: 0.0002}
    for epoch, lr in expected.items():
        assert lrs[epoch] == pytest.approx(lr), epoch


@pytest.mark.parametrize("pair,scales,beta", [("r34_r18", (1, 2), 0.5), ("r50_mv1", (1, 2, 4), 2.0)])
def test_sdd_recipes_carry_the_official_per_pair_values(pair, scales, beta):
    sd_dkd = load_config(ROOT / pair / "sd_dkd.yaml")
    args = method_config("sd_dkd", sd_dkd.method_args)
    assert (args.scales, args.beta, args.alpha, args.temperature, args.complementary_weight) == (
        scales,
        beta,
        1.0,
        1.0,
        2.0,
    )
    dkd = method_config("dkd", load_config(ROOT / pair / "dkd.yaml").method_args)
    assert (dkd.beta, dkd.temperature) == (beta, 1.0)
    sd_kd = method_config("sd_kd", load_config(ROOT / pair / "sd_kd.yaml").method_args)
    assert (sd_kd.scales, sd_kd.temperature, sd_kd.weight, sd_kd.ce_weight) == ((1, 2, 4), 4.0, 0.9, 0.1)


@pytest.mark.parametrize("path", RECIPES, ids=rel)
def test_the_optimiser_is_the_reference_runs_sgd(path):
    # timm's "sgd" is Nesterov and "momentum" is not: build the optimiser as a run does and read its flags.
    o = load_config(path).optim
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = build_optimizer(model, o, o.lr, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["nesterov"] == (path.stem == "dist")
    decays = sorted(len(g["params"]) for g in optimizer.param_groups if g["weight_decay"] > 0)
    assert decays == ([1] if path.stem == "dist" else [4])  # DIST decays the Linear weight only
