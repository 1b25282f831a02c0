#!/usr/bin/env python
"""Cross-architecture accuracy study (issue 7): does RSD beat KD, DKD, DIST, FitNet and OFA on real images?

On CIFAR-10 at native 32 px (the JPEG copy at ``../shared/data/cifar10_jpg.tar.gz``, or any
ImageFolder / CIFAR path with ``--data-root``), the study

1. trains two teachers of different families from scratch: a ResNet-18-style CNN and a ViT;
2. distils three cross-architecture pairs, CNN -> ViT, ViT -> CNN and CNN -> ResMLP (an MLP
   student), with every method of ``vanilla kd dkd dist fitnet ofa rsd`` that this installation
   has (``crossdistill.METHODS``), 3 seeds per cell;
3. runs a lambda x kappa grid for RSD on one pair (one seed);
4. writes ``RESULTS.md`` (tables: mean ± sample std over seeds of last- and best-epoch top-1), a bar
   chart and the sensitivity heat map into ``--docs-dir``.

Every run is an ordinary crossdistill run directory ``<out>/<run name>`` (config.yaml,
summary.json, metrics.csv, checkpoints); the YAML of every planned run is also written to
``<out>/configs/`` so each can be rerun alone with ``crossdistill train --config`` (the ResMLP
runs need ``study_models`` imported: see that module). A run whose summary.json exists is
skipped, an interrupted one is resumed from its checkpoint: the study can be run in chunks
(``--only teachers``, ``--only pair=vit-resnet``, ...) or simply re-invoked.

Protocols (``--protocol``):

* ``cpu``: the whole study (2 teachers, 63 table runs, 8 more grid runs) in at most 90 minutes on 2 CPU
  cores: 5,000 class-balanced training images, 6 epochs per student and 15 per teacher, every epoch
  evaluated on 5,000 class-balanced test images, two runs at a time with one torch thread each;
  planned at 74 minutes on a free machine from the calibration below (which already assumes that
  machine 20% slower than measured).
* ``gpu``: the full 50,000-image training set (3 epochs per student, 10 per teacher: 5x and 7x the
  cpu protocol's training images per run), the full test set, bf16, 12 runs at a time on one GPU;
  3.9 minutes on one H100 (crop, flip and normalisation on the GPU: ``data.device_augment``).
* ``tiny``: a smoke test (a few hundred images, one epoch, one seed, one pair, three methods, a
  2 x 2 grid); what it writes is marked as such and is not a result.

Usage::

    python benchmarks/accuracy/run_study.py --protocol cpu --dry-list   # the plan and its estimated time
    python benchmarks/accuracy/run_study.py --protocol cpu              # everything (resumable)
    python benchmarks/accuracy/run_study.py --protocol cpu --only teachers
    python benchmarks/accuracy/run_study.py --protocol cpu --only pair=vit-resnet
    python benchmarks/accuracy/run_study.py --protocol cpu --report-only  # rewrite docs from finished runs
    python benchmarks/accuracy/run_study.py --protocol cpu --calibrate    # measure this machine's speed
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"
RESULTS_ARCHIVE = HERE / "results"  # <protocol>/: copies of the finished run directories behind docs/RESULTS*.md
CIFAR10_MEAN = (0.4913, 0.4821, 0.4465)  # of the JPEG copy's training set (shared/data/README.md)
CIFAR10_STD = (0.2452, 0.2428, 0.2606)

STUDY_METHODS = ("vanilla", "kd", "dkd", "dist", "fitnet", "ofa", "rsd")
METHOD_LABELS = {"vanilla": "Scratch", "kd": "KD", "dkd": "DKD", "dist": "DIST", "fitnet": "FitNet",
                 "ofa": "OFA", "rsd": "RSD", "sd_kd": "SD-KD", "sd_dkd": "SD-DKD"}

# Method hyper-parameters: the official cross-architecture code's defaults (OFA / RSD train.py flags, as
# the recipes in configs/cifar100/_base/ use them), the same in every pair; nothing is tuned here.
METHOD_ARGS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "kd": {"temperature": 1.0, "weight": 1.0, "ce_weight": 1.0},
    "dkd": {"alpha": 1.0, "beta": 2.0, "temperature": 1.0, "weight": 1.0, "ce_weight": 1.0},
    "dist": {"beta": 1.0, "gamma": 1.0, "tau": 1.0, "weight": 1.0, "ce_weight": 1.0},
    "fitnet": {"weight": 0.1, "stages": [1, 2, 3, 4]},  # img_size: the engine fills in data.img_size
    "ofa": {"eps": 1.0, "temperature": 1.0, "w_gt": 1.0, "w_kd": 1.0, "w_ofa": 1.0},
    "rsd": {"weight": 0.1, "kappa": 0.01, "gamma": 2},
}
OFA_CNN_STUDENT = {"w_ofa": 0.1}  # the OFA maintainers' CIFAR ResNet-18 run (configs/cifar100/ofa/*-resnet18.yaml)
RSD_DEFAULT = (0.1, 0.01)  # (lambda = method_args.weight, kappa): the released RSD defaults

# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str  # cnn | vit | mlp (optimiser: SGD for cnn, AdamW for the token models)
    name: str
    kwargs: dict[str, Any]


MODELS: dict[str, ModelSpec] = {m.key: m for m in (
    ModelSpec("resnet_t", "ResNet-18 (widths 32-256)", "cnn", "resnet18",
              {"channels": [32, 64, 128, 256], "stem_width": 32}),
    ModelSpec("vit_t", "ViT (patch 4, 128-d, 4 blocks)", "vit", "vit_tiny_patch16_224",
              {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4}),
    ModelSpec("resnet_s", "ResNet-18 (widths 16-128)", "cnn", "resnet18",
              {"channels": [16, 32, 64, 128], "stem_width": 16}),
    ModelSpec("vit_s", "ViT (patch 4, 64-d, 4 blocks)", "vit", "vit_tiny_patch16_224",
              {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 2}),
    ModelSpec("resmlp_s", "ResMLP (patch 4, 64-d, 4 blocks)", "mlp", "resmlp_cifar",
              {"img_size": 32, "patch_size": 4, "embed_dim": 64, "num_blocks": 4}),
)}

# pair name -> (teacher model, student model)
PAIRS: dict[str, tuple[str, str]] = {
    "resnet-vit": ("resnet_t", "vit_s"),       # CNN -> token model
    "vit-resnet": ("vit_t", "resnet_s"),       # token model -> CNN
    "resnet-resmlp": ("resnet_t", "resmlp_s"),  # CNN -> MLP
}
PAIR_LABELS = {"resnet-vit": "ResNet → ViT", "vit-resnet": "ViT → ResNet", "resnet-resmlp": "ResNet → ResMLP"}

# Optimisation per student family: the paper's two recipes (configs/cifar100/_base/cnn.yaml, vit_mlp.yaml)
# shortened for schedules of a few epochs: 1 warm-up epoch, no mixup/cutmix/RandAugment/random erasing
# (regularisers for 300 epochs that a short schedule cannot afford; mixup would also disable the teacher
# cache), AdamW at 1e-3 (paper 5e-4 at 300 epochs) for the token models.
OPTIM = {
    "cnn": {"opt": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 2.0e-3, "sched": "cosine",
            "min_lr": 1.0e-4, "warmup_epochs": 1, "warmup_lr": 1.0e-3},
    "vit": {"opt": "adamw", "lr": 1.0e-3, "weight_decay": 0.05, "sched": "cosine", "min_lr": 1.0e-5,
            "warmup_epochs": 1, "warmup_lr": 1.0e-5, "clip_grad": 5.0},
}
OPTIM["mlp"] = OPTIM["vit"]

# ------------------------------------------------------------------------------------------ protocols


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str
    train_subset: int | None       # students' training images (class-balanced, fixed); None = all
    teacher_train_subset: int | None
    eval_subset: int | None        # test images evaluated after every epoch (class-balanced, fixed); None = all
    epochs: int                    # students
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
    jobs: int = 1                  # runs at a time (worker processes)
    threads: int | None = None     # torch threads per run (None: torch's default)
    teacher_cache: bool = True     # cache teacher outputs between runs (train.teacher_cache) where supported
    device_augment: bool = False   # data.device_augment: crop/flip/normalise on the GPU, workers ship uint8
    scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop scale at 32 px
    budget_min: float | None = None  # the protocol's time limit (the plan is checked against it)
    docs_suffix: str = ""          # RESULTS{suffix}.md, results{suffix}_accuracy.png, ...
    results: bool = True           # False: a smoke test, never presented as results
    speed: str = "cpu"             # which calibration table estimates its time


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
        train_subset=5000, teacher_train_subset=5000, eval_subset=5000,
        epochs=6, teacher_epochs=15, batch_size=128,
        seeds=(0, 1, 2), pairs=("resnet-vit", "vit-resnet", "resnet-resmlp"), methods=STUDY_METHODS,
        grid_weights=(0.02, 0.1, 0.5), grid_kappas=(0.002, 0.01, 0.05), sens_pair="resnet-resmlp",
        jobs=2, threads=1, budget_min=90.0,
    ),
    "gpu": Protocol(
        name="gpu",
        summary="one GPU (H100), under 9 minutes, several runs at a time",
        train_subset=None, teacher_train_subset=None, eval_subset=None,
        epochs=3, teacher_epochs=10, batch_size=256,
        seeds=(0, 1, 2), pairs=("resnet-vit", "vit-resnet", "resnet-resmlp"), methods=STUDY_METHODS,
        grid_weights=(0.02, 0.1, 0.5), grid_kappas=(0.002, 0.01, 0.05), sens_pair="resnet-resmlp",
        device="cuda", amp="bf16", num_workers=1, teacher_num_workers=6, jobs=12, threads=1, teacher_cache=False,
        device_augment=True,
        budget_min=9.0,
        docs_suffix="_gpu", speed="gpu",
    ),
    "tiny": Protocol(
        name="tiny",
        summary="smoke test: a few hundred images, one epoch, one seed, one pair, three methods",
        train_subset=320, teacher_train_subset=320, eval_subset=200,
        epochs=1, teacher_epochs=1, batch_size=64,
        seeds=(0,), pairs=("resnet-resmlp",), methods=("vanilla", "kd", "rsd"),
        grid_weights=(0.1, 0.5), grid_kappas=(0.01, 0.05), sens_pair="resnet-resmlp",
        jobs=2, threads=1, budget_min=None, docs_suffix="_tiny", results=False,
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
# measured on a free machine (none was free for long enough); the estimates divide the speeds by MARGIN (0.8: a
# free machine assumed 20% slower than measured, for the two runs sharing caches and memory bandwidth).
# Teacher forward speeds are derived: 1/forward = 1/train(student with teacher, kd) - 1/train(student alone).
MARGIN = 0.8
SPEEDS: dict[str, dict[str, Any]] = {
    "cpu": {
        "train": {
            "resnet_t|-|vanilla": 930.9, "vit_t|-|vanilla": 170.7,
            "vit_s|-|vanilla": 457.1, "vit_s|resnet_t|kd": 435.7, "vit_s|resnet_t|dkd": 423.1,
            "vit_s|resnet_t|dist": 419.7, "vit_s|resnet_t|fitnet": 359.3, "vit_s|resnet_t|ofa": 163.3,
            "vit_s|resnet_t|rsd": 414.6,
            "resnet_s|-|vanilla": 1625.4, "resnet_s|vit_t|kd": 408.0, "resnet_s|vit_t|dkd": 424.9,
            "resnet_s|vit_t|dist": 371.0, "resnet_s|vit_t|fitnet": 330.3, "resnet_s|vit_t|ofa": 408.0,
            "resnet_s|vit_t|rsd": 421.4,
            "resmlp_s|-|vanilla": 701.4, "resmlp_s|resnet_t|kd": 605.9, "resmlp_s|resnet_t|dkd": 578.5,
            "resmlp_s|resnet_t|dist": 616.9, "resmlp_s|resnet_t|fitnet": 480.8, "resmlp_s|resnet_t|ofa": 199.6,
            "resmlp_s|resnet_t|rsd": 591.9,
        },
        "forward": {"resnet_t": 4400.0, "vit_t": 545.0},
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

# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Run:
    name: str
    part: str                   # teachers | cells | sensitivity
    method: str
    seed: int
    student: str                # MODELS key
    teacher: str | None         # MODELS key
    pairs: tuple[str, ...]      # pairs this run belongs to (a scratch run: every pair with its student)
    config: dict[str, Any]
    needs: tuple[str, ...] = ()  # run names that must have finished first
    grid: tuple[float, float] | None = None  # (lambda, kappa) of an RSD run
    est_s: float = 0.0

    @property
    def run_dir(self) -> Path:
        return Path(self.config["train"]["output_dir"]) / self.name


@dataclass
class Settings:
    protocol: Protocol
    out: Path
    data_root: str
    dataset: str
    cache_dir: str | None
    teacher_cache: bool
    device: str
    methods: tuple[str, ...]
    jobs: int
    threads: int | None = None
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE on every run (not the protocol: marked in the report)


def available_methods(wanted: Sequence[str]) -> tuple[str, ...]:
    from crossdistill import METHODS

    names = set(METHODS.names())
    return tuple(m for m in wanted if m in names)


def detect_dataset(root: str) -> str:
    path = Path(root)
    if path.is_file() or path.suffix in (".gz", ".tgz", ".tar", ".zip"):
        return "folder"
    if (path / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (path / "cifar-100-python").is_dir():
        return "cifar100"
    return "folder"


def teacher_run_name(key: str) -> str:
    return f"teacher-{key}"


def scratch_run_name(student: str, seed: int) -> str:
    return f"scratch-{student}-s{seed}"


def cell_run_name(pair: str, method: str, seed: int) -> str:
    return scratch_run_name(PAIRS[pair][1], seed) if method == "vanilla" else f"{pair}-{method}-s{seed}"


def grid_run_name(pair: str, weight: float, kappa: float, seed: int) -> str:
    if (weight, kappa) == RSD_DEFAULT:
        return cell_run_name(pair, "rsd", seed)
    return f"sens-{pair}-w{weight:g}-k{kappa:g}-s{seed}"


def run_config(s: Settings, name: str, student: str, teacher: str | None, method: str,
               method_args: dict[str, Any], seed: int) -> dict[str, Any]:
    p = s.protocol
    spec = MODELS[student]
    is_teacher_run = name.startswith("teacher-")
    mean_std = {} if s.dataset == "cifar100" else {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    data = {
        "dataset": s.dataset, "root": s.data_root, "img_size": 32,
        "train_subset": p.teacher_train_subset if is_teacher_run else p.train_subset,
        "eval_subset": p.eval_subset,
        "scale": list(p.scale), "hflip": 0.5, "train_interpolation": "bilinear",
        "interpolation": "bilinear", "crop_pct": 1.0, **mean_std,
        "num_workers": p.teacher_num_workers if is_teacher_run and p.teacher_num_workers is not None
        else p.num_workers,
    }
    if p.device_augment:
        data["device_augment"] = True
    if s.cache_dir:
        data["cache_dir"] = s.cache_dir
    train = {
        "epochs": p.teacher_epochs if is_teacher_run else p.epochs,
        "batch_size": p.batch_size, "seed": seed, "device": s.device, "amp": p.amp,
        "label_smoothing": 0.1, "output_dir": str(s.out), "run_name": name,
        "tensorboard": False, "progress": False, "eval_every": 1,
    }
    # channels_last: 1.5-2.5x faster ResNet training under oneDNN on 2 CPU cores (calibration below), and the
    # layout GPUs prefer for convolutions; set whenever a CNN is involved (student or teacher).
    cnn_teacher = teacher is not None and method != "vanilla" and MODELS[teacher].family == "cnn"
    if spec.family == "cnn" or cnn_teacher:
        train["channels_last"] = True
    if s.teacher_cache and teacher is not None and method != "vanilla":
        train["teacher_cache"] = str(s.out / "teacher_cache")
    cfg: dict[str, Any] = {
        "student": {"name": spec.name, "kwargs": copy.deepcopy(spec.kwargs)},
        "teacher": None,
        "method": method,
        "method_args": copy.deepcopy(method_args),
        "data": data,
        "optim": copy.deepcopy(OPTIM[spec.family]),
        "train": train,
    }
    if train["epochs"] < 3:  # a smoke-test schedule: no warm-up epoch (it would be the whole run)
        cfg["optim"]["warmup_epochs"] = 0
    if teacher is not None and method != "vanilla":
        t = MODELS[teacher]
        cfg["teacher"] = {"name": t.name, "kwargs": copy.deepcopy(t.kwargs),
                          "checkpoint": str(s.out / teacher_run_name(teacher) / "last.pt")}
    return cfg


def method_args_for(method: str, student: str) -> dict[str, Any]:
    args = copy.deepcopy(METHOD_ARGS.get(method, {}))
    if method == "ofa" and MODELS[student].family == "cnn":
        args.update(OFA_CNN_STUDENT)
    return args


def build_plan(s: Settings) -> list[Run]:
    p = s.protocol
    runs: dict[str, Run] = {}
    teachers = []
    for pair in p.pairs:
        t = PAIRS[pair][0]
        if t not in teachers:
            teachers.append(t)
    for t in teachers:
        name = teacher_run_name(t)
        runs[name] = Run(name, "teachers", "vanilla", 0, t, None,
                         tuple(pp for pp in p.pairs if PAIRS[pp][0] == t),
                         run_config(s, name, t, None, "vanilla", {}, 0))
    for pair in p.pairs:
        teacher, student = PAIRS[pair]
        for seed in p.seeds:
            for method in s.methods:
                name = cell_run_name(pair, method, seed)
                if name in runs:
                    runs[name].pairs += (pair,)
                    continue
                args = method_args_for(method, student)
                t = None if method == "vanilla" else teacher
                runs[name] = Run(name, "cells", method, seed, student, t, (pair,),
                                 run_config(s, name, student, t, method, args, seed),
                                 needs=(teacher_run_name(teacher),) if t else (),
                                 grid=RSD_DEFAULT if method == "rsd" else None)
    if "rsd" in s.methods and p.grid_weights and p.grid_kappas:
        teacher, student = PAIRS[p.sens_pair]
        for weight in p.grid_weights:
            for kappa in p.grid_kappas:
                name = grid_run_name(p.sens_pair, weight, kappa, p.sens_seed)
                if name in runs:
                    continue
                args = dict(method_args_for("rsd", student), weight=weight, kappa=kappa)
                runs[name] = Run(name, "sensitivity", "rsd", p.sens_seed, student, teacher, (p.sens_pair,),
                                 run_config(s, name, student, teacher, "rsd", args, p.sens_seed),
                                 needs=(teacher_run_name(teacher),), grid=(weight, kappa))
    plan = list(runs.values())
    if s.overrides:
        from crossdistill.config import apply_overrides

        for run in plan:
            run.config = apply_overrides(run.config, s.overrides)
    estimate_plan(s, plan)
    return plan


def grid_runs(plan: Sequence[Run], protocol: Protocol) -> dict[tuple[float, float], Run]:
    """The runs of the sensitivity grid, by (lambda, kappa) (the default cell's run included)."""
    out = {}
    for run in plan:
        if (run.method == "rsd" and run.grid is not None and protocol.sens_pair in run.pairs
                and run.seed == protocol.sens_seed):
            out[run.grid] = run
    return {k: v for k, v in out.items() if k[0] in protocol.grid_weights and k[1] in protocol.grid_kappas}


# ------------------------------------------------------------------------------------------ estimates


def _train_images(run: Run) -> int:
    n = run.config["data"]["train_subset"]
    if n is None:
        n = 50_000
    bs = run.config["train"]["batch_size"]
    return (n // bs) * bs  # drop_last


def _eval_images(run: Run) -> int:
    n = run.config["data"]["eval_subset"]
    return 10_000 if n is None else n


def speed_key(run: Run) -> str:
    return f"{run.student}|{run.teacher or '-'}|{run.method}"


CACHED_OUTPUT = {"kd": "logits", "dkd": "logits", "dist": "logits", "ofa": "logits", "rsd": "embedding"}
"""What the teacher cache stores for each method (FitNet reads teacher stage features: never cached)."""


def estimate_seconds(s: Settings, run: Run, teacher_cached: bool = False) -> float:
    """Seconds of one run on the protocol's reference machine: a fixed cost, then per epoch the training
    images at the measured speed of this (student, teacher, method) (the teacher's forward included,
    less it when the run reads the teacher's outputs from the cache) and the evaluation images."""
    table = SPEEDS[s.protocol.speed]
    train_ips = table["train"].get(speed_key(run), table["train"].get(run.method) if run.teacher else None)
    if train_ips is None:  # unmeasured combination: the student alone, slowed by a teacher forward
        alone = table["train"].get(f"{run.student}|-|vanilla", table["default_train"])
        train_ips = alone * (table.get("teacher_factor", 0.6) if run.teacher else 1.0)
    per_image = 1.0 / train_ips
    if teacher_cached and run.teacher in table["forward"]:
        per_image = max(0.5 * per_image, per_image - 1.0 / table["forward"][run.teacher])
    per_image /= table.get("margin", 1.0)
    eval_ips = table["eval"].get(run.student, table["default_eval"]) * table.get("margin", 1.0)
    epochs = run.config["train"]["epochs"]
    per_epoch = _train_images(run) * per_image + _eval_images(run) / eval_ips
    return table["run_overhead_s"] + epochs * per_epoch


def estimate_plan(s: Settings, plan: Sequence[Run]) -> None:
    """Set ``est_s`` of every run, in plan order: with the teacher cache on, the first run of a (teacher,
    seed, output) computes the teacher's outputs and the later ones read them."""
    filled: set[tuple] = set()
    for run in plan:
        cached = False
        output = CACHED_OUTPUT.get(run.method)
        if s.teacher_cache and run.teacher is not None and output is not None:
            key = (run.teacher, run.seed, output, run.config["train"]["epochs"], run.config["data"]["train_subset"])
            cached = key in filled
            filled.add(key)
        run.est_s = estimate_seconds(s, run, cached)


# ------------------------------------------------------------------------------------------ selection


def parse_only(items: Sequence[str]) -> dict[str, set[str]]:
    """``--only`` filters: parts (teachers, cells, sensitivity) and key=value (pair, method, seed, run)."""
    filters: dict[str, set[str]] = {}
    for item in items:
        for token in filter(None, (t.strip() for t in item.split(","))):
            if "=" in token:
                key, value = token.split("=", 1)
                key = key.strip()
                if key not in ("pair", "method", "seed", "run", "part"):
                    raise SystemExit(f"--only {token!r}: keys are pair, method, seed, run, part")
                filters.setdefault(key, set()).add(value.strip())
            elif token in ("teachers", "cells", "sensitivity", "table"):
                filters.setdefault("part", set()).add("cells" if token == "table" else token)
            else:
                raise SystemExit(f"--only {token!r}: use teachers, cells, sensitivity or pair=/method=/seed=/run=")
    return filters


def select(plan: Sequence[Run], filters: dict[str, set[str]]) -> list[Run]:
    def keep(run: Run) -> bool:
        if "part" in filters and run.part not in filters["part"]:
            return False
        if "pair" in filters and not (set(run.pairs) & filters["pair"]):
            return False
        if "method" in filters and run.method not in filters["method"]:
            return False
        if "seed" in filters and str(run.seed) not in filters["seed"]:
            return False
        if "run" in filters and run.name not in filters["run"]:
            return False
        return True

    chosen = [r for r in plan if keep(r)]
    names = {r.name for r in chosen}
    by_name = {r.name: r for r in plan}
    extra = [by_name[n] for r in chosen for n in r.needs if n not in names and not is_done(by_name[n])]
    for run in extra:  # teachers the selection needs and that are not trained yet
        if run.name not in names:
            names.add(run.name)
    return [r for r in plan if r.name in names]


# ------------------------------------------------------------------------------------------ execution


def is_done(run: Run) -> bool:
    return (run.run_dir / "summary.json").is_file()


_COMPARED = ("student", "teacher.name", "teacher.kwargs", "method", "method_args", "optim", "train.epochs",
             "train.batch_size", "train.seed", "train.amp", "data.dataset", "data.train_subset",
             "data.eval_subset", "data.img_size", "data.scale", "data.hflip", "data.mean", "data.std")


def _defining(config: dict[str, Any]) -> dict[str, Any]:
    from crossdistill.report import flatten

    flat = flatten(config)
    return {k: v for k, v in flat.items() if any(k == c or k.startswith(c + ".") for c in _COMPARED)}


def check_existing(run: Run) -> None:
    """An existing run directory must hold this run (same defining settings), not one of another protocol."""
    import yaml

    from crossdistill.config import build_config
    from crossdistill.report import normalised_config

    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = _defining(normalised_config(yaml.safe_load(path.read_text()) or {}))
    planned = _defining(build_config(copy.deepcopy(run.config)).to_dict())
    diff = sorted(k for k in set(saved) | set(planned) if saved.get(k) != planned.get(k))
    if diff:
        details = "; ".join(f"{k}: run has {saved.get(k)!r}, plan has {planned.get(k)!r}" for k in diff[:4])
        raise SystemExit(
            f"{run.run_dir} holds a run with other settings ({details}). It belongs to another protocol or "
            "version of the study: use another --out, or delete that run directory to retrain it."
        )


def write_run_yaml(run: Run, out: Path) -> Path:
    import yaml

    path = out / "configs" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# accuracy study run {run.name} ({run.part}); generated by benchmarks/accuracy/run_study.py.\n"
              "# Rerun alone: crossdistill train --config THIS_FILE (ResMLP students: import study_models first)\n")
    path.write_text(header + yaml.safe_dump(run.config, sort_keys=False))
    return path


def train_one(config_path: str | Path, log_path: str | Path) -> dict[str, Any]:
    """Train (or resume, or finish) one run; its output goes to ``log_path``. Returns the summary dict."""
    import study_models  # noqa: F401  (registers resmlp_cifar)

    from crossdistill.config import load_config
    from crossdistill.engine.trainer import CHECKPOINT, STEP_DIR, run_dir_of, train

    cfg = load_config(config_path)
    run_dir = run_dir_of(cfg)
    resume = (run_dir / CHECKPOINT).exists() or any((run_dir / STEP_DIR).glob("step-*.pt"))
    overwrite = run_dir.exists() and not resume
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} "
                  f"{'resume' if resume else 'start'} {run_dir}\n")
        log.flush()
        summary = train(cfg, resume=resume, overwrite=overwrite, out=log)
    return dataclasses.asdict(summary)


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def append_log(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study_log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(out: Path) -> list[dict[str, Any]]:
    path = out / "study_log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def fmt_min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def describe_run(run: Run) -> str:
    if run.part == "teachers":
        return f"teacher {run.student}"
    where = "/".join(run.pairs) if run.method == "vanilla" else run.pairs[0]
    grid = f" lambda={run.grid[0]:g} kappa={run.grid[1]:g}" if run.part == "sensitivity" and run.grid else ""
    return f"{where} {run.method}{grid} seed {run.seed}"


def execute(s: Settings, todo: list[Run], invocation: str) -> None:
    """Train the runs of ``todo`` (teachers first), printing one line per finished run and an ETA."""
    from crossdistill.engine.preemption import Preempted

    done_names: set[str] = set()
    failed: list[str] = []
    est_total = sum(r.est_s for r in todo)
    spent_est, spent_real = 0.0, 0.0
    started = time.time()
    print(f"{len(todo)} runs to train, estimated {fmt_min(est_total)} "
          f"({s.jobs} at a time); logs in {s.out / 'logs'}", flush=True)

    def finish(run: Run, seconds: float, summary: dict[str, Any] | None, error: str | None, load0, load1) -> None:
        nonlocal spent_est, spent_real
        done_names.add(run.name)
        spent_est += run.est_s
        spent_real += seconds
        append_log(s.out, {"event": "run", "invocation": invocation, "run": run.name, "seconds": round(seconds, 2),
                           "est_s": round(run.est_s, 1), "load_before": load0, "load_after": load1,
                           "ok": error is None, "time": datetime.datetime.now().isoformat(timespec="seconds")})
        remaining = sum(r.est_s for r in todo if r.name not in done_names)
        ratio = spent_real / spent_est if spent_est > 0 else 1.0
        eta = remaining * ratio / max(1, s.jobs)
        n = len(done_names)
        if error is None:
            top = f"top-1 last {summary['last_top1']:.2f} best {summary['best_top1']:.2f}"
        else:
            failed.append(run.name)
            top = f"FAILED: {error}"
        print(f"[{n}/{len(todo)}] {describe_run(run):42s} {top} | {fmt_min(seconds)} "
              f"(est {fmt_min(run.est_s)}) | elapsed {fmt_min(time.time() - started)} | ETA {fmt_min(eta)}",
              flush=True)

    def ready(run: Run) -> bool:
        return all(is_done_name(s, n) for n in run.needs)

    prepare_data(s)
    pending = list(todo)
    if s.jobs <= 1:
        for run in pending:
            if not ready(run):
                finish(run, 0.0, None, f"needs {', '.join(run.needs)}, which did not finish", loadavg(), loadavg())
                continue
            path = write_run_yaml(run, s.out)
            load0, t0 = loadavg(), time.time()
            try:
                summary = train_one(path, s.out / "logs" / f"{run.name}.log")
                error = None
            except (KeyboardInterrupt, Preempted):  # Ctrl-C, or SIGTERM/SIGUSR1 (the run saved a checkpoint)
                print(f"\nstopped during {run.name}; rerun the same command to resume it", flush=True)
                raise
            except Exception as err:  # one failed run must not stop the study
                summary, error = None, f"{type(err).__name__}: {err}"
            finish(run, time.time() - t0, summary, error, load0, loadavg())
    else:
        run_parallel(s, pending, ready, finish, failed)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; see {s.out / 'logs'}", flush=True)


def prepare_data(s: Settings) -> None:
    """Decode an image archive into its cache once, before runs (or parallel workers) read it."""
    root = Path(s.data_root)
    if s.dataset == "folder" and root.is_file():
        from crossdistill.data.archive import open_archive

        t0 = time.time()
        open_archive(root, s.cache_dir)
        if time.time() - t0 > 2:
            print(f"decoded {root.name} into the cache in {time.time() - t0:.0f} s", flush=True)


def is_done_name(s: Settings, name: str) -> bool:
    return (s.out / name / "summary.json").is_file()


def cache_group(s: Settings, run: Run) -> tuple | None:
    """Runs that share teacher-cache files (same teacher and seed) never run at the same time."""
    if s.teacher_cache and run.teacher is not None and run.method in CACHED_OUTPUT:
        return (run.teacher, run.seed)
    return None


class LaneWorker:
    """A long-lived worker process (``run_study.py --lane-worker``) that trains the runs it is sent one after
    another in-process (no interpreter start per run, kernels stay warm). One JSON line in, one out."""

    def __init__(self, threads: int | None):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--lane-worker"]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def run(self, config_path: Path, log_path: Path) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"config": str(config_path), "log": str(log_path)}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker process exited (code {self.proc.poll()}); see {log_path}")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(message["error"])
        return message["summary"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM: a run in progress saves a checkpoint and stops (it is resumed next time)."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def lane_worker_main(threads: int | None) -> int:
    """The worker side of :class:`LaneWorker`: stray prints go to stderr, protocol lines to the real stdout."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the scheduler decides
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if threads:
        import torch

        torch.set_num_threads(threads)
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            summary = train_one(job["config"], job["log"])
            summary.pop("history", None)
            proto.write(json.dumps({"summary": summary}) + "\n")
        except Exception as err:  # reported to the scheduler, which goes on with other runs
            proto.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
            if type(err).__name__ == "Preempted":
                return 75
    return 0


def run_parallel(s: Settings, pending: list[Run], ready, finish, failed: list[str]) -> None:
    """Up to ``s.jobs`` runs at a time on long-lived worker processes, each with ``s.threads`` torch threads;
    a run starts once its teacher has finished, and never beside a run that shares its teacher cache."""
    workers = [LaneWorker(s.threads) for _ in range(s.jobs)]
    idle = list(workers)
    running: dict[Any, tuple[Run, LaneWorker, float, float | None]] = {}
    pool = ThreadPoolExecutor(max_workers=s.jobs)
    try:
        while pending or running:
            for run in [r for r in pending if any(n in failed for n in r.needs)]:
                pending.remove(run)
                finish(run, 0.0, None, f"needs {', '.join(run.needs)}, which failed", loadavg(), loadavg())
            groups = {cache_group(s, r) for r, *_ in running.values()} - {None}
            for run in list(pending):
                if not idle:
                    break
                group = cache_group(s, run)
                if not ready(run) or (group is not None and group in groups):
                    continue
                pending.remove(run)
                worker = idle.pop()
                path = write_run_yaml(run, s.out)
                future = pool.submit(worker.run, path, s.out / "logs" / f"{run.name}.log")
                running[future] = (run, worker, time.time(), loadavg())
                if group is not None:
                    groups.add(group)
            if not running:
                for run in list(pending):  # nothing can start: their needs will never finish
                    pending.remove(run)
                    finish(run, 0.0, None, f"needs {', '.join(run.needs)}", loadavg(), loadavg())
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                run, worker, t0, load0 = running.pop(future)
                try:
                    summary, error = future.result(), None
                except Exception as err:
                    summary, error = None, str(err)
                if not worker.alive():
                    workers.remove(worker)
                    worker = LaneWorker(s.threads)
                    workers.append(worker)
                idle.append(worker)
                finish(run, time.time() - t0, summary, error, load0, loadavg())
    except BaseException:  # Ctrl-C / SIGINT: the workers' runs save a checkpoint and stop
        print("\nstopping: the runs in progress save a checkpoint; rerun the same command to resume them", flush=True)
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.close()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    for worker in workers:
        worker.close()
    pool.shutdown(wait=True)


def _plan_makespan(s: Settings, plan: Sequence[Run]) -> float:
    """Estimated wall time of the whole plan from scratch (finished runs counted too)."""
    return simulate_makespan(s, plan, count_done=True)


def simulate_makespan(s: Settings, plan: Sequence[Run], count_done: bool = False) -> float:
    """Estimated wall time of ``plan`` with the scheduler's rules (jobs, teacher dependencies, cache groups)."""
    done_at: dict[str, float] = {} if count_done else {r.name: 0.0 for r in plan if is_done(r)}
    names = {r.name for r in plan}
    pending = [r for r in plan if r.name not in done_at]
    for run in pending:  # needs outside the plan (already trained): available at once
        for need in run.needs:
            if need not in names:
                done_at.setdefault(need, 0.0)
    lanes = [0.0] * max(1, s.jobs)
    busy: list[tuple[float, tuple | None]] = []  # (end time, group) of scheduled runs
    while pending:
        lane = min(range(len(lanes)), key=lanes.__getitem__)
        now = lanes[lane]
        choice = None
        for run in pending:
            need_time = max((done_at.get(n, math.inf) for n in run.needs), default=0.0)
            group = cache_group(s, run)
            clash = max((end for end, g in busy if g is not None and g == group and end > now), default=0.0)
            start = max(now, need_time, clash)
            if math.isfinite(start) and (choice is None or start < choice[1]):
                choice = (run, start)
                if start == now:
                    break
        if choice is None:
            break
        run, start = choice
        end = start + run.est_s
        pending.remove(run)
        done_at[run.name] = end
        busy.append((end, cache_group(s, run)))
        lanes[lane] = end
    return max(lanes)


# ------------------------------------------------------------------------------------------ machine


def machine_info(device: str) -> dict[str, Any]:
    import timm
    import torch

    import crossdistill

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "crossdistill": crossdistill.__version__,
            "python": platform.python_version(), "os": platform.platform(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------ report


def read_summary(run: Run) -> dict[str, Any] | None:
    path = run.run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def param_count(spec: ModelSpec) -> int:
    import study_models  # noqa: F401
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(spec.name, num_classes=10, **spec.kwargs)
    return sum(p.numel() for p in model.parameters())


def cell_stats(plan: Sequence[Run], pair: str, method: str, seeds: Sequence[int], key: str):
    from crossdistill.report import mean_std

    names = [cell_run_name(pair, method, seed) for seed in seeds]
    by_name = {r.name: r for r in plan}
    values = []
    for name in names:
        summary = read_summary(by_name[name]) if name in by_name else None
        if summary is not None:
            values.append(summary.get(key))
    return mean_std(values)


def _pm(stats, digits: int = 2) -> str:
    from crossdistill.report import format_mean_std

    mean, std, n = stats
    text = format_mean_std(mean, std, digits)
    return text if n == 0 or n >= 3 else f"{text} (n={n})"


def plot_accuracy(path: Path, protocol: Protocol, methods: Sequence[str], plan: Sequence[Run],
                  teacher_acc: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = list(protocol.pairs)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7.5, 2.6 * len(pairs) + 2.5), 4.8), constrained_layout=True)
    colors = plt.get_cmap("tab10")
    lows = []
    for j, method in enumerate(methods):
        means, stds = [], []
        for pair in pairs:
            mean, std, n = cell_stats(plan, pair, method, protocol.seeds, "last_top1")
            means.append(mean if n else np.nan)
            stds.append(std if std is not None else 0.0)
            if n:
                lows.append(mean - (std or 0.0))
        x = np.arange(len(pairs)) + (j - (len(methods) - 1) / 2) * width
        edge = "black" if method == "rsd" else "none"
        ax.bar(x, means, width * 0.92, yerr=stds, capsize=2.5, label=METHOD_LABELS.get(method, method),
               color=colors(j % 10), edgecolor=edge, linewidth=1.2 if method == "rsd" else 0)
    for i, pair in enumerate(pairs):
        acc = teacher_acc.get(PAIRS[pair][0])
        if acc is not None and math.isfinite(acc):
            ax.hlines(acc, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1.2,
                      label="teacher" if i == 0 else None)
            lows.append(acc)
    ax.set_xticks(np.arange(len(pairs)))
    ax.set_xticklabels([f"{PAIR_LABELS.get(p, p)}\nteacher: {MODELS[PAIRS[p][0]].label}\n"
                        f"student: {MODELS[PAIRS[p][1]].label}" for p in pairs], fontsize=8)
    n_seeds = len(protocol.seeds)
    ax.set_ylabel(f"top-1 (%), last epoch, mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}")
    title = f"CIFAR-10 at 32 px, {protocol.name} protocol: top-1 of each student by distillation method"
    if not protocol.results:
        title = "SMOKE TEST (tiny protocol), NOT RESULTS\n" + title
    ax.set_title(title, fontsize=10)
    finite = [v for v in lows if math.isfinite(v)]
    if finite:
        ax.set_ylim(max(0.0, math.floor(min(finite) / 5.0) * 5.0 - 5.0), None)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, title="method", title_fontsize=9)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sensitivity(path: Path, protocol: Protocol, grid: dict[tuple[float, float], Run],
                     reference: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    weights, kappas = list(protocol.grid_weights), list(protocol.grid_kappas)
    values = np.full((len(weights), len(kappas)), np.nan)
    for i, w in enumerate(weights):
        for j, k in enumerate(kappas):
            run = grid.get((w, k))
            summary = read_summary(run) if run is not None else None
            if summary is not None:
                values[i, j] = summary["last_top1"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), constrained_layout=True)
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                      aspect="auto")
    for i in range(len(weights)):
        for j in range(len(kappas)):
            v = values[i, j]
            text = "not run" if not np.isfinite(v) else f"{v:.2f}"
            dark = np.isfinite(v) and (v - vmin) / (vmax - vmin) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=10, color="black" if dark else "white"
                    if np.isfinite(v) else "gray")
            if (weights[i], kappas[j]) == RSD_DEFAULT:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(kappas)))
    ax.set_xticklabels([f"{k:g}" for k in kappas])
    ax.set_yticks(range(len(weights)))
    ax.set_yticklabels([f"{w:g}" for w in weights])
    ax.set_xlabel("kappa (weight of the off-diagonal, decorrelation terms)")
    ax.set_ylabel("lambda (weight of the RSD loss)")
    pair = protocol.sens_pair
    title = (f"RSD sensitivity, {PAIR_LABELS.get(pair, pair)} (seed {protocol.sens_seed}), last-epoch top-1 (%)\n"
             "red box: released defaults (lambda 0.1, kappa 0.01)")
    refs = ", ".join(f"{k} {v:.2f}" for k, v in reference.items() if v is not None and math.isfinite(v))
    if refs:
        title += f"; same seed: {refs}"
    if not protocol.results:
        title = "SMOKE TEST (tiny protocol), not results\n" + title
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="top-1 (%)")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def study_command(protocol: Protocol, s: Settings, extra: str = "") -> str:
    parts = ["python benchmarks/accuracy/run_study.py", f"--protocol {protocol.name}"]
    default_out = REPO / "runs" / f"accuracy-{protocol.name}"
    if s.out.resolve() != default_out.resolve():
        parts.append(f"--out {shlex.quote(_rel(s.out))}")
    if Path(s.data_root).resolve() != DEFAULT_DATA.resolve():
        parts.append(f"--data-root {shlex.quote(_rel(Path(s.data_root)))}")
    parts += [f"--set {shlex.quote(o)}" for o in s.overrides]
    return " ".join(parts) + (f" {extra}" if extra else "")


def _rel(path: Path) -> str:
    """A path relative to the repository when it is inside it or beside it (../shared), else absolute."""
    path = Path(path).resolve()
    for base in (REPO, REPO.parent):
        if path == base or base in path.parents:
            return os.path.relpath(path, REPO)
    return str(path)


def write_report(s: Settings, plan: Sequence[Run], docs_dir: Path) -> Path:
    from crossdistill.report import format_seconds, mean_std, method_args_of

    p = s.protocol
    docs_dir.mkdir(parents=True, exist_ok=True)
    md_path = docs_dir / f"RESULTS{p.docs_suffix.upper()}.md"
    bar_path = docs_dir / f"results{p.docs_suffix}_accuracy.png"
    heat_path = docs_dir / f"results{p.docs_suffix}_sensitivity.png"
    methods = [m for m in s.methods]
    by_name = {r.name: r for r in plan}
    summaries = {r.name: read_summary(r) for r in plan}
    n_done = sum(v is not None for v in summaries.values())

    teacher_acc: dict[str, float] = {}
    teacher_rows = []
    for run in plan:
        if run.part != "teachers":
            continue
        summary = summaries[run.name]
        spec = MODELS[run.student]
        if summary is not None:
            teacher_acc[run.student] = summary["last_top1"]
        teacher_rows.append(
            f"| {spec.label} (`{spec.name}`) | {param_count(spec) / 1e6:.2f}M | {run.config['train']['epochs']} | "
            + (f"{summary['last_top1']:.2f} | {summary['best_top1']:.2f} (epoch {summary['best_epoch']}) | "
               f"{format_seconds(summary['wall_time_s'])} |" if summary else "not run | - | - |")
        )
    plot_accuracy(bar_path, p, methods, plan, teacher_acc)
    grid = grid_runs(plan, p)
    ref = {}
    if p.sens_pair in p.pairs:
        for method in ("vanilla", "kd"):
            if method in methods:
                run = by_name.get(cell_run_name(p.sens_pair, method, p.sens_seed))
                summary = read_summary(run) if run else None
                ref[METHOD_LABELS[method]] = summary["last_top1"] if summary else None
    plot_sensitivity(heat_path, p, grid, ref)

    log = read_log(s.out)
    run_records = [r for r in log if r.get("event") == "run" and r.get("ok")]
    invocations = [r for r in log if r.get("event") == "invocation"]
    latest_seconds: dict[str, float] = {}
    for record in run_records:
        latest_seconds[record["run"]] = record["seconds"]
    wall_runs = sum(latest_seconds.get(n, (summaries[n] or {}).get("wall_time_s", 0.0))
                    for n in summaries if summaries[n] is not None)
    loads = [x for r in run_records for x in (r.get("load_before"), r.get("load_after")) if x is not None]
    machine = next((r["machine"] for r in reversed(invocations) if r.get("machine")), None)
    if machine is None:  # no invocation recorded (runs copied from elsewhere): describe this machine
        machine = dict(machine_info(s.device), jobs=s.jobs)
        if s.threads:
            machine["torch_threads"] = s.threads

    L: list[str] = []
    title = "Cross-architecture accuracy study"
    if p.name != "cpu":
        title += f" ({p.name} protocol)"
    L.append(f"# {title}\n")
    if not p.results:
        L.append("> **SMOKE TEST OUTPUT, NOT RESULTS.** This file was written by the `tiny` protocol (a few hundred "
                 "images, one epoch, one seed), which only checks that the study's runner works end to end. Its "
                 "numbers mean nothing about the methods.\n")
    if s.overrides:
        L.append(f"> **Not the {p.name} protocol:** every run was changed with `--set {' '.join(s.overrides)}`; the "
                 "setup below describes the protocol, not these runs.\n")
    total = len(plan)
    if n_done < total:
        missing = [r.name for r in plan if summaries[r.name] is None]
        L.append(f"> **Incomplete: {n_done} of {total} runs finished.** Missing: {', '.join(missing[:12])}"
                 + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
                 + ". Cells with fewer than 3 seeds show n; re-run the command below to finish them.\n")
    L.append(f"Generated {datetime.date.today().isoformat()} by `benchmarks/accuracy/run_study.py` from the run "
             f"directories in `{_rel(s.out)}/` (each holds config.yaml, summary.json and metrics.csv).\n")

    L.append("## Setup\n")
    subset = "all 50,000" if p.train_subset is None else f"{p.train_subset:,} (class-balanced, fixed)"
    tsubset = "all 50,000" if p.teacher_train_subset is None else f"{p.teacher_train_subset:,} (the same subset)" \
        if p.teacher_train_subset == p.train_subset else f"{p.teacher_train_subset:,}"
    esubset = "all 10,000 test images" if p.eval_subset is None else \
        f"a fixed class-balanced subset of {p.eval_subset:,} test images"
    L.append(f"- Data: CIFAR-10 ({_rel(Path(s.data_root))}, dataset `{s.dataset}`) at its native 32 px. Students "
             f"train on {subset} training images, teachers on {tsubset}; every epoch is evaluated on {esubset}.")
    L.append(f"- Augmentation: RandomResizedCrop(32, scale {tuple(p.scale)}) + horizontal flip; evaluation on the "
             "unchanged 32 px image; CIFAR-10 mean/std; label smoothing 0.1; no mixup, cutmix, RandAugment or "
             "random erasing.")
    L.append(f"- Schedule: students {p.epochs} epochs, teachers {p.teacher_epochs} epochs, batch {p.batch_size}, "
             "cosine learning rate with 1 warm-up epoch. CNN students: SGD (momentum 0.9) lr 0.05, weight decay "
             "2e-3 (the paper's CNN recipe); ViT and ResMLP: AdamW lr 1e-3, weight decay 0.05, gradient clipping 5.")
    L.append(f"- Seeds {', '.join(map(str, p.seeds))} for every cell (a seed sets the initialisation, the data "
             "order and the augmentation); teachers: one run each (seed 0), from scratch, no pre-training; "
             "students use the teacher's last-epoch weights.")
    L.append(f"- Device `{s.device}`, precision `{p.amp}`, {s.jobs} run(s) at a time"
             + (f" with {s.threads} torch thread(s) each." if s.threads else ".")
             + (" Teacher outputs cached between runs with the same teacher and seed (`train.teacher_cache`, "
                "fp16)." if s.teacher_cache else ""))
    L.append("")
    L.append("| role | model | timm name and kwargs | parameters |")
    L.append("|---|---|---|---|")
    roles = {}
    for pair in p.pairs:
        t, st = PAIRS[pair]
        roles.setdefault(t, "teacher")
        roles.setdefault(st, "student")
    for key, role in roles.items():
        spec = MODELS[key]
        kw = ", ".join(f"{k}={v}" for k, v in spec.kwargs.items())
        L.append(f"| {role} | {spec.label} | `{spec.name}` ({kw}) | {param_count(spec) / 1e6:.2f}M |")
    L.append("")
    L.append("Method hyper-parameters (the official cross-architecture code's defaults, the same in every pair; "
             "nothing was tuned):\n")
    L.append("| method | arguments |")
    L.append("|---|---|")
    for method in methods:
        student = PAIRS[p.pairs[0]][1]
        args = method_args_of({"method": method, "method_args": method_args_for(method, student)})
        text = ", ".join(f"{k}={v}" for k, v in args.items()) or "-"
        if method == "ofa":
            text += f" (w_ofa={OFA_CNN_STUDENT['w_ofa']} for the CNN student)"
        L.append(f"| {METHOD_LABELS.get(method, method)} (`{method}`) | {text} |")
    L.append("")

    L.append("## Teachers\n")
    L.append("| teacher | parameters | epochs | last top-1 | best top-1 | wall time |")
    L.append("|---|---|---|---|---|---|")
    L.extend(teacher_rows)
    L.append("")

    for key, label in (("last_top1", "last-epoch"), ("best_top1", "best-epoch")):
        L.append(f"## Top-1 (%), {label}: mean ± std over seeds\n")
        header = ["pair (teacher → student)", "teacher"] + [METHOD_LABELS.get(m, m) for m in methods]
        L.append("| " + " | ".join(header) + " |")
        L.append("|" + "|".join("---" for _ in header) + "|")
        for pair in p.pairs:
            t = PAIRS[pair][0]
            stats = {m: cell_stats(plan, pair, m, p.seeds, key) for m in methods}
            finite = {m: v[0] for m, v in stats.items() if v[2] and math.isfinite(v[0])}
            best = max(finite, key=finite.get) if finite else None
            cells = []
            for m in methods:
                text = _pm(stats[m])
                cells.append(f"**{text}**" if m == best else text)
            tacc = teacher_acc.get(t)
            L.append(f"| {PAIR_LABELS.get(pair, pair)} | {tacc:.2f} | " if tacc is not None else
                     f"| {PAIR_LABELS.get(pair, pair)} | - | ")
            L[-1] += " | ".join(cells) + " |"
        L.append("")
        if key == "last_top1":
            L.append(f"Bold: the highest mean in the row. Sample standard deviation (n - 1) over seeds "
                     f"{', '.join(map(str, p.seeds))}. Bar chart of the last-epoch table (dashed line: the "
                     "teacher):\n")
            L.append(f"![top-1 by pair and method]({bar_path.name})\n")
        else:
            L.append("Best epoch: the highest of the per-epoch evaluations on the same test images (as the "
                     "paper reports), an optimistic number; the last-epoch table is the primary one.\n")

    L.append("## RSD sensitivity: lambda x kappa\n")
    if grid:
        L.append(f"Pair {PAIR_LABELS.get(p.sens_pair, p.sens_pair)}, seed {p.sens_seed}, last-epoch top-1 (%); "
                 "rows lambda (`method_args.weight`), columns kappa (`method_args.kappa`); the released default "
                 "is (0.1, 0.01).\n")
        L.append("| lambda \\ kappa | " + " | ".join(f"{k:g}" for k in p.grid_kappas) + " |")
        L.append("|---|" + "|".join("---" for _ in p.grid_kappas) + "|")
        for w in p.grid_weights:
            row = []
            for k in p.grid_kappas:
                run = grid.get((w, k))
                summary = read_summary(run) if run else None
                row.append(f"{summary['last_top1']:.2f}" if summary else "not run")
            L.append(f"| {w:g} | " + " | ".join(row) + " |")
        L.append("")
        if ref:
            L.append("Same pair and seed without RSD: " + ", ".join(
                f"{k} {v:.2f}" if v is not None else f"{k} not run" for k, v in ref.items()) + ".\n")
        L.append(f"![RSD lambda x kappa heat map]({heat_path.name})\n")
    else:
        L.append("No grid (RSD is not among the methods of this installation).\n")

    L.append("## What the numbers say\n")
    L.extend(findings(p, plan, methods, teacher_acc))
    L.append("")
    L.append("## How this differs from the paper's setting\n")
    L.append(
        "- **Teachers.** The paper distils ImageNet-pretrained teachers fine-tuned on CIFAR-100 (ViT-S 92.4%, "
        "Swin-T, ConvNeXt-T, Mixer-B/16). Ours are small models trained here from scratch on the same "
        "training images as the students, for a few epochs: weak teachers, and a token-model teacher trained "
        "from scratch on little data is weaker than a CNN (no locality prior).")
    L.append(
        "- **Resolution.** The paper upsamples CIFAR to 224 px (RandomResizedCrop); we train at the native "
        "32 px, so the ViT and ResMLP see 8 x 8 tokens of 4 px and the ResNet's last stage is 1 x 1.")
    L.append(
        f"- **Schedule and data.** The paper trains 300 epochs on all 50,000 CIFAR-100 images with mixup, cutmix "
        f"and RandAugment for the token students; here {p.epochs} epochs on {subset.split(' (')[0]} CIFAR-10 "
        "images without them. Method hyper-parameters are the paper's defaults, not re-tuned for this regime.")
    L.append(
        "- **Dataset.** CIFAR-10 (10 classes) instead of CIFAR-100 / ImageNet-1k: logit-based methods have "
        "less dark knowledge to transfer with 10 classes.")
    L.append("")

    L.append("## Reproduce\n")
    L.append("```bash")
    L.append(study_command(p, s, "--dry-list") + "   # the plan, estimated time, what is already done")
    L.append(study_command(p, s) + "              # everything; resumable, finished runs are skipped")
    L.append("# or in chunks (any order; teachers are trained first when a chunk needs them):")
    L.append(study_command(p, s, "--only teachers"))
    for pair in p.pairs:
        L.append(study_command(p, s, f"--only pair={pair}"))
    L.append(study_command(p, s, "--only sensitivity"))
    L.append(study_command(p, s, "--report-only") + "   # rewrite this page from the finished runs")
    L.append("```\n")
    L.append("Each run's resolved YAML is in `configs/` of the output folder (`crossdistill train --config` "
             "reruns one alone; the ResMLP student is registered by `benchmarks/accuracy/study_models.py`). "
             "Runs are deterministic for a given seed, machine and torch build, on CPU and on CUDA. Checked: a second "
             "invocation of the gpu protocol into a fresh output folder on the same H100 gave the same training "
             "losses and accuracies in all 73 runs; on the CPU, two cells rerun into a fresh folder (a cold teacher "
             "cache) matched every logged loss and accuracy. Another machine or torch build can differ in the last "
             "digits, within the reported std.\n")
    archive = RESULTS_ARCHIVE / p.name
    if (archive / "study_log.jsonl").exists():
        L.append(f"The run directories behind this page (config.yaml, metrics.csv, summary.json; no checkpoints) "
                 f"and the runner's log are kept in `{_rel(archive)}/`: "
                 f"`{study_command(p, s, '--report-only').replace('--report-only', f'--out {_rel(archive)} --report-only')}` "
                 "rewrites this page from them.")
    L.append("")

    L.append("## Machine and time\n")
    L.append(f"- CPU: {machine.get('cpu')}, {machine.get('cores')} cores visible; {machine.get('jobs', s.jobs)} run(s) at "
             f"a time with {machine.get('torch_threads')} torch thread(s) each"
             + (f"; GPU: {machine['gpu']}" if machine.get("gpu") else ""))
    L.append(f"- torch {machine.get('torch')}, timm {machine.get('timm')}, crossdistill {machine.get('crossdistill')}, "
             f"Python {machine.get('python')}")
    ends = [r for r in log if r.get("event") == "invocation_end"]
    wall_clock = sum(r.get("seconds", 0.0) for r in ends)
    L.append(f"- Wall-clock time of the study: {fmt_min(wall_clock)} over {len(ends)} invocation(s) of the runner "
             f"(each run's own time, summed over the {n_done} finished runs: {fmt_min(wall_runs)}; several runs "
             "go at a time)"
             + (f"; 1-minute load average during the runs {min(loads):.1f} to {max(loads):.1f} "
                f"({machine.get('cores')} cores, {machine.get('jobs', s.jobs)} run(s) at a time; a load well above "
                "what the runs themselves make means other work shared the machine and the times are inflated)"
                if loads else "") + ".")
    L.append(f"- Planned time of the whole study on a free machine: {fmt_min(_plan_makespan(s, plan))}"
             + (f" (limit of the {p.name} protocol: {p.budget_min:g} min)." if p.budget_min else "."))
    L.append("")
    md_path.write_text("\n".join(L) + "\n")
    return md_path


def findings(p: Protocol, plan: Sequence[Run], methods: Sequence[str], teacher_acc: dict[str, float]) -> list[str]:
    lines: list[str] = []
    if not p.results:
        lines.append("Nothing: this is a smoke test.")
        return lines
    first_counts: dict[str, int] = {}
    complete = True
    for pair in p.pairs:
        stats = {m: cell_stats(plan, pair, m, p.seeds, "last_top1") for m in methods}
        have = {m: v for m, v in stats.items() if v[2] and math.isfinite(v[0])}
        if len(have) < len(methods) or any(v[2] < len(p.seeds) for v in have.values()):
            complete = False
        if not have:
            lines.append(f"- **{PAIR_LABELS.get(pair, pair)}**: no finished runs yet.")
            continue
        order = sorted(have, key=lambda m: have[m][0], reverse=True)
        first = order[0]
        first_counts[first] = first_counts.get(first, 0) + 1
        text = (f"- **{PAIR_LABELS.get(pair, pair)}**: first {METHOD_LABELS.get(first, first)} "
                f"({_pm(have[first])}); order " + " > ".join(METHOD_LABELS.get(m, m) for m in order) + ".")
        if "rsd" in have:
            rsd = have["rsd"]
            others = [m for m in order if m not in ("rsd", "vanilla")]
            if others:
                best_other = others[0]
                bo = have[best_other]
                delta = rsd[0] - bo[0]
                spread = math.sqrt((rsd[1] or 0.0) ** 2 + (bo[1] or 0.0) ** 2)
                verdict = ("within the seed-to-seed spread" if abs(delta) <= spread else
                           "beyond the seed-to-seed spread")
                text += (f" RSD ranks {order.index('rsd') + 1} of {len(order)}: {rsd[0]:.2f} vs "
                         f"{METHOD_LABELS.get(best_other, best_other)} {bo[0]:.2f}, "
                         f"{'+' if delta >= 0 else ''}{delta:.2f} points ({verdict}, "
                         f"sqrt(std² + std²) = {spread:.2f}).")
            if "vanilla" in have:
                gain = rsd[0] - have["vanilla"][0]
                text += f" RSD vs scratch: {'+' if gain >= 0 else ''}{gain:.2f} points."
        lines.append(text)
    if first_counts:
        summary = ", ".join(f"{METHOD_LABELS.get(m, m)} in {n}" for m, n in
                            sorted(first_counts.items(), key=lambda kv: -kv[1]))
        lines.append(f"- First place by pair: {summary} of {len(p.pairs)} pair(s)."
                     + ("" if complete else " (The table is incomplete: these rankings are provisional.)"))
        rsd_first = first_counts.get("rsd", 0)
        if rsd_first < len(p.pairs):
            lines.append(f"- **RSD does not come first in {len(p.pairs) - rsd_first} of {len(p.pairs)} pairs at this "
                         "scale.** The protocol was fixed before the runs and has not been tuned afterwards; the "
                         "section below lists what differs from the paper's setting.")
        else:
            lines.append("- RSD comes first in every pair at this scale.")
    # teacher vs scratch students
    for pair in p.pairs:
        t, st = PAIRS[pair]
        tacc = teacher_acc.get(t)
        scratch = cell_stats(plan, pair, "vanilla", p.seeds, "last_top1") if "vanilla" in methods else (math.nan, None, 0)
        if tacc is None or not scratch[2]:
            continue
        if tacc > scratch[0]:
            lines.append(f"- Teacher check, {PAIR_LABELS.get(pair, pair)}: the teacher ({tacc:.2f}) is more accurate "
                         f"than the scratch student ({scratch[0]:.2f}).")
        else:
            lines.append(f"- **Teacher check, {PAIR_LABELS.get(pair, pair)}: the teacher ({tacc:.2f}) is NOT more "
                         f"accurate than the student trained from scratch ({scratch[0]:.2f}).** "
                         + ("A ViT trained from scratch on a few thousand 32 px images has no locality prior and "
                            "learns more slowly than a CNN; the paper's teachers are pre-trained on ImageNet. "
                            if MODELS[t].family != "cnn" else
                            "The teacher's schedule is too short for its width at this scale. ")
                         + "Distilling from a weaker teacher is part of what this pair measures.")
    return lines


# ------------------------------------------------------------------------------------------ dry list


def dry_list(s: Settings, plan: Sequence[Run], selected: Sequence[Run]) -> None:
    from crossdistill.config import build_config

    p = s.protocol
    for run in plan:  # every planned config must validate (keys, types, method arguments)
        build_config(copy.deepcopy(run.config))
    print(f"protocol {p.name}: {p.summary}")
    print(f"output {s.out}; data {s.data_root} ({s.dataset}); device {s.device}; {s.jobs} run(s) at a time")
    print(f"methods: {', '.join(s.methods)}" + (
        f" (not in this installation: {', '.join(m for m in p.methods if m not in s.methods)})"
        if set(p.methods) - set(s.methods) else ""))
    print(f"{'status':7s} {'run':36s} {'part':11s} {'epochs':>6s} {'images':>7s} {'est':>8s}")
    todo_s = 0.0
    for run in selected:
        status = "done" if is_done(run) else ("partial" if run.run_dir.exists() else "todo")
        if status != "done":
            todo_s += run.est_s
        print(f"{status:7s} {run.name:36s} {run.part:11s} {run.config['train']['epochs']:6d} "
              f"{_train_images(run):7d} {fmt_min(run.est_s):>8s}")
    left = simulate_makespan(s, selected)
    total_work = sum(r.est_s for r in plan)
    makespan = _plan_makespan(s, plan)
    parts = {}
    for run in plan:
        parts[run.part] = parts.get(run.part, 0.0) + run.est_s
    print(f"\n{len(selected)} runs listed, {sum(is_done(r) for r in selected)} done; "
          f"estimated wall time of what is left: {fmt_min(left)}")
    print(f"whole study (estimate, free machine): work {', '.join(f'{k} {fmt_min(v)}' for k, v in parts.items())} "
          f"= {fmt_min(total_work)} of run time; {s.jobs} at a time: total {fmt_min(makespan)}"
          + (f" (limit {p.budget_min:g} min: {'fits' if makespan <= p.budget_min * 60 else 'OVER'})"
             if p.budget_min else ""))
    if p.speed == "gpu":
        print(GPU_NOTE)


def check_build(plan: Sequence[Run]) -> None:
    """Validate every planned config and build each distinct (student, teacher, method) with one step on
    random data (CPU, random weights): the recipes are sound even where they cannot run here."""
    import study_models  # noqa: F401
    import torch

    from crossdistill.config import build_config
    from crossdistill.distillers import build_distiller, method_config
    from crossdistill.engine.setup import create_teacher
    from crossdistill.models import create_model

    seen = set()
    for run in plan:
        cfg = build_config(copy.deepcopy(run.config))
        key = (run.student, run.teacher, run.method)
        if key in seen:
            continue
        seen.add(key)
        student = create_model(cfg.student, 10)
        teacher = None
        if cfg.teacher is not None:
            tcfg = dataclasses.replace(cfg.teacher, checkpoint=None)
            teacher = create_teacher(tcfg, 10, CIFAR10_MEAN, CIFAR10_STD)
        args = method_config(cfg.method, cfg.method_args, teacher=cfg.teacher)
        if getattr(args, "img_size", "absent") is None:
            args = dataclasses.replace(args, img_size=cfg.data.img_size)
        distiller = build_distiller(cfg.method, student, teacher, args)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        out = distiller(x, y)
        out.loss.backward()
        print(f"built {run.student} <- {run.teacher or '-'} ({run.method}): loss {out.loss.item():.3f}, "
              f"losses {', '.join(out.losses)}", flush=True)


# ------------------------------------------------------------------------------------------ calibration


class _EpochClock:
    """A text stream for the trainer's output that notes wall and CPU time when each epoch's row is printed."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def write(self, text: str) -> int:
        if text.startswith("epoch "):
            self.marks.append((time.perf_counter(), _cpu_seconds()))
        return len(text)

    def flush(self) -> None:
        pass


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def calibrate(s: Settings, plan: Sequence[Run], images: int) -> None:
    """Time every distinct (student, teacher, method): 2 epochs of ``images`` images, the second one timed.

    Prints, per combination, training images/s from wall time and from CPU time (process CPU seconds /
    torch threads: what a free machine would give if the threads ran in parallel without waiting, an
    estimate for a shared machine), the evaluation speed, the fixed cost of a run and the load average.
    """
    import tempfile

    import study_models  # noqa: F401
    import torch

    from crossdistill.config import build_config
    from crossdistill.engine.trainer import train

    seen: dict[str, Run] = {}
    for run in plan:
        seen.setdefault(speed_key(run), run)
    threads = torch.get_num_threads()
    n_eval = 1000
    results: dict[str, Any] = {"train_wall": {}, "train_cpu": {}, "eval_wall": {}, "eval_cpu": {}, "overhead": []}
    print(f"calibrating {len(seen)} combinations: 2 epochs of {images} images each, the second timed; "
          f"torch threads {threads}; load average {loadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for key, run in seen.items():
            cfg = copy.deepcopy(run.config)
            cfg["data"]["train_subset"] = images
            cfg["data"]["eval_subset"] = n_eval
            cfg["train"].update(epochs=2, output_dir=tmp, run_name=f"cal-{len(results['train_wall'])}")
            cfg["train"].pop("teacher_cache", None)
            cfg["optim"]["warmup_epochs"] = 0
            if cfg.get("teacher"):
                cfg["teacher"]["checkpoint"] = None  # random weights: the same speed
            clock = _EpochClock()
            load0 = loadavg()
            t0 = time.perf_counter()
            summary = train(build_config(cfg), out=clock)
            total = time.perf_counter() - t0
            (w1, c1), (w2, c2) = clock.marks[-2], clock.marks[-1]
            epoch_wall = summary.history[1]["epoch_time_s"]
            interval_wall, interval_cpu = w2 - w1, c2 - c1
            train_share = min(1.0, epoch_wall / interval_wall)
            trained = (images // cfg["train"]["batch_size"]) * cfg["train"]["batch_size"]
            ips_wall = trained / epoch_wall
            ips_cpu = trained / (interval_cpu * train_share / threads)
            eval_wall = max(1e-3, interval_wall - epoch_wall)
            eval_cpu = max(1e-3, interval_cpu * (1 - train_share) / threads)
            results["train_wall"][key], results["train_cpu"][key] = round(ips_wall, 1), round(ips_cpu, 1)
            if run.method == "vanilla":
                results["eval_wall"][run.student] = round(n_eval / eval_wall, 1)
                results["eval_cpu"][run.student] = round(n_eval / eval_cpu, 1)
            results["overhead"].append(total - summary.wall_time_s)
            print(f"{key:34s} train {ips_wall:6.1f} img/s wall, {ips_cpu:6.1f} from CPU time | eval+save "
                  f"{eval_wall:5.2f} s per {n_eval} | setup {total - summary.wall_time_s:4.1f} s | "
                  f"load {load0:.2f} -> {loadavg():.2f}", flush=True)
    print("\nmeasured (wall clock):")
    print(json.dumps({"train": results["train_wall"], "eval": results["eval_wall"],
                      "run_overhead_s": round(max(results["overhead"]), 1)}, indent=1))
    print("\nmeasured (CPU time / threads):")
    print(json.dumps({"train": results["train_cpu"], "eval": results["eval_cpu"]}, indent=1))


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Protocols:\n" + "\n".join(f"  {k}: {v.summary}" for k, v in PROTOCOLS.items()))
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="output folder of the runs (default runs/accuracy-<protocol>)")
    ap.add_argument("--docs-dir", type=Path, default=None,
                    help="where RESULTS*.md and the PNGs go (default docs/; the tiny protocol: <out>/docs)")
    ap.add_argument("--data-root", default=None,
                    help=f"CIFAR-10 ImageFolder tree or .tar.gz of one, or a torchvision CIFAR folder "
                         f"(default {DEFAULT_DATA})")
    ap.add_argument("--dataset", default="auto", choices=("auto", "folder", "cifar10", "cifar100"))
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir: where decoded archives are cached")
    ap.add_argument("--only", action="append", default=[], metavar="SEL",
                    help="train only these runs: teachers | cells | sensitivity | pair=NAME | method=NAME | seed=N | "
                         "run=NAME (repeat or comma-separate; different keys must all match)")
    ap.add_argument("--methods", default=None, help="comma-separated methods instead of the protocol's")
    ap.add_argument("--dry-list", action="store_true", help="print the planned runs and the estimated time; train nothing")
    ap.add_argument("--check-build", action="store_true",
                    help="validate every planned config and build each model/method combination once (no data)")
    ap.add_argument("--report-only", action="store_true", help="only (re)write the results page from finished runs")
    ap.add_argument("--no-report", action="store_true", help="do not write the results page")
    ap.add_argument("--calibrate", action="store_true", help="time one short epoch of every combination")
    ap.add_argument("--calibrate-images", type=int, default=1024)
    ap.add_argument("--device", default=None, help="override the protocol's device (cpu, cuda, auto)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the protocol's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the protocol's)")
    ap.add_argument("--no-teacher-cache", action="store_true", help="run the teacher every step")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key in every run (e.g. train.epochs=1 for a quick check); the results "
                         "page then says that these are not the protocol's settings")
    ap.add_argument("--lane-worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def teacher_cache_supported() -> bool:
    from crossdistill.config import TrainConfig

    return "teacher_cache" in {f.name for f in dataclasses.fields(TrainConfig)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lane_worker:
        return lane_worker_main(args.threads)
    protocol = PROTOCOLS[args.protocol]
    out = (args.out or REPO / "runs" / f"accuracy-{protocol.name}").resolve()
    docs_dir = args.docs_dir or (out / "docs" if not protocol.results else REPO / "docs")
    data_root = str(Path(args.data_root).expanduser().resolve()) if args.data_root else str(DEFAULT_DATA)
    dataset = detect_dataset(data_root) if args.dataset == "auto" else args.dataset
    wanted = tuple(args.methods.split(",")) if args.methods else protocol.methods
    methods = available_methods(wanted)
    jobs = args.jobs or protocol.jobs
    threads = args.threads or protocol.threads
    device = args.device or protocol.device
    settings = Settings(protocol=protocol, out=out, data_root=data_root, dataset=dataset, cache_dir=args.cache_dir,
                        teacher_cache=(protocol.teacher_cache and not args.no_teacher_cache
                                       and teacher_cache_supported()),
                        device=device, methods=methods, jobs=jobs, threads=threads, overrides=tuple(args.set))
    if threads and (jobs <= 1 or args.calibrate):
        import torch

        torch.set_num_threads(threads)
    missing = [m for m in wanted if m not in methods]
    if missing:
        print(f"note: methods not in this installation, left out: {', '.join(missing)}", flush=True)
    plan = build_plan(settings)
    selected = select(plan, parse_only(args.only))

    if args.check_build:
        check_build(selected)
        if not args.dry_list:
            return 0
    if args.dry_list:
        dry_list(settings, plan, selected)
        return 0
    if args.calibrate:
        calibrate(settings, selected, args.calibrate_images)
        return 0
    if not args.report_only:
        if not Path(data_root).exists():
            raise SystemExit(f"data not found: {data_root}; pass --data-root (an ImageFolder tree, a .tar.gz of one, "
                             "or a torchvision CIFAR-10 folder)")
        for run in selected:
            check_existing(run)
        todo = [r for r in selected if not is_done(r)]
        skipped = len(selected) - len(todo)
        if skipped:
            print(f"{skipped} of {len(selected)} selected runs already finished (summary.json): skipped", flush=True)
        invocation = datetime.datetime.now().isoformat(timespec="seconds")
        t0 = time.time()
        machine = machine_info(device)
        if threads:
            machine["torch_threads"] = threads
        machine["jobs"] = jobs
        append_log(out, {"event": "invocation", "invocation": invocation, "argv": sys.argv[1:],
                         "machine": machine, "load": loadavg(), "todo": len(todo)})
        try:
            execute(settings, todo, invocation)
        except KeyboardInterrupt:
            return 130
        except Exception as err:
            from crossdistill.engine.preemption import EXIT_PREEMPTED, Preempted

            if isinstance(err, Preempted):
                return EXIT_PREEMPTED
            raise
        finally:
            append_log(out, {"event": "invocation_end", "invocation": invocation,
                             "seconds": round(time.time() - t0, 1)})
    if not args.no_report:
        path = write_report(settings, plan, Path(docs_dir))
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
