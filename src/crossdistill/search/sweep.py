"""``crossdistill sweep``: every combination of a grid of config values (and seeds) as a normal run directory under
``<train.output_dir>/<sweep>/``; a finished run is skipped when the sweep is run again, an interrupted one resumes
from its checkpoint; the summary is :mod:`crossdistill.report`'s table."""

from __future__ import annotations

import argparse
import itertools
from typing import Sequence

from ..errors import CrossDistillError
from ..report import markdown_table, report_rows
from .runs import (
    Base,
    RunSpec,
    folder_name,
    parse_seeds,
    read_base,
    read_summary,
    run_specs,
    split_values,
    start_workers,
)


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``--grid key=v1,v2`` arguments -> [(key, [v1, v2])]; values stay text, parsed as any override's."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise CrossDistillError(f"--grid {item!r}: give KEY=V1,V2,... (e.g. --grid method_args.kappa=0.002,0.01)")
        if key in (k for k, _ in grid):
            raise CrossDistillError(f"--grid names {key} twice; give all its values in one --grid {key}=V1,V2")
        if key == "train.seed":
            raise CrossDistillError("--grid train.seed: give the seeds with --seeds 0,1,2")
        grid.append((key, split_values(values)))
    return grid


def plan_sweep(base: Base, grid: list[tuple[str, list[str]]], seeds: list[int] | None) -> list[RunSpec]:
    """Every combination of the grid's values and the seeds, each checked as a run config (a typo in a key is the
    config's own error) before any run starts."""
    keys = [key for key, _ in grid]
    specs = []
    for combination in itertools.product(*(values for _, values in grid)):
        pairs = list(zip(keys, combination))
        for seed in seeds if seeds is not None else [None]:
            named = pairs + ([("seed", str(seed))] if seed is not None else [])
            name = folder_name(named) or "run"
            overrides = [f"{key}={value}" for key, value in pairs]
            overrides += [f"train.output_dir={base.folder}", f"train.run_name={name}"]
            overrides += [f"train.seed={seed}"] if seed is not None else []
            base.config(overrides)
            specs.append(RunSpec(name, tuple(overrides)))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise CrossDistillError("two runs of the sweep would share a folder name: give each grid value once")
    return specs


def sweep(
    config: str,
    grid_items: Sequence[str],
    seeds: str | None = None,
    workers: int = 1,
    overrides: Sequence[str] = (),
    name: str | None = None,
    teacher_cache: bool = True,
) -> list[str]:
    """Run (or continue) a sweep; prints one line per run and the report table; returns the finished run dirs."""
    grid = parse_grid(grid_items)
    base = read_base(config, overrides, name, teacher_cache)
    specs = plan_sweep(base, grid, parse_seeds(seeds))
    print(f"sweep {base.name}: {len(specs)} runs in {base.folder} ({workers} worker(s))", flush=True)
    start_workers(run_specs, (base, specs), workers)
    return summarise(base, specs)


def summarise(base: Base, specs: Sequence[RunSpec]) -> list[str]:
    """Print the report table of the finished runs of ``specs`` (and how many are not finished); their dirs."""
    finished = [str(base.folder / spec.name) for spec in specs if read_summary(base.folder / spec.name) is not None]
    if len(finished) < len(specs):
        print(f"{len(specs) - len(finished)} run(s) not finished (another worker is training them, or they failed)")
    if finished:
        print()
        print(markdown_table(report_rows(finished)))
    return finished


def common_options(args: argparse.Namespace) -> dict:
    """The options of :func:`add_common_arguments` as keyword arguments of :func:`sweep` and ``tune``."""
    return {"workers": args.workers, "overrides": args.overrides, "teacher_cache": not args.no_teacher_cache}


def _cmd_sweep(args: argparse.Namespace) -> int:
    sweep(args.config, args.grid, seeds=args.seeds, name=args.name, **common_options(args))
    return 0


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="the base run config (YAML)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=5")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine (each gets cores/K threads)")
    p.add_argument(
        "--no-teacher-cache",
        action="store_true",
        help="do not give the runs a shared train.teacher_cache (default: <train.output_dir>/teacher_cache when "
        "the method's teacher outputs can be cached)",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep",
        help="train every combination of a grid of config values (and seeds); finished runs are skipped",
        description="Train every combination of --grid values and --seeds as a run under "
        "<train.output_dir>/<name>/; run the same command again to continue (finished runs are skipped, "
        "interrupted ones resume). Several processes or machines may run the same sweep: each run is trained once.",
    )
    add_common_arguments(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a config key and its values (repeatable), e.g. method_args.kappa=0.002,0.01,0.05",
    )
    p.add_argument("--seeds", help="train.seed values, e.g. 0,1,2 (default: the config's seed)")
    p.add_argument("--name", help="the sweep's folder under train.output_dir (default: the config file's name)")
    p.set_defaults(func=_cmd_sweep)
    return p
