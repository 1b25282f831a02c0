"""What the accuracy study is: its data, methods, models, pairs, optimisation recipes and protocols, and the
measured speeds its time estimates come from. Tables only; ``study_plan`` turns them into runs.

Method hyper-parameters are not repeated here: every run uses the method's own defaults (its typed config in
``crossdistill.distillers``), except the overrides stated below (``OFA_CNN_STUDENT``, the RSD grid of each
protocol).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"
RESULTS_ARCHIVE = HERE / "results"  # <protocol>/: copies of the finished run directories behind docs/RESULTS*.md
CIFAR10_MEAN = (0.4913, 0.4821, 0.4465)  # of the JPEG copy's training set (shared/data/README.md)
CIFAR10_STD = (0.2452, 0.2428, 0.2606)

STUDY_METHODS = ("vanilla", "kd", "dkd", "dist", "fitnet", "ofa", "crd", "rkd", "cc", "at", "rsd")
METHOD_LABELS = {
    "vanilla": "Scratch",
    "kd": "KD",
    "dkd": "DKD",
    "dist": "DIST",
    "fitnet": "FitNet",
    "ofa": "OFA",
    "crd": "CRD",
    "rkd": "RKD",
    "cc": "CC",
    "at": "AT",
    "rsd": "RSD",
    "sd_kd": "SD-KD",
    "sd_dkd": "SD-DKD",
}

# Method hyper-parameters: each method's own defaults, read from its typed config (crossdistill.distillers, e.g.
# KDConfig), which are the official cross-architecture code's defaults (OFA / RSD train.py flags, as the recipes in
# configs/cifar100/_base/ use them); the same in every pair, nothing is tuned here. Each run's YAML records the
# arguments named below at those defaults, so that a run directory says what it was trained with.
RECORDED_ARGS: dict[str, tuple[str, ...]] = {
    "vanilla": (),
    "kd": ("temperature", "weight", "ce_weight"),
    "dkd": ("alpha", "beta", "temperature", "weight", "ce_weight"),
    "dist": ("beta", "gamma", "tau", "weight", "ce_weight"),
    "fitnet": ("weight", "stages"),  # img_size: the engine fills in data.img_size
    "ofa": ("eps", "temperature", "w_gt", "w_kd", "w_ofa"),
    "crd": ("feat_dim", "num_negatives", "momentum", "temperature", "weight", "w_gt"),
    "rkd": ("distance_weight", "angle_weight", "weight", "w_gt"),
    "cc": ("scale", "feat_dim", "weight", "w_gt"),
    "at": ("weight", "p", "stages", "w_gt"),
    "rsd": ("weight", "kappa", "gamma"),
}
# Overrides of those defaults (the RSD grid of each protocol is the other one):
OFA_CNN_STUDENT = {"w_ofa": 0.1}  # the OFA maintainers' CIFAR ResNet-18 run (configs/cifar100/ofa/*-resnet18.yaml)
# CRD's official CIFAR-100 run draws 16,384 negatives for each sample out of 50,000 training images; a protocol
# training on fewer images keeps that share of the training set (rounded to a power of two): 2,048 of the cpu
# protocol's 4,992 images, where 16,384 would draw each image of other classes about 3.6 times per sample: a
# contrast unlike the official one's, where each is drawn about 0.3 times.
CRD_NEGATIVES_SHARE = 16384 / 50_000


def crd_negatives(train_images: int) -> int:
    """CRD's ``num_negatives`` for a run on ``train_images`` images: the official share, at most its default."""
    default = method_defaults("crd")["num_negatives"]
    return min(default, 2 ** round(math.log2(max(1.0, CRD_NEGATIVES_SHARE * train_images))))


def method_defaults(method: str) -> dict[str, Any]:
    """The arguments of ``RECORDED_ARGS[method]`` at the method's own defaults."""
    from crossdistill.distillers import method_config

    if not RECORDED_ARGS.get(method):
        return {}
    defaults = method_config(method)
    return {key: copy.deepcopy(getattr(defaults, key)) for key in RECORDED_ARGS[method]}


def rsd_default() -> tuple[float, float]:
    """(lambda = method_args.weight, kappa) at RSD's defaults: the released ones."""
    args = method_defaults("rsd")
    return args["weight"], args["kappa"]


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str  # cnn | vit | mlp (optimiser: SGD for cnn, AdamW for the token models)
    name: str
    kwargs: dict[str, Any]


MODELS: dict[str, ModelSpec] = {
    m.key: m
    for m in (
        ModelSpec(
            "resnet_t",
            "ResNet-18 (widths 32-256)",
            "cnn",
            "resnet18",
            {"channels": [32, 64, 128, 256], "stem_width": 32},
        ),
        ModelSpec(
            "vit_t",
            "ViT (patch 4, 128-d, 4 blocks)",
            "vit",
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4},
        ),
        ModelSpec(
            "resnet_s",
            "ResNet-18 (widths 16-128)",
            "cnn",
            "resnet18",
            {"channels": [16, 32, 64, 128], "stem_width": 16},
        ),
        ModelSpec(
            "vit_s",
            "ViT (patch 4, 64-d, 4 blocks)",
            "vit",
            "vit_tiny_patch16_224",
            {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2},
        ),
        ModelSpec(
            "resmlp_s",
            "ResMLP (patch 4, 64-d, 4 blocks)",
            "mlp",
            "resmlp_cifar",
            {"img_size": 32, "patch_size": 4, "embed_dim": 64, "num_blocks": 4},
        ),
    )
}

# The architecture of a kept teacher (study_teachers.py) where it is not the one the study trains itself in minutes
# (run_study.py --train-teachers): timm's resnet18 downsamples 4x in its stem and leaves 1x1 maps at 32 px, which
# capped 40 epochs on all of CIFAR-10 at 79.9 %; without the stem's max-pool (study_models.resnet18_cifar, same
# parameters) a kept ResNet teacher learns from 4x the resolution at every stage.
KEPT_MODELS: dict[str, ModelSpec] = {
    "resnet_t": ModelSpec(
        "resnet_t",
        "ResNet-18 (widths 32-256, stem stride 2)",
        "cnn",
        "resnet18_cifar",
        dict(MODELS["resnet_t"].kwargs),
    ),
}


def teacher_model(key: str, kept: bool) -> ModelSpec:
    """The model of the teacher ``key``: the kept teacher's architecture, or the one the study trains."""
    return KEPT_MODELS.get(key, MODELS[key]) if kept else MODELS[key]


# pair name -> (teacher model, student model)
PAIRS: dict[str, tuple[str, str]] = {
    "resnet-vit": ("resnet_t", "vit_s"),  # CNN -> token model
    "vit-resnet": ("vit_t", "resnet_s"),  # token model -> CNN
    "resnet-resmlp": ("resnet_t", "resmlp_s"),  # CNN -> MLP
}
PAIR_LABELS = {"resnet-vit": "ResNet → ViT", "vit-resnet": "ViT → ResNet", "resnet-resmlp": "ResNet → ResMLP"}

# Optimisation per student family: the paper's two recipes (configs/cifar100/_base/cnn.yaml, vit_mlp.yaml)
# shortened for schedules of a few epochs: 1 warm-up epoch, no mixup/cutmix/RandAugment/random erasing
# (regularisers for 300 epochs that a short schedule cannot afford; mixup would also disable the teacher
# cache), AdamW at 1e-3 (paper 5e-4 at 300 epochs) for the token models.
OPTIM = {
    "cnn": {
        "opt": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 2.0e-3,
        "sched": "cosine",
        "min_lr": 1.0e-4,
        "warmup_epochs": 1,
        "warmup_lr": 1.0e-3,
    },
    "vit": {
        "opt": "adamw",
        "lr": 1.0e-3,
        "weight_decay": 0.05,
        "sched": "cosine",
        "min_lr": 1.0e-5,
        "warmup_epochs": 1,
        "warmup_lr": 1.0e-5,
        "clip_grad": 5.0,
    },
}
OPTIM["mlp"] = OPTIM["vit"]

# ------------------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    train_subset: int | None  # students' training images (class-balanced, fixed); None = all
    teacher_train_subset: int | None
    eval_subset: int | None  # test images evaluated after every epoch (class-balanced, fixed); None = all
    epochs: int  # students
    teacher_epochs: int
    batch_size: int
    seeds: tuple[int, ...]
    pairs: tuple[str, ...]
    methods: tuple[str, ...]
    grid_weights: tuple[float, ...]  # lambda
    grid_kappas: tuple[float, ...]
    sens_pair: str
    sens_seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    num_workers: int = 0
    teacher_num_workers: int | None = None  # data-loading workers of the teacher runs (default: num_workers)
    jobs: int = 1  # runs at a time (worker processes)
    threads: int | None = None  # torch threads per run (None: torch's default)
    teacher_cache: bool = True  # cache teacher outputs between runs (train.teacher_cache) where supported
    device_augment: bool = False  # data.device_augment: crop/flip/normalise on the GPU, workers ship uint8
    scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop scale at 32 px
    budget_min: float | None = None  # the protocol's time limit (the plan is checked against it)
    docs_suffix: str = ""  # RESULTS{suffix}.md, results{suffix}_accuracy.png, ...
    results: bool = True  # False: a smoke test, never presented as results
    speed: str = "cpu"  # which calibration table estimates its time
    kept_teachers: bool = True  # start from the kept teachers (study_teachers.py) where there are any


# How the cpu protocol was sized: with the speeds of SPEEDS["cpu"] (images/s of every student/teacher/method
# combination, measured), the plan's simulated wall time (two lanes, teachers first, cache groups) for a few
# candidate sizes, in minutes including the 20% margin: 5,000 images x 6 epochs (teachers 12) with 2,000 eval
# images: 63; teachers 15 epochs, 5,000 eval images: 74 (chosen: the larger evaluation subset halves the
# sampling noise of each accuracy, 0.7 instead of 1.1 points at 50%); 6,000 x 6: 83; 5,000 x 8: 95 (over);
# 8,000 x 5: 88; the full test set each epoch: 88. Without the teacher cache the chosen plan takes 77.
PROTOCOLS: dict[str, Protocol] = {
    "cpu": Protocol(
        name="cpu",
        summary="2 CPU cores, at most 90 minutes for everything",
        train_subset=5000,
        teacher_train_subset=5000,
        eval_subset=5000,
        epochs=6,
        teacher_epochs=15,
        batch_size=128,
        seeds=(0, 1, 2),
        pairs=("resnet-vit", "vit-resnet", "resnet-resmlp"),
        methods=STUDY_METHODS,
        grid_weights=(0.02, 0.1, 0.5),
        grid_kappas=(0.002, 0.01, 0.05),
        sens_pair="resnet-resmlp",
        jobs=2,
        threads=1,
        budget_min=90.0,
    ),
    "gpu": Protocol(
        name="gpu",
        summary="one GPU (H100), under 9 minutes, several runs at a time",
        train_subset=None,
        teacher_train_subset=None,
        eval_subset=None,
        epochs=3,
        teacher_epochs=10,
        batch_size=256,
        seeds=(0, 1, 2),
        pairs=("resnet-vit", "vit-resnet", "resnet-resmlp"),
        methods=STUDY_METHODS,
        grid_weights=(0.02, 0.1, 0.5),
        grid_kappas=(0.002, 0.01, 0.05),
        sens_pair="resnet-resmlp",
        device="cuda",
        amp="bf16",
        num_workers=1,
        teacher_num_workers=6,
        jobs=12,
        threads=1,
        teacher_cache=False,
        device_augment=True,
        budget_min=9.0,
        docs_suffix="_gpu",
        speed="gpu",
    ),
    "tiny": Protocol(
        name="tiny",
        summary="smoke test: a few hundred images, one epoch, one seed, one pair, three methods",
        train_subset=320,
        teacher_train_subset=320,
        eval_subset=200,
        epochs=1,
        teacher_epochs=1,
        batch_size=64,
        seeds=(0,),
        pairs=("resnet-resmlp",),
        methods=("vanilla", "kd", "rsd"),
        grid_weights=(0.1, 0.5),
        grid_kappas=(0.01, 0.05),
        sens_pair="resnet-resmlp",
        jobs=2,
        threads=1,
        budget_min=None,
        docs_suffix="_tiny",
        results=False,
        kept_teachers=False,  # trains its own one-epoch teacher on the test's own tiny data
    ),
}

GPU_NOTE = (
    "The gpu protocol's estimate comes from one run on an H100 (3.9 min, 2026-11-26; SPEEDS['gpu']); another GPU "
    "or host CPU will differ. Run `--dry-list` and a first chunk (`--only teachers`) to check it."
)

# ----------------------------------------------------------------------------------------- calibration
# Training speed in images/s of one run (student forward + backward + optimiser step, the teacher's forward for
# the distillation methods, data loading: everything the engine does per step) and evaluation speed (the
# student's forward on the test subset plus the per-epoch checkpoint writes), measured with
# `run_study.py --protocol cpu --calibrate` (2 epochs of 1,024 images per combination, the second timed, teacher
# not cached, 1 torch thread); keys (student, teacher or "-", method).
#
# CPU, measured 2026-11-26 on this project's machine: AMD EPYC (KVM), 2 vCPUs with AVX-512, torch 2.14.1 on CPU,
# timm 1.0.31. The machine was shared with other developers' test runs all session (1-minute load average 4 to 11
# on 2 cores); the table is the one calibration run made in a quiet window (load 1.1 when it started, my run
# alone, rising to 2.5 at its end), where wall-clock and CPU-time speeds agreed within 1-4%. Three earlier runs at
# load 4-8 gave the same speeds within ~10% when computed from CPU time (images / CPU seconds of the process:
# with one torch thread nothing spins waiting for a descheduled thread), while their wall-clock speeds were 1.1x
# to 4x lower and erratic. One torch thread per run, two runs at a time (jobs=2, one per core): the engine's
# per-step serial work (data loading in the main process, Python) does not use a second thread, while two
# runs use both cores for all of it; and 2-thread runs collapse on a shared machine (OpenMP barriers wait for
# descheduled threads: a 2-thread ViT run took 5x its 1-thread time at load 7). Two runs at a time were not
# measured on a free machine (none was free for long enough); the estimates first divided the speeds by a margin
# of 0.8 (a free machine assumed 20% slower than measured, for the two runs sharing caches and memory bandwidth).
# The whole 7-method study then took 59.2 min (2026-11-26, load 1.0 to 3.1) where it was planned at 73.6: the
# speeds held for two runs at a time, and MARGIN is 1.0 since.
# Teacher forward speeds are derived: 1/forward = 1/train(student with teacher, kd) - 1/train(student alone).
# CRD, RKD, CC and AT (added 2026-12-02) are ratios to KD of the same pair measured in one calibration run
# (`--calibrate --only method=kd --only method=crd ... --only seed=0 --only part=cells`, CPU-time speeds, load 2.5
# from other jobs): each is SPEEDS[kd of the pair] x (its speed / KD's speed in that run), CRD with the whole-bank
# scoring. Ratios: crd 0.90 / 0.90 / 1.01, rkd 0.76 / 0.77 / 0.78, cc 0.68 / 0.90 / 0.93, at 0.79 / 0.72 / 0.96
# (ResNet -> ViT / ViT -> ResNet / ResNet -> ResMLP).
MARGIN = 1.0
SPEEDS: dict[str, dict[str, Any]] = {
    "cpu": {
        "train": {
            "resnet_t|-|vanilla": 930.9,
            "vit_t|-|vanilla": 170.7,
            "vit_s|-|vanilla": 457.1,
            "vit_s|resnet_t|kd": 435.7,
            "vit_s|resnet_t|dkd": 423.1,
            "vit_s|resnet_t|dist": 419.7,
            "vit_s|resnet_t|fitnet": 359.3,
            "vit_s|resnet_t|ofa": 163.3,
            "vit_s|resnet_t|rsd": 414.6,
            "resnet_s|-|vanilla": 1625.4,
            "resnet_s|vit_t|kd": 408.0,
            "resnet_s|vit_t|dkd": 424.9,
            "resnet_s|vit_t|dist": 371.0,
            "resnet_s|vit_t|fitnet": 330.3,
            "resnet_s|vit_t|ofa": 408.0,
            "resnet_s|vit_t|rsd": 421.4,
            "resmlp_s|-|vanilla": 701.4,
            "resmlp_s|resnet_t|kd": 605.9,
            "resmlp_s|resnet_t|dkd": 578.5,
            "resmlp_s|resnet_t|dist": 616.9,
            "resmlp_s|resnet_t|fitnet": 480.8,
            "resmlp_s|resnet_t|ofa": 199.6,
            "resmlp_s|resnet_t|rsd": 591.9,
            "vit_s|resnet_t|crd": 391.7,
            "vit_s|resnet_t|rkd": 329.0,
            "vit_s|resnet_t|cc": 294.1,
            "vit_s|resnet_t|at": 342.4,
            "resnet_s|vit_t|crd": 366.4,
            "resnet_s|vit_t|rkd": 312.1,
            "resnet_s|vit_t|cc": 366.8,
            "resnet_s|vit_t|at": 292.5,
            "resmlp_s|resnet_t|crd": 612.0,
            "resmlp_s|resnet_t|rkd": 469.6,
            "resmlp_s|resnet_t|cc": 563.5,
            "resmlp_s|resnet_t|at": 581.1,
        },
        "forward": {"resnet_t": 4400.0, "vit_t": 545.0},
        # a kept teacher's forward takes this many times the study's own one (KEPT_MODELS): resnet18_cifar's
        # inference on 128 images at 32 px, 1 thread, CPU time, 2.92-3.02x resnet18's (measured 2026-12-03)
        "kept_forward_factor": {"resnet_t": 3.0},
        "eval": {"resnet_t": 2380.0, "vit_t": 508.0, "vit_s": 1220.0, "resnet_s": 3570.0, "resmlp_s": 1540.0},
        "run_overhead_s": 5.0,  # measured 0.1-1.3 s (model build, data subset); 5 s allows for the data read
        "default_train": 250.0,
        "default_eval": 1000.0,
        "margin": MARGIN,
    },
    "gpu": {
        # Measured 2026-11-26 on one H100 (16 cores; benchmarks/accuracy/results/gpu/study_log.jsonl): 12 runs at a
        # time, each with one loader worker and data.device_augment (crop/flip/normalise on the GPU). A student run
        # (3 epochs of 49,920 images, 3 evaluations of 10,000) took 28 s (KD, DIST, FitNet, RSD, scratch), 40 s
        # (OFA) or 48 s (DKD); a teacher run (10 epochs) 35-45 s; the whole study 3.9 min. Speeds below are
        # those times, less the fixed cost, per training image; 12 processes share the GPU and the cores.
        "train": {"resnet_t|-|vanilla": 13000.0, "vit_t|-|vanilla": 12000.0, "ofa": 4200.0, "dkd": 3400.0},
        "forward": {},
        "eval": {},
        "run_overhead_s": 6.0,  # CUDA context, model build, data subset
        "default_train": 7000.0,
        "teacher_factor": 1.0,  # measured: distillation runs took as long as scratch runs (except OFA, DKD)
        "default_eval": 7000.0,
        "margin": 1.0,
    },
}
SPEEDS["tiny"] = SPEEDS["cpu"]
