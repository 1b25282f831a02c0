"""A 12-trial RSD search with and without the teacher cache: what running the teacher once saves a search.

On the `make demo` pair (a narrow ResNet-18 teaching a small ViT on scikit-learn's digits, no download), it

1. trains the demo's teacher (or takes ``--teacher FILE``);
2. trains the demo's RSD student at its defaults on a validation split (``data.val_fraction``): the
   reference a search has to beat;
3. runs ``crossdistill tune`` over ``configs/search/rsd_space.yaml`` twice, on the same trials: 12 configs
   drawn once (random sampler, seed 0) and queued in both studies (several workers would otherwise draw
   different ones), no pruning, so both searches train the same 12 configs for all their epochs:
   ``cached`` (every trial reads the shared teacher cache; the first trial of each epoch fills it) and
   ``uncached`` (``--no-teacher-cache``: every trial runs the teacher on every batch);
4. prints, and writes as JSON (``--json``), the wall time of each search, their ratio, the teacher-cache
   lines of the cached runs (how many rows were computed and read), and the best validation top-1 of each
   against the defaults'.

    python benchmarks/search_cache_bench.py [--trials 12] [--workers 2] [--epochs 10] [--out DIR] [--json FILE]

The two searches run one after the other in this process, on the same machine: the ratio is the claim, the
seconds depend on the machine and its load (the 1-minute load average is recorded before and after each).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import time
from pathlib import Path

from crossdistill.config import load_config
from crossdistill.demo import recipe
from crossdistill.engine import train
from crossdistill.files import write_text_atomic
from crossdistill.search.runs import read_base
from crossdistill.search.space import read_space
from crossdistill.search.tune import open_storage, tune

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "configs" / "search" / "rsd_space.yaml"


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def cache_lines(folder: Path) -> dict[str, int]:
    """Rows computed by the teacher and rows read from the cache, summed over the train.log files under ``folder``."""
    computed = read = 0
    for log in folder.glob("*/train.log"):
        for match in re.finditer(r"teacher cache, epoch \d+: (\d+) samples read, (\d+) computed", log.read_text()):
            read += int(match.group(1))
            computed += int(match.group(2))
    return {"rows_read": read, "rows_computed": computed}


def tried(trials_csv: Path) -> list[dict[str, str]]:
    """The configs a search tried (the parameter columns of its trials.csv), in trial order."""
    with open(trials_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fixed = {"number", "state", "value", "run", "duration_s"}
    return [{k: v for k, v in row.items() if k not in fixed} for row in sorted(rows, key=lambda r: int(r["number"]))]


def draw_configs(config: Path, overrides: list[str], trials: int) -> list[dict]:
    """``trials`` configs of the search space drawn by Optuna's random sampler (seed 0), each checked as a run."""
    import optuna

    params = read_space(SPACE, read_base(str(config), overrides, "draw").config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    configs = []
    for _ in range(trials):
        trial = draw.ask()
        configs.append({param.key: param.suggest(trial) for param in params})
        draw.tell(trial, 0.0)
    return configs


def queue(storage: str, study: str, configs: list[dict]) -> None:
    """Put ``configs`` in the study as waiting trials: tune's workers take them first, each once."""
    import optuna

    created = optuna.create_study(
        study_name=study, storage=open_storage(storage), direction="maximize", load_if_exists=True
    )
    for params in configs:
        created.enqueue_trial(params, skip_if_exists=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: the demo recipe's)")
    ap.add_argument("--out", type=Path, default=Path("runs/search-cache-bench"))
    ap.add_argument("--teacher", default=None, help="a trained demo teacher (best.pt); default: train one")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    out = args.out.resolve()
    epochs = [f"train.epochs={args.epochs}"] if args.epochs else []
    common = [f"train.output_dir={out}", *epochs]
    teacher = args.teacher
    if teacher is None:
        print("training the demo teacher ...", flush=True)
        summary = train(load_config(recipe("demo/teacher.yaml"), common), overwrite=True, out=io.StringIO())
        teacher = str(Path(summary.run_dir) / "best.pt")
    student = [*common, f"teacher.checkpoint={teacher}", "data.val_fraction=0.1"]
    default = train(
        load_config(recipe("demo/rsd.yaml"), [*student, "train.run_name=rsd-defaults-val"]),
        overwrite=True,
        out=io.StringIO(),
    )
    print(f"RSD at its defaults: {default.last_top1:.2f} val top-1 ({default.wall_time_s:.0f} s)", flush=True)

    results: dict = {
        "trials": args.trials,
        "workers": args.workers,
        "epochs": default.epochs,
        "defaults_val_top1": default.last_top1,
        "cpu_count": os.cpu_count(),
        "searches": {},
    }
    config = recipe("demo/rsd.yaml")
    configs = draw_configs(config, student, args.trials)
    for name, cached in (("cached", True), ("uncached", False)):
        folder = out / f"search-{name}"
        folder.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{folder / 'study.db'}"
        queue(storage, f"search-{name}", configs)
        load0, started = loadavg(), time.perf_counter()
        written = tune(
            str(config),
            str(SPACE),
            trials=args.trials,
            workers=args.workers,
            storage=storage,
            study_name=f"search-{name}",
            sampler="random",
            pruner="none",
            seed=0,
            overrides=student,
            teacher_cache=cached,
        )
        seconds = time.perf_counter() - started
        best = written.get("best")
        results["searches"][name] = {
            "seconds": round(seconds, 1),
            "load_before": load0,
            "load_after": loadavg(),
            "best_val_top1": None if best is None else best.value,
            "best_params": None if best is None else best.params,
            "tried": tried(Path(written["trials"])),
            **cache_lines(out / f"search-{name}"),
        }
        ran = len(results["searches"][name]["tried"])
        print(f"{name}: {seconds:.0f} s, {ran} trials", flush=True)
    cached, uncached = results["searches"]["cached"], results["searches"]["uncached"]
    results["speedup"] = round(uncached["seconds"] / cached["seconds"], 2)
    print(
        f"\n{args.trials} trials of {default.epochs} epochs, {args.workers} worker(s): "
        f"uncached {uncached['seconds']:.0f} s, cached {cached['seconds']:.0f} s: "
        f"{results['speedup']:.2f}x faster with the cache "
        f"({cached['rows_computed']} teacher rows computed, {cached['rows_read']} read from the cache). "
        f"Best val top-1: {cached['best_val_top1']:.2f} (cached), {uncached['best_val_top1']:.2f} (uncached); "
        f"defaults {default.last_top1:.2f}."
    )
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1, default=str) + "\n", hint="the JSON output")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
