#!/usr/bin/env python
"""Cross-architecture accuracy study (issue 7): does RSD beat KD, DKD, DIST, FitNet and OFA on real images?

On CIFAR-10 at native 32 px (the JPEG copy at ``../shared/data/cifar10_jpg.tar.gz``, or any
ImageFolder / CIFAR path with ``--data-root``), the study

1. starts from two teachers of different families, a ResNet-18-style CNN and a ViT: the kept ones
   (``benchmarks/accuracy/teachers/``, trained once to convergence: ``study_teachers.py``) where there are
   any, else trained from scratch in the study (always with ``--train-teachers``);
2. distils three cross-architecture pairs, CNN -> ViT, ViT -> CNN and CNN -> ResMLP (an MLP
   student), with every method of ``vanilla kd dkd dist fitnet ofa crd rkd cc at rsd`` that this
   installation has (``crossdistill.METHODS``), 3 seeds per cell;
3. runs a lambda x kappa grid for RSD on one pair (one seed);
4. writes ``RESULTS.md`` (tables: mean ± sample std over seeds of last- and best-epoch top-1), a bar
   chart and the sensitivity heat map into ``--docs-dir``.

Every run is an ordinary crossdistill run directory ``<out>/<run name>`` (config.yaml,
summary.json, metrics.csv, checkpoints); the YAML of every planned run is also written to
``<out>/configs/`` so each can be rerun alone with ``python benchmarks/accuracy/study_models.py train
--config`` (``crossdistill`` with the study's ResMLP student and kept ResNet teacher registered). A run
whose summary.json exists is skipped, an interrupted one is resumed from its checkpoint: the study can be run in chunks
(``--only teachers``, ``--only pair=vit-resnet``, ...) or simply re-invoked. The runs are trained by
the workers of ``crossdistill sweep`` (``--jobs`` processes, each taking the next run that is
neither finished nor claimed; the teachers first).

Protocols (``--protocol``):

* ``cpu``: the whole study (2 teachers, 99 table runs, 8 more grid runs) in at most 90 minutes on 2 CPU
  cores: 5,000 class-balanced training images, 6 epochs per student and 15 per teacher, every epoch
  evaluated on 5,000 class-balanced test images, two runs at a time with one torch thread each;
  planned at 89.5 minutes on a free machine from the speeds in ``study_protocols.SPEEDS``.
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

The program is split into four modules beside this entry point: ``study_protocols`` (models, pairs, methods,
protocols, measured speeds), ``study_plan`` (the runs, their configs, selection and time estimates),
``study_run`` (training the runs, the study log, ``--check-build``, ``--calibrate``) and ``study_report``
(the results page and its charts).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the study_* modules beside this file (study_models registers the ResMLP student)

from study_plan import (  # noqa: E402
    Settings,
    available_methods,
    build_plan,
    detect_dataset,
    dry_list,
    is_done,
    parse_only,
    select,
)
from study_protocols import DEFAULT_DATA, PAIRS, PROTOCOLS, REPO, Protocol  # noqa: E402
from study_report import write_report  # noqa: E402
from study_run import (  # noqa: E402
    calibrate,
    check_build,
    check_teachers,
    record_kept,
    run_invocation,
)
from study_teachers import TEACHERS_DIR, KeptTeacher, KeptTeacherError, kept_teachers, verify  # noqa: E402

# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Protocols:\n" + "\n".join(f"  {k}: {v.summary}" for k, v in PROTOCOLS.items()),
    )
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    ap.add_argument(
        "--out", type=Path, default=None, help="output folder of the runs (default runs/accuracy-<protocol>)"
    )
    ap.add_argument(
        "--docs-dir",
        type=Path,
        default=None,
        help="where RESULTS*.md and the PNGs go (default docs/; the tiny protocol: <out>/docs)",
    )
    ap.add_argument(
        "--data-root",
        default=None,
        help=f"CIFAR-10 ImageFolder tree or .tar.gz of one, or a torchvision CIFAR folder (default {DEFAULT_DATA})",
    )
    ap.add_argument("--dataset", default="auto", choices=("auto", "folder", "cifar10", "cifar100"))
    ap.add_argument("--cache-dir", default=None, help="data.cache_dir: where decoded archives are cached")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SEL",
        help="train only these runs: teachers | cells | sensitivity | pair=NAME | method=NAME | seed=N | "
        "run=NAME (repeat or comma-separate; different keys must all match)",
    )
    ap.add_argument("--methods", default=None, help="comma-separated methods instead of the protocol's")
    ap.add_argument(
        "--dry-list", action="store_true", help="print the planned runs and the estimated time; train nothing"
    )
    ap.add_argument(
        "--check-build",
        action="store_true",
        help="validate every planned config and build each model/method combination once (no data)",
    )
    ap.add_argument("--report-only", action="store_true", help="only (re)write the results page from finished runs")
    ap.add_argument("--no-report", action="store_true", help="do not write the results page")
    ap.add_argument("--calibrate", action="store_true", help="time one short epoch of every combination")
    ap.add_argument("--calibrate-images", type=int, default=1024)
    ap.add_argument("--device", default=None, help="override the protocol's device (cpu, cuda, auto)")
    ap.add_argument("--jobs", type=int, default=None, help="runs at a time (default: the protocol's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run (default: the protocol's)")
    ap.add_argument("--no-teacher-cache", action="store_true", help="run the teacher every step")
    ap.add_argument(
        "--train-teachers",
        action="store_true",
        help="train the teachers as part of the study instead of starting from the kept ones "
        "(benchmarks/accuracy/teachers/)",
    )
    ap.add_argument(
        "--teachers-dir",
        type=lambda text: Path(text).expanduser().resolve(),
        default=TEACHERS_DIR,
        help="where the kept teachers are (<key>.safetensors and <key>.json; default benchmarks/accuracy/teachers)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run (e.g. train.epochs=1 for a quick check); the results "
        "page then says that these are not the protocol's settings",
    )
    return ap.parse_args(argv)


def teacher_cache_supported() -> bool:
    from crossdistill.config import TrainConfig

    return "teacher_cache" in {f.name for f in dataclasses.fields(TrainConfig)}


def kept_for(protocol: Protocol, train_teachers: bool, directory: Path) -> dict[str, KeptTeacher]:
    """The kept teachers this run of ``protocol`` starts from, checked against their SHA-256."""
    if train_teachers or not protocol.kept_teachers:
        return {}
    wanted = {PAIRS[pair][0] for pair in protocol.pairs}
    try:
        kept = {key: t for key, t in kept_teachers(directory).items() if key in wanted}
        for t in kept.values():
            verify(t)
    except KeptTeacherError as err:
        raise SystemExit(f"run_study.py: {err}") from None
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
    settings = Settings(
        protocol=protocol,
        out=out,
        data_root=data_root,
        dataset=dataset,
        cache_dir=args.cache_dir,
        teacher_cache=(protocol.teacher_cache and not args.no_teacher_cache and teacher_cache_supported()),
        device=device,
        methods=methods,
        jobs=jobs,
        threads=threads,
        overrides=tuple(args.set),
        kept=kept_for(protocol, args.train_teachers, args.teachers_dir),
    )
    if threads and (jobs <= 1 or args.calibrate):
        import torch

        torch.set_num_threads(threads)
    missing = [m for m in wanted if m not in methods]
    if missing:
        print(f"note: methods not in this installation, left out: {', '.join(missing)}", flush=True)
    if args.calibrate and settings.kept:
        raise SystemExit(
            "run_study.py: --calibrate measures the speeds of study_protocols.SPEEDS, which are keyed by the study's "
            "own teachers: add --train-teachers"
        )
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
            raise SystemExit(
                f"data not found: {data_root}; pass --data-root (an ImageFolder tree, a .tar.gz of one, "
                "or a torchvision CIFAR-10 folder)"
            )
        check_teachers(settings, selected)
        record_kept(settings)
        todo = [r for r in selected if not is_done(r)]
        skipped = len(selected) - len(todo)
        if skipped:
            print(f"{skipped} of {len(selected)} selected runs already finished (summary.json): skipped", flush=True)
        stopped = run_invocation(settings, todo, sys.argv[1:], "run_study.py")
        if stopped is not None:
            return stopped
    if args.report_only:
        check_teachers(settings, plan)  # the page must not put a kept teacher above students of another
    if not args.no_report:
        path = write_report(settings, plan, Path(docs_dir))
        print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
