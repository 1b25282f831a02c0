"""``crossdistill report RUN_DIR...``: one markdown table across runs, seeds grouped.

Each run directory contributes its ``config.yaml`` and ``summary.json``. Runs whose configs
are equal except for the seed (and for settings that do not change the result:
:data:`IGNORED_KEYS`, e.g. the run name, output directory and device) form one group, one
table row: last and best top-1 as ``mean ± std`` over the group (sample standard deviation,
n - 1; a single run shows its value alone), the seeds, the mean wall time and the extra
trainable parameters of the method. A directory that is not a run but holds runs (e.g.
``runs/``) stands for all of them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import RUNTIME_KEYS, RunConfig, from_dict
from .distillers import method_config
from .errors import CrossDistillError, one_line
from .files import RERUN_HINT, write_text_atomic

IGNORED_KEYS = RUNTIME_KEYS | {"train.seed"}
"""Config keys that do not define an experiment: runs differing only here are seeds of one group."""
_SHOWN = ("teacher.name", "student.name", "method", "train.epochs")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def seed(self) -> Any:
        return (self.config.get("train") or {}).get("seed")


@dataclass
class Group:
    runs: list[Run] = field(default_factory=list)
    flat: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- reading


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories from the arguments, each once; a directory holding runs (not one itself) stands for its
    runs."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise CrossDistillError(f"{path} is not a directory; pass run directories written by `crossdistill train`")
        if (path / "config.yaml").is_file() or (path / "summary.json").is_file():
            found.append(path)
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
        if not children:
            raise CrossDistillError(f"{path} is not a crossdistill run directory (no config.yaml) and holds none")
        found.extend(children)
    unique: dict[Path, Path] = {}  # a run named twice (``runs runs/a``, a link to it) is one run, counted once
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_run(path: str | Path) -> Run:
    import yaml

    path = Path(path)
    config_path, summary_path = path / "config.yaml", path / "summary.json"
    if not config_path.is_file():
        raise CrossDistillError(f"{path} has no config.yaml: not a crossdistill run directory")
    if not summary_path.is_file():
        raise CrossDistillError(
            f"{path} has no summary.json: the run has not finished. Finish it (crossdistill train --resume {path}) "
            "or leave it out of the report"
        )
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
        summary = json.loads(summary_path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise CrossDistillError(f"{path}: cannot read config.yaml / summary.json: {one_line(err)}") from None
    if not isinstance(config, dict) or not isinstance(summary, dict):
        raise CrossDistillError(f"{path}: config.yaml and summary.json must both hold mappings")
    return Run(path=path, config=config, summary=summary)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become tuples."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        if not data and prefix:
            out[prefix] = {}
        return out
    if isinstance(data, list):
        return {prefix: tuple(data)}
    return {prefix: data}


def normalised_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config with every default filled in (runs written before a new key existed compare equal)."""
    try:
        return from_dict(RunConfig, config).to_dict()
    except Exception:  # a key this version does not know: compare the configs as written
        return config


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by their config without :data:`IGNORED_KEYS`, in order of first appearance."""
    groups: dict[str, Group] = {}
    for run in runs:
        flat = {k: v for k, v in flatten(normalised_config(run.config)).items() if k not in IGNORED_KEYS}
        key = json.dumps(flat, sort_keys=True, default=str)
        groups.setdefault(key, Group(flat=flat)).runs.append(run)
    return list(groups.values())


# ---------------------------------------------------------------- statistics and formatting


def mean_std(values: Sequence[float | None]) -> tuple[float, float | None, int]:
    """(mean, sample std with n - 1 or None for one value, n) of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, None, 0
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None), len(finite)


def format_mean_std(mean: float, std: float | None, digits: int = 2) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_count(count: float | None) -> str:
    if count is None or not math.isfinite(count):
        return "-"
    count = float(count)
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return f"{count:.0f}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def method_args_of(config: dict[str, Any]) -> dict[str, Any]:
    """The method's hyper-parameters with its defaults filled in (the raw method_args if that fails)."""
    method, raw = config.get("method"), dict(config.get("method_args") or {})
    try:
        return dataclasses.asdict(method_config(method, raw))
    except Exception:  # a method this installation lacks, or changed arguments: show what the run recorded
        return raw


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report_rows(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per group of runs (see the module docstring)."""
    runs = [read_run(p) for p in find_runs(run_dirs)]
    if not runs:
        raise CrossDistillError("report needs at least one run directory")
    groups = group_runs(runs)
    # settings present in every group, differing between groups, without a column of their own
    common = set.intersection(*(set(g.flat) for g in groups))
    varying = sorted(
        key
        for key in common
        if len({json.dumps(g.flat[key], default=str) for g in groups}) > 1
        and key not in _SHOWN
        and not key.startswith("method_args")
    )
    has_ema = any(r.summary.get("ema_best_top1") is not None for r in runs)
    rows = []
    for group in groups:
        config = group.runs[0].config
        teacher = config.get("teacher") or {}
        summaries = [r.summary for r in group.runs]
        last = mean_std([s.get("last_top1") for s in summaries])
        best = mean_std([s.get("best_top1") for s in summaries])
        ema = mean_std([s.get("ema_best_top1") for s in summaries])
        wall = mean_std([s.get("wall_time_s") for s in summaries])
        extra = [s.get("extra_parameters") for s in summaries if s.get("extra_parameters") is not None]
        margs = method_args_of(config)
        rows.append(
            {
                "teacher": teacher.get("name") or "-",
                "student": (config.get("student") or {}).get("name", "?"),
                "method": config.get("method", "?"),
                "method_args": ", ".join(f"{k}={_value(v)}" for k, v in margs.items()) or "-",
                "epochs": (config.get("train") or {}).get("epochs"),
                "seeds": [r.seed for r in group.runs],
                "repeated_seeds": repeated_seeds(group.runs),
                "n": len(group.runs),
                "last_top1_mean": last[0],
                "last_top1_std": last[1],
                "best_top1_mean": best[0],
                "best_top1_std": best[1],
                "ema_best_top1_mean": ema[0] if has_ema else None,
                "ema_best_top1_std": ema[1] if has_ema else None,
                "wall_time_s_mean": wall[0],
                "extra_parameters": max(extra) if extra else None,
                "other": ", ".join(f"{k}={_value(group.flat.get(k, '-'))}" for k in varying),
                "runs": [str(r.path) for r in group.runs],
            }
        )
    return rows


def repeated_seeds(runs: Sequence[Run]) -> dict[str, list[str]]:
    """The seeds that more than one run of a group trained with, each with those runs' names."""
    names: dict[str, list[str]] = {}
    for run in runs:
        names.setdefault(str(run.seed), []).append(run.name)
    return {seed: runs_of for seed, runs_of in names.items() if len(runs_of) > 1}


def repeated_seed_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """A line per repeated seed: the same experiment run again is not another sample, and it narrows the std."""
    return [
        f"warning: seed {seed} appears in {len(names)} runs of the {row['method']} row ({', '.join(names)}): each "
        "counts in its mean ± std, although a seed run again repeats an experiment instead of sampling another; "
        "report one run per seed"
        for row in rows
        for seed, names in row["repeated_seeds"].items()
    ]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    has_ema = any(r["ema_best_top1_mean"] is not None for r in rows)
    has_other = any(r["other"] for r in rows)
    header = ["teacher", "student", "method", "method args", "epochs", "seeds", "last top-1", "best top-1"]
    header += ["EMA best top-1"] if has_ema else []
    header += ["wall time", "extra params"] + (["other settings"] if has_other else []) + ["runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [
            r["teacher"],
            r["student"],
            r["method"],
            r["method_args"],
            str(r["epochs"]),
            ", ".join(str(s) for s in r["seeds"]),
            format_mean_std(r["last_top1_mean"], r["last_top1_std"]),
            format_mean_std(r["best_top1_mean"], r["best_top1_std"]),
        ]
        if has_ema:
            cells.append(
                format_mean_std(
                    r["ema_best_top1_mean"] if r["ema_best_top1_mean"] is not None else math.nan, r["ema_best_top1_std"]
                )
            )
        cells += [format_seconds(r["wall_time_s_mean"]), format_count(r["extra_parameters"])]
        if has_other:
            cells.append(r["other"] or "-")
        cells.append(", ".join(Path(p).name for p in r["runs"]))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    lines.append(
        "top-1 in %: mean ± sample std (n - 1) over the runs of a row; runs share a row when their configs "
        "differ only in the seed (or run name, output directory, device). Wall time: mean per run."
    )
    return "\n".join(lines)


CSV_FIELDS = [
    "teacher",
    "student",
    "method",
    "method_args",
    "epochs",
    "seeds",
    "n",
    "last_top1_mean",
    "last_top1_std",
    "best_top1_mean",
    "best_top1_std",
    "ema_best_top1_mean",
    "ema_best_top1_std",
    "wall_time_s_mean",
    "extra_parameters",
    "other",
    "runs",
]


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        out = dict(row)
        out["seeds"] = " ".join(str(s) for s in row["seeds"])
        out["runs"] = " ".join(row["runs"])
        writer.writerow({k: _csv_value(out.get(k)) for k in CSV_FIELDS})
    write_text_atomic(path, handle.getvalue(), hint=RERUN_HINT)


def _cmd_report(args: argparse.Namespace) -> int:
    rows = report_rows(args.run_dirs)
    print(markdown_table(rows))
    for line in repeated_seed_warnings(rows):
        print(f"crossdistill: {line}", file=sys.stderr)
    if args.csv:
        write_csv(rows, args.csv)
        print(f"\nwrote {args.csv}", file=sys.stderr)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="markdown table across runs (seeds grouped: mean ± std)",
        description="Summarise runs as a markdown table: teacher, student, method, its hyper-parameters, seeds, "
        "last/best top-1 as mean ± std over seeds, wall time, extra parameters.",
    )
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (a directory holding runs, e.g. runs/, stands for all of them)",
    )
    p.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    p.set_defaults(func=_cmd_report)
    return p
