"""Every recipe under ``configs/`` resolves and builds: teacher, student and method with
``pretrained=False`` on PyTorch's ``meta`` device (nothing allocated, loaded or downloaded), at
the recipe's input size, with the dataset's class count, the reference run's effective batch and,
for RSD and OFA, the extra trainable parameters of paper_facts.md section 5.

Convention: a YAML file inside a directory named ``_base`` is a partial config that recipes extend
with ``base: [...]``; every other YAML file under ``configs/`` is a complete run.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.layers import DropPath

import crossdistill  # noqa: F401  (registers swin_pico / swin_nano with timm)
from crossdistill.config import load_config
from crossdistill.distillers import METHODS, build_distiller, method_config
from crossdistill.engine.setup import make_criterion
from crossdistill.models import Teacher, create_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def is_partial(path: Path) -> bool:
    return "_base" in path.relative_to(CONFIGS).parts


def is_search_space(path: Path) -> bool:
    """configs/search/ holds search spaces for ``crossdistill tune`` (tests/search/test_tune.py reads them)."""
    return path.relative_to(CONFIGS).parts[0] == "search"


RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if not is_partial(p) and not is_search_space(p))
BASES = sorted(p for p in CONFIGS.rglob("*.yaml") if is_partial(p))

DATASETS = {  # first directory under configs/ -> (num_classes, data.dataset)
    "cifar100": (100, "cifar100"),
    "imagenet": (1000, "folder"),
    "own_data": (None, "folder"),  # the user's image folder: its class directories give the count
}
OWN_DATA_CLASSES = 10  # what the own_data templates are built with here

# paper name -> (short name used in file names, timm name)
TEACHERS = {
    "Swin-T": ("swin_tiny", "swin_tiny_patch4_window7_224"),
    "ViT-S": ("vit_small", "vit_small_patch16_224"),
    "Mixer-B/16": ("mixer_b16", "mixer_b16_224"),
    "ConvNeXt-T": ("convnext_tiny", "convnext_tiny"),
    "DeiT-T": ("deit_tiny", "deit_tiny_patch16_224"),
    "ResNet50": ("resnet50", "resnet50"),
}
STUDENTS = {  # paper name -> (short, timm name, family)
    "ResNet18": ("resnet18", "resnet18", "cnn"),
    "MobileNetV2": ("mobilenetv2", "mobilenetv2_100", "cnn"),
    "DeiT-T": ("deit_tiny", "deit_tiny_patch16_224", "vit_mlp"),
    "Swin-P": ("swin_pico", "swin_pico_patch4_window7_224", "vit_mlp"),
    "Swin-N": ("swin_nano", "swin_nano_patch4_window7_224", "vit_mlp"),
    "ResMLP-S12": ("resmlp_12", "resmlp_12_224", "vit_mlp"),
}

# The benchmark pairs (paper_facts.md 1.1 and 1.2) and, per pair, the extra trainable parameters
# (millions) of OFA and of RSD with gamma = 2, as paper_facts.md section 5 computes them from the
# official code (CIFAR at 100 classes, ImageNet at 1000).
PAIRS = {
    "cifar100": {
        ("Swin-T", "ResNet18"): (1.63, 1.313),
        ("ViT-S", "ResNet18"): (1.19, 0.920),
        ("Mixer-B/16", "ResNet18"): (1.63, 1.313),
        ("Swin-T", "MobileNetV2"): (2.53, 5.248),
        ("ViT-S", "MobileNetV2"): (2.53, 4.265),
        ("Mixer-B/16", "MobileNetV2"): (2.53, 5.248),
        ("ConvNeXt-T", "DeiT-T"): (3.78, 0.369),
        ("Mixer-B/16", "DeiT-T"): (3.78, 0.369),
        ("ConvNeXt-T", "Swin-P"): (14.86, 0.886),
        ("Mixer-B/16", "Swin-P"): (14.86, 0.886),
        ("ConvNeXt-T", "ResMLP-S12"): (14.94, 0.886),
        ("Swin-T", "ResMLP-S12"): (14.94, 0.886),
    },
    "imagenet": {
        ("DeiT-T", "ResNet18"): (3.04, 0.723),
        ("Swin-T", "ResNet18"): (4.39, 1.313),
        ("Mixer-B/16", "ResNet18"): (4.39, 1.313),
        ("DeiT-T", "MobileNetV2"): (7.14, 3.773),
        ("Swin-T", "MobileNetV2"): (7.14, 5.248),
        ("Mixer-B/16", "MobileNetV2"): (7.14, 5.248),
        ("ResNet50", "DeiT-T"): (4.48, 0.861),
        ("ConvNeXt-T", "DeiT-T"): (4.48, 0.369),
        ("Mixer-B/16", "DeiT-T"): (4.48, 0.369),
        ("ResNet50", "Swin-N"): (28.19, 2.623),
        ("ConvNeXt-T", "Swin-N"): (28.19, 1.313),
        ("Mixer-B/16", "Swin-N"): (28.19, 1.313),
        ("ResNet50", "ResMLP-S12"): (16.32, 1.869),
        ("ConvNeXt-T", "ResMLP-S12"): (16.32, 0.886),
        ("Swin-T", "ResMLP-S12"): (16.32, 0.886),
    },
}
DISTILL_METHODS = ("rsd", "kd", "ofa")
CIFAR_TEACHERS = ("Swin-T", "ViT-S", "Mixer-B/16", "ConvNeXt-T")
# GPU count of the reference run: RSD README 2 GPUs (CIFAR); OFA README 8 GPUs; RSD on ImageNet: 8 assumed
GPUS = {
    ("cifar100", "rsd"): 2,
}
DEFAULT_GPUS = 8
TOLERANCE = 0.005  # relative, on the section-5 parameter counts


def pair_file(dataset: str, method: str, teacher: str, student: str) -> Path:
    return CONFIGS / dataset / method / f"{TEACHERS[teacher][0]}-{STUDENTS[student][0]}.yaml"


def paper_pair(path: Path):
    """(dataset, method, teacher, student) when ``path`` is one of the paper-pair recipes, else None."""
    rel = path.relative_to(CONFIGS)
    if len(rel.parts) != 3 or rel.parts[0] not in PAIRS or rel.parts[1] not in DISTILL_METHODS:
        return None
    dataset, method = rel.parts[:2]
    for teacher, student in PAIRS[dataset]:
        if pair_file(dataset, method, teacher, student) == path:
            return dataset, method, teacher, student
    return None


_TEACHERS: dict[tuple, Teacher] = {}


def meta_teacher(cfg, num_classes: int) -> Teacher:
    """The frozen teacher on the meta device, built once per (name, kwargs, classes): it is read-only."""
    key = (cfg.name, repr(sorted(cfg.kwargs.items())), num_classes)
    if key not in _TEACHERS:
        with torch.device("meta"):
            model = create_model(dataclasses.replace(cfg, pretrained=False, checkpoint=None), num_classes)
            _TEACHERS[key] = Teacher(model)
    return _TEACHERS[key]


def timm_arch(name: str) -> str:
    return name.split(".", 1)[0]  # drop a pretrained tag (convnext_tiny.fb_in1k -> convnext_tiny)


# --- the recipe set -----------------------------------------------------------------------


def test_every_benchmark_pair_has_its_recipes():
    missing = [
        str(pair_file(dataset, method, teacher, student).relative_to(CONFIGS))
        for dataset, pairs in PAIRS.items()
        for teacher, student in pairs
        for method in DISTILL_METHODS
        if not pair_file(dataset, method, teacher, student).is_file()
    ]
    for dataset, pairs in PAIRS.items():  # the Scratch column: one vanilla recipe per student
        for student in sorted({s for _, s in pairs}):
            path = CONFIGS / dataset / "vanilla" / f"{STUDENTS[student][0]}.yaml"
            if not path.is_file():
                missing.append(str(path.relative_to(CONFIGS)))
    for teacher in CIFAR_TEACHERS:
        path = CONFIGS / "cifar100" / "teachers" / f"{TEACHERS[teacher][0]}.yaml"
        if not path.is_file():
            missing.append(str(path.relative_to(CONFIGS)))
    assert not missing, f"recipes missing: {missing}"
    assert len(PAIRS["cifar100"]) == 12 and len(PAIRS["imagenet"]) == 15


def test_every_base_file_is_used():
    used = set()
    for path in RECIPES + BASES:
        bases = yaml.safe_load(path.read_text()).get("base") or []
        for base in [bases] if isinstance(bases, str) else bases:
            used.add((path.parent / base).resolve())
    unused = [str(p.relative_to(CONFIGS)) for p in BASES if p.resolve() not in used]
    assert not unused, f"base files no recipe extends: {unused}"


# --- each recipe --------------------------------------------------------------------------


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_recipe_resolves_and_builds(path: Path):
    dataset_dir = path.relative_to(CONFIGS).parts[0]
    assert dataset_dir in DATASETS, f"{path}: recipes live under configs/<dataset>/, one of {sorted(DATASETS)}"
    num_classes, dataset = DATASETS[dataset_dir]

    cfg = load_config(path)
    assert cfg.num_classes == num_classes, "num_classes must be set (dry-run needs it) and match the dataset"
    assert cfg.data.dataset == dataset
    assert cfg.data.img_size == 224, "the paper trains and evaluates at 224 px (CIFAR upsampled)"
    if dataset_dir == "imagenet":
        assert cfg.data.eval_split == "val"
    if num_classes is None:  # a template for the user's data: no paper run to match
        num_classes = OWN_DATA_CLASSES
        assert cfg.train.reference_batch is None

    t = cfg.train
    pair = paper_pair(path)
    if dataset_dir != "own_data":
        assert t.reference_batch is not None, "recipes record the effective batch of the reference run"
        assert t.reference_batch % t.batch_size == 0, "reference batch = per-GPU batch x GPU count"
    if pair is not None or path.parent.name == "vanilla":
        method = pair[1] if pair else "vanilla"
        assert t.reference_batch == t.batch_size * GPUS.get((dataset_dir, method), DEFAULT_GPUS)

    # build exactly as `crossdistill train --dry-run` does, without weights, on the meta device
    method_cls = METHODS.get(cfg.method)
    args = method_config(cfg.method, cfg.method_args, teacher=cfg.teacher)
    if getattr(args, "img_size", "absent") is None:
        args = dataclasses.replace(args, img_size=cfg.data.img_size)
    unloaded = lambda m: dataclasses.replace(m, pretrained=False, checkpoint=None)  # noqa: E731
    teacher = meta_teacher(cfg.teacher, num_classes) if method_cls.needs_teacher else None
    with torch.device("meta"):
        student = create_model(unloaded(cfg.student), num_classes, cfg.data.img_size)
        distiller = build_distiller(cfg.method, student, teacher, args, criterion=make_criterion(cfg))
    assert student.get_classifier().out_features == num_classes
    if teacher is not None:
        assert teacher.model.get_classifier().out_features == num_classes
    extra = distiller.extra_parameter_count()

    if cfg.method in ("vanilla", "kd"):
        assert extra == 0
    if pair is None:
        return
    dataset_dir, method, teacher_name, student_name = pair
    assert cfg.method == method
    assert timm_arch(cfg.student.name) == STUDENTS[student_name][1]
    assert timm_arch(cfg.teacher.name) == TEACHERS[teacher_name][1]
    assert not cfg.student.pretrained and cfg.student.checkpoint is None, "students train from scratch"
    family = STUDENTS[student_name][2]
    assert cfg.optim.opt == {"cnn": "sgd", "vit_mlp": "adamw"}[family], "student family and base recipe disagree"
    if dataset_dir == "cifar100":
        assert cfg.teacher.checkpoint == f"pretrained/{TEACHERS[teacher_name][1]}_cifar100.pth"
    else:
        assert cfg.teacher.pretrained or cfg.teacher.checkpoint
    if student_name == "ResNet18":  # timm 0.6.5's eval transform for resnet18 (timm 1.x: 0.95 / bicubic)
        assert (cfg.data.crop_pct, cfg.data.interpolation) == (0.875, "bilinear")
    if method in ("ofa", "rsd"):
        paper_ofa, paper_rsd = PAIRS[dataset_dir][(teacher_name, student_name)]
        expected = (paper_ofa if method == "ofa" else paper_rsd) * 1e6
        if method == "rsd":
            assert args.gamma == 2, "section 5's RSD counts are for gamma = 2"
        assert abs(extra - expected) <= TOLERANCE * expected, (
            f"{method} extra parameters {extra / 1e6:.4f}M, paper_facts.md section 5: {expected / 1e6}M"
        )


@functools.lru_cache(maxsize=None)
def drop_path_rate(arch: str, **kwargs) -> float:
    """The largest stochastic-depth rate of the model timm builds (it puts Identity where the rate is 0)."""
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=10, **kwargs)
    return max((m.drop_prob for m in model.modules() if isinstance(m, DropPath)), default=0.0)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(CONFIGS)) for p in RECIPES])
def test_students_get_the_drop_path_of_the_reference_runs(path: Path):
    # The official imagenet/vit_mlp.yaml sets drop_path: 0, which train.py passes as drop_path_rate to every student
    # (Swin-N's timm default is 0.1); every other reference config sets none, so the model keeps its default.
    # A recipe whose student has a non-zero default states the rate, so a timm upgrade cannot change it silently.
    cfg = load_config(path)
    families = {arch: family for _, arch, family in STUDENTS.values()}
    imagenet = path.relative_to(CONFIGS).parts[0] == "imagenet"
    reference_zero = imagenet and families.get(timm_arch(cfg.student.name)) == "vit_mlp"
    default = drop_path_rate(timm_arch(cfg.student.name))
    built = drop_path_rate(timm_arch(cfg.student.name), **cfg.student.kwargs)
    assert built == pytest.approx(0.0 if reference_zero else default)
    if default > 0:
        assert "drop_path_rate" in cfg.student.kwargs, f"{cfg.student.name}: timm's default drop-path rate is {default}"


@pytest.mark.parametrize(
    "path",
    sorted((CONFIGS / "cifar100" / "teachers").glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_teacher_recipes_fine_tune_imagenet_weights(path: Path):
    cfg = load_config(path)
    assert cfg.method == "vanilla" and cfg.teacher is None
    assert cfg.student.pretrained and cfg.student.checkpoint is None
    assert timm_arch(cfg.student.name) in {TEACHERS[t][1] for t in CIFAR_TEACHERS}
    assert cfg.train.run_name == f"teacher-{timm_arch(cfg.student.name)}"
    assert cfg.num_classes == 100 and cfg.data.img_size == 224
