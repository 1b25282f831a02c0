"""Training epochs with the teacher cache vs the student alone, through the real engine (loader included).

1. ``fill``: an RSD run with ``train.teacher_cache`` computes and stores the teacher outputs
   (it times as an uncached run, plus the writes);
2. ``student`` (method vanilla, the student alone) and ``cached`` (the same RSD run again: every
   teacher output read from the cache) are then trained epoch by epoch, alternately, in one
   process, so that machine load hits both alike.

Reports the train-loop time per epoch (``train_one_epoch``: loading, steps, no evaluation) and
the ratio cached / student in images/s (median over epochs).

    python benchmarks/cache_epoch_bench.py [--threads 1] [--epochs 3] [--subset 1024] [--img-size 64] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from crossdistill.config import build_config
from crossdistill.engine import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"


def _config(work: Path, name: str, method: str, args) -> dict:
    data = {
        "dataset": "folder",
        "root": args.root,
        "img_size": args.img_size,
        "train_subset": args.subset,
        "eval_subset": 100,
        "num_workers": args.workers,
    }
    if args.synthetic:
        data = {
            "dataset": "digits",
            "img_size": args.img_size,
            "train_subset": min(args.subset, 1437),
            "eval_subset": 100,
            "num_workers": args.workers,
        }
    return {
        "student": {"name": args.student, "kwargs": {"img_size": args.img_size} if "deit" in args.student else {}},
        "teacher": {"name": args.teacher} if method != "vanilla" else None,
        "method": method,
        "data": data,
        "optim": {"opt": "sgd", "lr": 0.05, "sched": "none"},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "device": args.device,
            "output_dir": str(work / "runs"),
            "run_name": name,
            "tensorboard": False,
            "progress": False,
            "teacher_cache": str(work / "cache") if method != "vanilla" else None,
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="resnet18")
    parser.add_argument("--student", default="deit_tiny_patch16_224")
    parser.add_argument("--root", default=os.environ.get("CROSSDISTILL_CIFAR10_TAR", str(DEFAULT_ROOT)))
    parser.add_argument("--synthetic", action="store_true", help="digits instead of CIFAR-10 (no archive needed)")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--subset", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="crossdistill-cache-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        fill = Trainer(build_config(_config(work, "fill", "rsd", args)), out=io.StringIO())
        fill_times = [fill.train_one_epoch(e)["_time"] for e in range(args.epochs)]
        fill_s = time.perf_counter() - t0
        del fill
        student = Trainer(build_config(_config(work, "student", "vanilla", args)), out=io.StringIO())
        cached = Trainer(build_config(_config(work, "cached", "rsd", args)), out=io.StringIO())
        times = {"student": [], "cached": []}
        for epoch in range(args.epochs):
            order = [("student", student), ("cached", cached)]
            for name, trainer in order if epoch % 2 == 0 else order[::-1]:
                times[name].append(trainer.train_one_epoch(epoch)["_time"])
        images = student.steps_per_epoch * args.batch_size
        read, computed = cached.teacher_cache.hits, cached.teacher_cache.misses

    rate = {k: images / statistics.median(v) for k, v in times.items()}
    rate["fill (uncached + writes)"] = images / statistics.median(fill_times)
    result = {
        "teacher": args.teacher,
        "student": args.student,
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "images_per_epoch": images,
        "epochs": args.epochs,
        "threads": torch.get_num_threads(),
        "workers": args.workers,
        "data": "digits" if args.synthetic else args.root,
        "epoch_s": {k: [round(t, 2) for t in v] for k, v in {**times, "fill": fill_times}.items()},
        "img_per_s": {k: round(v, 1) for k, v in rate.items()},
        "cached_over_student_only": statistics.median(s / c for s, c in zip(times["student"], times["cached"])),
        "cache_reads": read,
        "teacher_computed_in_cached_run": computed,
        "fill_total_s": round(fill_s, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.teacher} -> {args.student}, {args.img_size} px, batch {args.batch_size}, {images} images/epoch, "
            f"{result['threads']} threads, {args.workers} workers"
        )
        for k, v in result["img_per_s"].items():
            print(f"  {k:<26} {v:8.1f} img/s")
        print(
            f"  cached epoch / student-only epoch: {result['cached_over_student_only']:.3f} "
            f"({read} teacher outputs read, {computed} computed in the cached run)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
