"""Resident memory over a long tiny training run: does anything leak per step or per epoch?

    python benchmarks/memory_growth.py --steps 2000 [--out /tmp/memory-run]

Trains a tiny ViT -> ResNet RSD pair on scikit-learn's digits (CPU, no download) for
``--steps`` optimiser steps with per-epoch evaluation and checkpoints, records the
process's resident set size (VmRSS) after every epoch, and reports the growth from the
end of the warm-up (the first 10 % of the steps) to the end. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from crossdistill.config import build_config
from crossdistill.engine import Trainer


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MeasuredTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rss: list[tuple[int, float]] = []

    def _run_epoch(self, epoch, mixup, stop):
        super()._run_epoch(epoch, mixup, stop)
        self.rss.append(((epoch + 1) * self.steps_per_epoch, rss_mib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="run directory parent (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out or tempfile.mkdtemp(prefix="crossdistill-memory-"))
    steps_per_epoch = 1437 // args.batch_size
    epochs = math.ceil(args.steps / steps_per_epoch)
    cfg = build_config(
        {
            "student": {"name": "test_resnet"},
            "teacher": {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}},
            "method": "rsd",
            "data": {"dataset": "digits", "img_size": 32, "num_workers": 0, "hflip": 0.0, "scale": [0.7, 1.0]},
            "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.01, "sched": "cosine"},
            "train": {
                "epochs": epochs,
                "batch_size": args.batch_size,
                "device": "cpu",
                "output_dir": str(out),
                "run_name": "memory",
                "tensorboard": False,
                "progress": False,
                "checkpoint_every_steps": 500,
            },
        }
    )
    started = time.time()
    trainer = MeasuredTrainer(cfg, overwrite=True, out=open("/dev/null", "w"))
    trainer.fit()
    warm = next(rss for step, rss in trainer.rss if step >= 0.1 * args.steps)
    peak = max(rss for _, rss in trainer.rss)
    final = trainer.rss[-1][1]
    print(
        json.dumps(
            {
                "steps": trainer.rss[-1][0],
                "epochs": epochs,
                "rss_after_warmup_mib": round(warm, 1),
                "rss_final_mib": round(final, 1),
                "rss_peak_mib": round(peak, 1),
                "growth_percent": round(100 * (final - warm) / warm, 2),
                "wall_time_s": round(time.time() - started, 1),
                "rss_by_epoch_mib": [round(r, 1) for _, r in trainer.rss],
            }
        )
    )


if __name__ == "__main__":
    main()
