"""Kept teachers (issue 19): the study's teachers trained once, to convergence, on all 50,000 CIFAR-10 training
images, and kept in ``benchmarks/accuracy/teachers/`` as ``<key>.safetensors`` beside the config that trained them
(``<key>.yaml``) and a manifest (``<key>.json``: SHA-256, accuracy, command, versions). A protocol starts from the
kept teacher of a model key instead of training its own, unless ``run_study.py --train-teachers``.

Keep a finished teacher run (writes the three files; an existing kept teacher is replaced only with ``--replace``)::

    python benchmarks/accuracy/study_models.py train --config benchmarks/accuracy/teachers/resnet_t.yaml
    python benchmarks/accuracy/study_teachers.py runs/teachers/resnet_t --key resnet_t
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
TEACHERS_DIR = HERE / "teachers"
MANIFEST_FORMAT = "crossdistill-kept-teacher/1"
TRAIN_CONFIGS = TEACHERS_DIR.relative_to(HERE.parent.parent).as_posix()  # as the manifest's command names them

if str(HERE) not in sys.path:  # run as a script: the study_* modules beside this file
    sys.path.insert(0, str(HERE))

import study_models  # noqa: E402,F401  (registers the kept ResNet teacher's resnet18_cifar for its export)
from study_protocols import CIFAR10_MEAN, CIFAR10_STD, MODELS, ModelSpec, teacher_model  # noqa: E402


class KeptTeacherError(Exception):
    """A kept teacher that cannot be used or written; the message is one line."""


@dataclass(frozen=True)
class KeptTeacher:
    key: str  # study_protocols.MODELS key
    weights: Path
    sha256: str
    last_top1: float
    best_top1: float
    best_epoch: int
    epochs: int
    train_images: int
    eval_images: int
    wall_time_s: float
    config: str  # the training config's file name, beside the weights
    command: str
    trained_with: dict[str, str]  # crossdistill, torch, timm versions and the device
    mean: list[float]  # the input normalisation it was trained with (the study's CIFAR-10 mean and std)
    std: list[float]

    def manifest(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights"] = self.weights.name
        return {"format": MANIFEST_FORMAT, **out}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_kept(manifest_path: Path) -> KeptTeacher:
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as err:
        raise KeptTeacherError(f"{manifest_path}: not a readable kept-teacher manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise KeptTeacherError(f"{manifest_path}: not a kept-teacher manifest (format is not {MANIFEST_FORMAT})")
    names = {f.name for f in fields(KeptTeacher)}
    given = {k: v for k, v in data.items() if k != "format"}
    if set(given) != names:
        missing, unknown = sorted(names - set(given)), sorted(set(given) - names)
        raise KeptTeacherError(
            f"{manifest_path}: "
            + "; ".join(
                text
                for text in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unknown {', '.join(unknown)} (a newer manifest?)" if unknown else "",
                )
                if text
            )
        )
    given["weights"] = manifest_path.parent / str(given["weights"])
    return KeptTeacher(**given)


def _is_manifest(path: Path) -> bool:
    """Any other JSON file beside the kept teachers is not ours to read."""
    try:
        return f'"{MANIFEST_FORMAT}"' in path.read_text()
    except OSError:
        return False


def kept_teachers(directory: Path = TEACHERS_DIR) -> dict[str, KeptTeacher]:
    """The kept teachers in ``directory`` by model key (manifests whose key the study knows)."""
    out = {}
    for path in sorted(Path(directory).glob("*.json")):
        if not _is_manifest(path):
            continue
        kept = read_kept(path)
        if kept.key != path.stem:
            raise KeptTeacherError(f"{path}: the manifest is for {kept.key!r}, its file name says {path.stem!r}")
        if kept.key in MODELS:
            out[kept.key] = kept
    return out


def _is_model(student: dict[str, Any], spec: ModelSpec) -> bool:
    """A config's ``student`` section builds the model ``spec`` describes."""
    return student.get("name") == spec.name and (student.get("kwargs") or {}) == spec.kwargs


def verify(kept: KeptTeacher) -> None:
    """The weights exist and are the ones the manifest describes, of the architecture the study plans for the key
    (its training config says which: weights of resnet18 load into resnet18_cifar without an error)."""
    import yaml

    config_path = kept.weights.parent / kept.config
    try:
        student = (yaml.safe_load(config_path.read_text()) or {}).get("student") or {}
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise KeptTeacherError(
            f"kept teacher {kept.key}: cannot read its training config {config_path} ({err})"
        ) from None
    spec = teacher_model(kept.key, kept=True)
    if not _is_model(student, spec):
        raise KeptTeacherError(
            f"kept teacher {kept.key}: {config_path} trained {student.get('name')} {student.get('kwargs')}, the "
            f"study's kept {kept.key} is {spec.name} {spec.kwargs}; keep a teacher of that model, or run the study "
            "with --train-teachers"
        )
    if not kept.weights.is_file():
        raise KeptTeacherError(
            f"kept teacher {kept.key}: {kept.weights} is missing; restore it, or run the study with --train-teachers"
        )
    actual = sha256_of(kept.weights)
    if actual != kept.sha256:
        raise KeptTeacherError(
            f"kept teacher {kept.key}: {kept.weights} has SHA-256 {actual[:16]}..., its manifest says "
            f"{kept.sha256[:16]}...; restore the file (git checkout), or run the study with --train-teachers"
        )


def _versions(device: str) -> dict[str, str]:
    import timm
    import torch

    from crossdistill import __version__

    return {
        "crossdistill": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "device": device,
    }


def _device_of(run_dir: Path, configured: str) -> str:
    """The device the run trained on: its config's, or for ``auto`` the one its train.log names."""
    log = run_dir / "train.log"
    found = re.search(r" device (\S+) \|", log.read_text()) if configured == "auto" and log.is_file() else None
    return found.group(1) if found else configured


# what makes a teacher run the one its config describes (data.root and the output folder may differ)
DEFINING = (
    "student",
    "method",
    "optim",
    "data.img_size",
    "data.scale",
    "data.hflip",
    "data.train_subset",
    "data.mean",
    "data.std",
    "data.auto_augment",
    "data.re_prob",
    "train.epochs",
    "train.batch_size",
    "train.seed",
    "train.label_smoothing",
    "train.mixup",
    "train.cutmix",
)


def settings_under(flat: dict[str, Any], prefixes: Sequence[str]) -> dict[str, Any]:
    """The entries of a flattened config (``a.b.c`` keys) that are one of ``prefixes`` or lie under one."""
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}


def differences(run_config: dict[str, Any], kept_config: dict[str, Any]) -> str:
    """The defining settings in which a run's config.yaml and a kept config differ (empty: none)."""
    from crossdistill.config import build_config
    from crossdistill.report import flatten

    a, b = (settings_under(flatten(build_config(raw).to_dict()), DEFINING) for raw in (run_config, kept_config))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: run {a.get(k)!r}, config {b.get(k)!r}" for k in keys[:4])


def keep(run_dir: Path, key: str, directory: Path = TEACHERS_DIR, replace: bool = False) -> KeptTeacher:
    """Export the last-epoch weights of the finished teacher run ``run_dir`` (a model of
    ``teacher_model(key, kept=True)``) into ``directory`` with its manifest; the training config must already be
    there as ``<key>.yaml``."""
    import yaml

    from crossdistill.export import export_run
    from crossdistill.files import write_path_atomic, write_text_atomic
    from crossdistill.report import normalised_config

    if key not in MODELS:
        raise KeptTeacherError(f"unknown model key {key!r}; the study's models: {', '.join(MODELS)}")
    spec = teacher_model(key, kept=True)
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise KeptTeacherError(f"{run_dir}: no summary.json; keep a finished run")
    summary = json.loads(summary_path.read_text())
    cfg = normalised_config(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    student, method = cfg.get("student") or {}, cfg.get("method")
    if not _is_model(student, spec) or method != "vanilla":
        raise KeptTeacherError(
            f"{run_dir} trained {student.get('name')} {student.get('kwargs')} with method {method}; the study's "
            f"{key} is {spec.name} {spec.kwargs} trained alone (method vanilla)"
        )
    config_path = Path(directory) / f"{key}.yaml"
    if not config_path.is_file():
        raise KeptTeacherError(f"{config_path} is missing: keep the config that trained the teacher beside it")
    differ = differences(cfg, yaml.safe_load(config_path.read_text()) or {})
    if differ:
        raise KeptTeacherError(f"{run_dir} was not trained with {config_path}: {differ}")
    data = cfg.get("data") or {}
    mean, std = [float(x) for x in data.get("mean") or ()], [float(x) for x in data.get("std") or ()]
    if mean != list(CIFAR10_MEAN) or std != list(CIFAR10_STD):
        raise KeptTeacherError(
            f"{run_dir} normalised its inputs with mean {mean or 'default'} std {std or 'default'}; the study's "
            f"students use {list(CIFAR10_MEAN)} {list(CIFAR10_STD)}, which its teachers must share"
        )
    weights = Path(directory) / f"{key}.safetensors"
    manifest_path = Path(directory) / f"{key}.json"
    if not replace and (weights.exists() or manifest_path.exists()):
        raise KeptTeacherError(f"{weights.parent} already keeps a {key} teacher; pass --replace to replace it")
    with tempfile.TemporaryDirectory() as tmp:
        export_run(run_dir, formats="safetensors", weights="last", out=tmp)
        exported = Path(tmp) / "model.safetensors"
        write_path_atomic(weights, lambda path: shutil.copyfile(exported, path), hint="the kept teacher's weights")
    kept = KeptTeacher(
        key=key,
        weights=weights,
        sha256=sha256_of(weights),
        last_top1=float(summary["last_top1"]),
        best_top1=float(summary["best_top1"]),
        best_epoch=int(summary["best_epoch"]),
        epochs=int(summary["epochs"]),
        train_images=int(data.get("train_subset") or 50_000),
        eval_images=int(data.get("eval_subset") or 10_000),
        wall_time_s=float(summary["wall_time_s"]),
        config=config_path.name,
        command=f"python benchmarks/accuracy/study_models.py train --config {TRAIN_CONFIGS}/{config_path.name}",
        trained_with=_versions(_device_of(run_dir, str((cfg.get("train") or {}).get("device", "auto")))),
        mean=mean,
        std=std,
    )
    write_text_atomic(manifest_path, json.dumps(kept.manifest(), indent=2) + "\n", hint="the kept teacher's manifest")
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Keep a finished teacher run for the accuracy study.")
    ap.add_argument("run_dir", type=Path, help="the finished teacher run (crossdistill train's run folder)")
    ap.add_argument("--key", required=True, choices=sorted(MODELS), help="the study's model key of the teacher")
    ap.add_argument("--dir", type=Path, default=TEACHERS_DIR, help=f"where to keep it (default {TEACHERS_DIR})")
    ap.add_argument("--replace", action="store_true", help="replace a kept teacher of this key")
    args = ap.parse_args(argv)
    from crossdistill.errors import CrossDistillError, one_line

    try:
        kept = keep(args.run_dir, args.key, args.dir, args.replace)
    except (KeptTeacherError, CrossDistillError, OSError, ValueError, KeyError) as err:
        print(f"study_teachers: {one_line(err)}", file=sys.stderr)
        return 1
    print(
        f"kept {kept.key}: {kept.weights} (SHA-256 {kept.sha256}), top-1 last {kept.last_top1:.2f} "
        f"best {kept.best_top1:.2f} after {kept.epochs} epochs on {kept.train_images:,} images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
