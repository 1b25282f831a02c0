"""Command line: ``crossdistill {train,eval,params,demo,sweep,tune,...}`` (also ``python -m crossdistill``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

import timm
import torch

from . import bench, export, plots, report
from .analysis import cli as analysis_cli
from .config import load_config
from .demo import run_demo
from .engine import train
from .engine.dryrun import dry_run
from .engine.preemption import EXIT_PREEMPTED, Preempted
from .errors import CrossDistillError, one_line
from .evaluation import evaluate_checkpoint
from .params import count_method_parameters
from .search import sweep as search_sweep
from .search import tune as search_tune
from .version import __version__


def _cmd_train(args: argparse.Namespace) -> int:
    config = args.config
    resume = args.resume is not None
    if config is not None and isinstance(args.resume, str):
        if "=" in args.resume and not Path(args.resume).exists():
            args.overrides = [args.resume, *args.overrides]  # `--resume key=value`: argparse gave --resume the override
        else:
            raise CrossDistillError(
                f"--resume {args.resume} with --config: give one of them. --resume RUN_DIR alone continues a run with "
                "its own config.yaml; --config FILE --resume continues the run that FILE's train.output_dir and "
                "train.run_name name"
            )
    if config is None:
        if not isinstance(args.resume, str):
            raise CrossDistillError("train needs --config FILE.yaml (or --resume RUN_DIR to continue a run)")
        run_dir = Path(os.path.abspath(args.resume))  # "." or "runs/r/..": its real name, not an empty one
        config = run_dir / "config.yaml"
        args.overrides = [f"train.output_dir={run_dir.parent}", f"train.run_name={run_dir.name}", *args.overrides]
    notes: list[str] = []
    cfg = load_config(config, args.overrides, notes=notes)
    for note in notes:
        print(f"crossdistill: note: {note}", file=sys.stderr, flush=True)
    if args.dry_run:
        dry_run(cfg, resume=resume, overwrite=args.overwrite)
        return 0
    summary = train(cfg, resume=resume, overwrite=args.overwrite)
    if args.json and os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.__dict__.items() if k != "history"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(
        args.checkpoint,
        model=args.model,
        config=args.config,
        overrides=args.overrides,
        dataset=args.data,
        root=args.data_root,
        img_size=args.img_size,
        use_ema=args.ema,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['model']} on {result['dataset']} ({result['samples']} images): "
            f"top-1 {result['top1']:.2f} | top-5 {result['top5']:.2f}"
        )
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    result = count_method_parameters(
        args.method,
        args.teacher,
        args.student,
        args.num_classes,
        method_args=args.set,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"method {result['method']}: {result['teacher']} -> {result['student']} ({result['num_classes']} classes)"
        )
        print(f"  student parameters       {result['student_parameters'] / 1e6:9.3f}M")
        print(
            f"  extra trainable params   {result['extra_trainable_parameters'] / 1e6:9.3f}M"
            f"  ({result['extra_over_student']:.2f}x the student)"
        )
        for name, count in result["extra_by_module"].items():
            print(f"    {name:<22} {count / 1e6:9.3f}M")
        if result.get("teacher_parameters") is not None:
            print(f"  teacher parameters       {result['teacher_parameters'] / 1e6:9.3f}M (frozen)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(output_dir=args.output_dir, epochs=args.epochs, overwrite=not args.keep)
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser whose positionals (key=value overrides, run directories) may stand before,
    between and after its options: ``train --config x.yaml a=1 --dry-run b=2`` (argparse alone takes
    the positionals of one run of them only, and calls the rest unrecognized)."""

    def parse_known_args(self, args=None, namespace=None):
        positionals = self._get_positional_actions()
        intermixable = positionals and all(a.nargs not in (argparse.PARSER, argparse.REMAINDER) for a in positionals)
        if not intermixable or getattr(self, "_intermixing", False):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls this method back for its two passes
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def version_line() -> str:
    python = sys.version.split()[0]
    return f"crossdistill {__version__} (torch {torch.__version__}, timm {timm.__version__}, Python {python})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossdistill",
        description="Cross-architecture knowledge distillation (RSD and baselines) for any timm teacher and student.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)

    p = sub.add_parser(
        "train",
        help="train one run from a YAML config",
        description="Train one run. Overrides use dotted keys: train.epochs=3 method_args.kappa=0.02",
    )
    p.add_argument("--config", "-c", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=64")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_DIR",
        help="continue the run from its last checkpoint (RUN_DIR alone re-uses its saved config)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start an existing run again (deletes only the files a run wrote there)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything a run checks before its first step (config, run directory, data, weights, lr, "
        "one step on a tiny random batch) and print what it would use, without writing anything",
    )
    p.add_argument("--json", action="store_true", help="print the run summary as JSON at the end")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset")
    p.add_argument("--checkpoint", required=True, help="a run's best.pt/last.pt, or any timm-format weights file")
    p.add_argument("--model", help="timm model name (default: the student of the run that wrote the checkpoint)")
    p.add_argument("--config", help="take data settings from this run config")
    p.add_argument("--data", help="dataset: digits, cifar10, cifar100, folder")
    p.add_argument("--data-root", help="dataset directory or archive")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights stored in a run checkpoint")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the data config, e.g. data.eval_split=val")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("params", help="student size and extra trainable parameters of a method")
    p.add_argument("--method", default="rsd")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method argument, e.g. gamma=4")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "demo",
        help="a ResNet teacher, a ViT student alone, with KD and with RSD on scikit-learn's digits (CPU, ~2.5 min)",
    )
    p.add_argument("--output-dir", default="demo_runs")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the recipe's)")
    p.add_argument("--keep", action="store_true", help="refuse to replace earlier demo runs instead of replacing them")
    p.set_defaults(func=_cmd_demo)

    for module in (export, analysis_cli, plots, report, bench, search_sweep, search_tune):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CrossDistillError as err:
        if args.debug:
            traceback.print_exc()
        print(f"crossdistill: error: {one_line(err)}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"crossdistill: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt as stop:
        print(f"crossdistill: {str(stop) or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
