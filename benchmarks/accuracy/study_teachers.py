"""Kept teachers (issue 19): the study's teachers trained once, to convergence, on all 50,000 CIFAR-10 training
images, and kept in ``benchmarks/accuracy/teachers/`` as ``<key>.safetensors`` beside the config that trained them
(``<key>.yaml``) and a manifest (``<key>.json``: SHA-256, accuracy, command, versions). A protocol starts from the
kept teacher of a model key instead of training its own, unless ``run_study.py --train-teachers``.

Keep a finished teacher run (writes the three files; an existing kept teacher is replaced only with ``--replace``)::

    crossdistill train --config benchmarks/accuracy/teachers/resnet_t.yaml
    python benchmarks/accuracy/study_teachers.py runs/teachers/resnet_t --key resnet_t
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
TEACHERS_DIR = HERE / "teachers"
MANIFEST_FORMAT = "crossdistill-kept-teacher/1"

if str(HERE) not in sys.path:  # run as a script: the study_* modules beside this file
    sys.path.insert(0, str(HERE))

from study_protocols import MODELS  # noqa: E402


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
    fields = {k: v for k, v in data.items() if k != "format"}
    try:
        fields["weights"] = manifest_path.parent / fields["weights"]
        return KeptTeacher(**fields)
    except (KeyError, TypeError) as err:
        raise KeptTeacherError(f"{manifest_path}: incomplete kept-teacher manifest ({err})") from None


def kept_teachers(directory: Path = TEACHERS_DIR) -> dict[str, KeptTeacher]:
    """The kept teachers in ``directory`` by model key (manifests whose key the study knows)."""
    out = {}
    for path in sorted(Path(directory).glob("*.json")):
        kept = read_kept(path)
        if kept.key != path.stem:
            raise KeptTeacherError(f"{path}: the manifest is for {kept.key!r}, its file name says {path.stem!r}")
        if kept.key in MODELS:
            out[kept.key] = kept
    return out


def verify(kept: KeptTeacher) -> None:
    """The weights exist and are the ones the manifest describes."""
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


def keep(run_dir: Path, key: str, directory: Path = TEACHERS_DIR, replace: bool = False) -> KeptTeacher:
    """Export the last-epoch weights of the finished teacher run ``run_dir`` (a model of ``MODELS[key]``) into
    ``directory`` with its manifest; the training config must already be there as ``<key>.yaml``."""
    import yaml

    from crossdistill.export import export_run
    from crossdistill.files import write_path_atomic, write_text_atomic

    if key not in MODELS:
        raise KeptTeacherError(f"unknown model key {key!r}; the study's models: {', '.join(MODELS)}")
    spec = MODELS[key]
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise KeptTeacherError(f"{run_dir}: no summary.json; keep a finished run")
    summary = json.loads(summary_path.read_text())
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    student, method = cfg.get("student") or {}, cfg.get("method")
    if student.get("name") != spec.name or (student.get("kwargs") or {}) != spec.kwargs or method != "vanilla":
        raise KeptTeacherError(
            f"{run_dir} trained {student.get('name')} {student.get('kwargs')} with method {method}; the study's "
            f"{key} is {spec.name} {spec.kwargs} trained alone (method vanilla)"
        )
    config_path = Path(directory) / f"{key}.yaml"
    if not config_path.is_file():
        raise KeptTeacherError(f"{config_path} is missing: keep the config that trained the teacher beside it")
    weights = Path(directory) / f"{key}.safetensors"
    manifest_path = Path(directory) / f"{key}.json"
    if not replace and (weights.exists() or manifest_path.exists()):
        raise KeptTeacherError(f"{weights.parent} already keeps a {key} teacher; pass --replace to replace it")
    data = cfg.get("data") or {}
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
        command=f"crossdistill train --config benchmarks/accuracy/teachers/{config_path.name}",
        trained_with=_versions(str((cfg.get("train") or {}).get("device", "auto"))),
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
    try:
        kept = keep(args.run_dir, args.key, args.dir, args.replace)
    except KeptTeacherError as err:
        print(f"study_teachers: {err}", file=sys.stderr)
        return 1
    print(
        f"kept {kept.key}: {kept.weights} (SHA-256 {kept.sha256}), top-1 last {kept.last_top1:.2f} "
        f"best {kept.best_top1:.2f} after {kept.epochs} epochs on {kept.train_images:,} images"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
