"""The demo: a ViT teacher and a CNN student on scikit-learn's digits, scratch vs RSD, on CPU."""

from __future__ import annotations

import sys
import time
from importlib import resources
from pathlib import Path

from .config import load_config
from .engine import train


def recipe(name: str) -> Path:
    """Path of a recipe shipped inside the package, e.g. ``recipe('demo/rsd.yaml')``."""
    return Path(str(resources.files("crossdistill") / "recipes" / name))


def run_demo(output_dir: str = "demo_runs", epochs: int | None = None, overwrite: bool = True, out=None) -> dict:
    out = out if out is not None else sys.stdout
    started = time.time()
    common = [f"train.output_dir={output_dir}"] + ([f"train.epochs={epochs}"] if epochs else [])
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731

    say("== 1/3 teacher: a small ViT trained on digits ==")
    teacher = train(load_config(recipe("demo/teacher.yaml"), common), overwrite=overwrite, out=out)
    teacher_ckpt = Path(teacher.run_dir) / "best.pt"
    say("\n== 2/3 student from scratch: a narrow ResNet-18 ==")
    scratch = train(load_config(recipe("demo/scratch.yaml"), common), overwrite=overwrite, out=out)
    say("\n== 3/3 the same student distilled from the ViT with RSD ==")
    rsd = train(
        load_config(recipe("demo/rsd.yaml"), common + [f"teacher.checkpoint={teacher_ckpt}"]),
        overwrite=overwrite,
        out=out,
    )
    wall = time.time() - started
    rows = [
        ("teacher  (ViT, vanilla)", teacher),
        ("student  (ResNet, scratch)", scratch),
        ("student  (ResNet, RSD)", rsd),
    ]
    say("\n== crossdistill demo: digits test accuracy (360 images) ==")
    say(f"{'run':<28} {'last top-1':>10} {'best top-1':>10}  run directory")
    for label, summary in rows:
        say(f"{label:<28} {summary.last_top1:>10.2f} {summary.best_top1:>10.2f}  {summary.run_dir}")
    say(
        f"RSD - scratch (last epoch): {rsd.last_top1 - scratch.last_top1:+.2f} points; "
        f"RSD adds {rsd.extra_parameters / 1e3:.1f}k trainable parameters (AAD), dropped after training"
    )
    say(f"total time {wall:.1f}s")
    return {"teacher": teacher, "scratch": scratch, "rsd": rsd, "wall_time_s": wall}
