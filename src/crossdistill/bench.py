"""``crossdistill bench``: time our training step against the official-code reference step, in one process.

Variants, each with its own models and optimiser, timed interleaved on random data (every round
times each variant once, the variants of a ratio next to each other, the order reversed every
other round), median over many steps after warm-up:

* ``ours``: the step exactly as the engine runs it (:class:`~crossdistill.engine.step.TrainStep`, built by
  :func:`~crossdistill.engine.step.build_train_step` as the Trainer builds it:
  teacher outputs in inference mode, autocast per ``--amp``, channels_last, ``torch.compile``,
  fused optimiser on CUDA, the finiteness check);
* ``reference``: RSD as the official code runs it: fp32, eager, teacher under ``no_grad`` in eval
  mode, student forward, AAD, the RSD loss written out from its formula, backward, SGD step;
* ``student_only``: the student alone with cross-entropy, through the engine's step (the floor
  when the teacher costs nothing);
* ``teacher_forward``: the teacher's forward alone, as ``ours`` runs it;
* ``ours_precomputed_teacher``: ``ours`` with the teacher's outputs given (a fixed tensor): the
  student plus the method's own cost (for RSD: AAD and loss);
* ``ours_cached``: ``ours`` with the teacher outputs of a real teacher-output cache on disk (a
  temporary directory, fp16, a different batch of rows every step), read as the engine's loader
  workers read them (outside the step) and copied to the device in the step.

Ratios (``ratios``) are medians of per-round ratios (each round times every variant once, so
machine-load drift cancels); ``ratios_of_medians`` divides the variants' median times.
On CUDA, steps are timed with CUDA events in blocks of ``--block`` consecutive steps (so the
host can queue ahead as in training) and peak memory is ``torch.cuda.max_memory_allocated``
above what was allocated before the block; on CPU, wall time per step and no per-variant memory
(the process's peak RSS is reported).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import timm
import torch
from torch import nn

from .config import OptimConfig, RunConfig, TrainConfig
from .distillers import METHODS, build_distiller, method_config
from .engine.distributed import resolve_device
from .engine.setup import autocast_dtype, make_criterion
from .engine.step import TrainStep, build_train_step
from .engine.teacher_cache import TeacherCache, cache_widths
from .engine.teacher_runner import TeacherRunner
from .errors import CrossDistillError
from .models import AADProjector, Teacher, TeacherOutputs, check_model_name, embedding_dim
from .params import parse_method_args

STD_EPS = 1e-5


# ---------------------------------------------------------------- the reference step (official code)


def reference_rsd_loss(z_s: torch.Tensor, z_t: torch.Tensor, kappa: float = 0.01) -> torch.Tensor:
    """The RSD loss as the official code computes it (written out here, independent of crossdistill.losses)."""
    batch = z_s.shape[0]
    zs = (z_s - z_s.mean(0)) / (z_s.std(0, unbiased=False) + STD_EPS)
    zt = (z_t - z_t.mean(0)) / (z_t.std(0, unbiased=False) + STD_EPS)
    c = zt.T @ zs / batch
    diag = torch.diagonal(c)
    on_diag = (diag - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + kappa * off_diag


class ReferenceStep:
    """fp32 eager RSD step as the official code runs it."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        weight: float = 0.1,
        kappa: float = 0.01,
        gamma: int = 2,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 2e-3,
        label_smoothing: float = 0.1,
    ):
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student.train()
        device = next(student.parameters()).device
        self.aad = AADProjector(embedding_dim(student), embedding_dim(teacher), gamma).to(device).train()
        self.weight, self.kappa = weight, kappa
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        params = list(self.student.parameters()) + list(self.aad.parameters())
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z_t = self.teacher.forward_head(self.teacher.forward_features(images), pre_logits=True)
        z_s = self.student.forward_head(self.student.forward_features(images), pre_logits=True)
        logits = self.student.get_classifier()(z_s)
        loss = self.criterion(logits, target) + self.weight * reference_rsd_loss(self.aad(z_s), z_t, self.kappa)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss


# ---------------------------------------------------------------- set-up


def create_model_for_size(name: str, num_classes: int, img_size: int) -> nn.Module:
    """A randomly initialised timm model for ``img_size`` inputs (``img_size=`` where the model takes it)."""
    check_model_name(name)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


@dataclass
class Variant:
    name: str
    fn: Callable[[], Any]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None

    def summary(self, batch: int) -> dict[str, Any]:
        if not self.times:
            return {"steps": 0}
        median = statistics.median(self.times)
        q = statistics.quantiles(self.times, n=4) if len(self.times) >= 2 else [median, median, median]
        out = {
            "img_per_s": batch / median,
            "step_ms_median": 1e3 * median,
            "step_ms_iqr": [1e3 * q[0], 1e3 * q[2]],
            "steps": len(self.times),
            "peak_mem_mb": None if self.peak_bytes is None else self.peak_bytes / 2**20,
        }
        if self.cpu_times:
            out["cpu_ms_median"] = 1e3 * statistics.median(self.cpu_times)
            out["img_per_cpu_s"] = batch / statistics.median(self.cpu_times)
        return out


class _GivenTeacher(TeacherRunner):
    """A runner that returns fixed, precomputed outputs (the method's own cost, teacher excluded)."""

    def __init__(self, distiller, cache=None, compile: bool = False, *, given: TeacherOutputs):
        super().__init__(distiller)
        self.given = given

    def compute(self, images: torch.Tensor) -> TeacherOutputs:
        return self.given


STAND_IN_TRAINING_SET = 50_000
"""The training-set size a method keyed by sample (CRD's memory banks) is bound to in the bench: CIFAR's."""


def _engine_step(
    distiller: nn.Module, train: TrainConfig, optim: OptimConfig, device: torch.device, num_classes: int = 0, **settings
) -> TrainStep:
    """The engine's step for ``distiller`` (:func:`~crossdistill.engine.step.build_train_step`, as the Trainer
    builds it), in training mode as the loop puts it at each epoch's start. A method that needs indices is first
    bound to a stand-in training set of :data:`STAND_IN_TRAINING_SET` samples of ``num_classes`` classes."""
    if distiller.needs_indices:
        distiller.bind_training_set([i % num_classes for i in range(STAND_IN_TRAINING_SET)], 0)
    step = build_train_step(distiller, train, optim, device, **settings)
    step.model.train()
    return step


def _as_engine(step: TrainStep, images, target, indices=None, prefetched=None) -> None:
    """Run ``step`` as the engine's loop does, including its periodic collection of deferred finiteness flags."""
    step(images, target, indices, prefetched=prefetched)
    if len(step.pending) >= step.finite_check_every:
        step.collect_nonfinite()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    teacher: str,
    student: str,
    *,
    img_size: int = 224,
    batch_size: int = 32,
    method: str = "rsd",
    method_args: dict[str, Any] | None = None,
    num_classes: int = 100,
    steps: int | None = None,
    warmup: int | None = None,
    block: int | None = None,
    device: str = "auto",
    amp: str = "auto",
    channels_last: bool | None = None,
    compile: bool = False,
    check_finite: bool = True,
    cache: bool = True,
    precomputed: bool = True,
    max_seconds: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time the variants (see the module doc) and return the results as a JSON-able dict."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    steps = steps if steps is not None else (50 if on_cuda else 20)
    warmup = warmup if warmup is not None else (5 if on_cuda else 2)
    block = block if block is not None else (4 if on_cuda else 1)
    if max_seconds is None:
        max_seconds = 120.0 if on_cuda else 75.0
    if batch_size < 2:
        raise CrossDistillError("--batch-size must be >= 2 (the RSD loss standardises over the batch)")
    if steps < 1 or warmup < 0 or block < 1:
        raise CrossDistillError("--steps and --block must be >= 1, --warmup >= 0")
    if img_size < 8:
        raise CrossDistillError(f"--img-size must be >= 8, got {img_size}")
    if threads is not None:
        if threads < 1:
            raise CrossDistillError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    method_cls = METHODS.get(method)
    cfg_args = method_config(method, method_args or {})
    if channels_last is None:
        channels_last = TrainConfig().channels_last
    train = TrainConfig(amp=amp, channels_last=channels_last, compile=compile, check_finite=check_finite)
    optim = OptimConfig(opt="sgd", lr=0.05, weight_decay=2e-3, momentum=0.9)
    criterion = make_criterion(RunConfig(train=train))
    autocast = autocast_dtype(amp, dev)  # also checks fp16 needs CUDA

    torch.manual_seed(seed)
    teacher_model = create_model_for_size(teacher, num_classes, img_size)
    student_model = create_model_for_size(student, num_classes, img_size)
    images = torch.randn(batch_size, 3, img_size, img_size)
    target = torch.randint(0, num_classes, (batch_size,))

    def fresh_teacher() -> Teacher:
        return Teacher(copy.deepcopy(teacher_model))

    variants: list[Variant] = []

    # ours
    ours_distiller = build_distiller(
        method,
        copy.deepcopy(student_model),
        fresh_teacher() if method_cls.needs_teacher else None,
        cfg_args,
        criterion=criterion,
    )
    ours = _engine_step(ours_distiller, train, optim, dev, num_classes)
    x_ours, y_ours = ours.to_device(images, target)
    indices = torch.arange(batch_size) if method_cls.needs_indices else None
    variants.append(Variant("ours", lambda: _as_engine(ours, x_ours, y_ours, indices)))

    # reference: fp32, eager, official RSD
    rsd_defaults = method_config("rsd", {})
    ref_args = cfg_args if method == "rsd" else rsd_defaults
    reference = ReferenceStep(
        copy.deepcopy(teacher_model).to(dev),
        copy.deepcopy(student_model).to(dev),
        weight=ref_args.weight,
        kappa=ref_args.kappa,
        gamma=ref_args.gamma,
    )
    x_ref, y_ref = images.to(dev), target.to(dev)
    variants.append(Variant("reference", lambda: reference(x_ref, y_ref)))

    # student alone, through the engine
    vanilla = build_distiller("vanilla", copy.deepcopy(student_model), None, {}, criterion=criterion)
    student_step = _engine_step(vanilla, train, optim, dev)
    x_s, y_s = student_step.to_device(images, target)
    variants.append(Variant("student_only", lambda: _as_engine(student_step, x_s, y_s)))

    # teacher forward alone, as ours runs it
    # (a method without a teacher: RSD's teacher forward, the embedding)
    teacher_reader = build_distiller(
        method if ours.teacher is not None else "rsd",
        copy.deepcopy(student_model),
        fresh_teacher(),
        cfg_args if ours.teacher is not None else rsd_defaults,
        criterion=criterion,
    )
    teacher_runner = _engine_step(teacher_reader, train, optim, dev, num_classes).teacher
    x_t, _ = ours.to_device(images, target)

    def teacher_only():
        with ours.autocast():
            return teacher_runner.compute(x_t)

    variants.append(Variant("teacher_forward", teacher_only))

    tmp = None
    if ours.teacher is not None and precomputed:
        with ours.autocast():
            given = teacher_runner.compute(x_t).map(lambda t: t.float() if t.is_floating_point() else t)
        pre_distiller = build_distiller(
            method, copy.deepcopy(student_model), fresh_teacher(), cfg_args, criterion=criterion
        )
        given_runner = functools.partial(_GivenTeacher, given=given)
        pre = _engine_step(pre_distiller, train, optim, dev, num_classes, runner=given_runner)
        x_p, y_p = pre.to_device(images, target)
        variants.append(Variant("ours_precomputed_teacher", lambda: _as_engine(pre, x_p, y_p, indices)))

        if cache and ours_distiller.teacher_cacheable:
            outputs = ours_distiller.teacher_request().outputs
            tmp = tempfile.TemporaryDirectory(prefix="crossdistill-bench-cache-")
            blocks = 8
            rows = blocks * batch_size
            widths = cache_widths(outputs, ours_distiller.teacher, num_classes)
            store = TeacherCache(
                tmp.name,
                {"teacher": {"name": teacher}, "bench": True},
                outputs,
                widths,
                rows,
                store_dtype="fp16",
                log=log,
            )
            store.begin_epoch(0)
            random_out = lambda x: TeacherOutputs(  # noqa: E731 - fill with random rows: only the read speed matters
                embedding=torch.randn(x.shape[0], widths["embedding"]) if "embedding" in widths else None,
                logits=torch.randn(x.shape[0], widths["logits"]) if "logits" in widths else None,
            )
            for b in range(blocks):
                store.lookup(torch.arange(b * batch_size, (b + 1) * batch_size), images, random_out)
            cached_distiller = build_distiller(
                method, copy.deepcopy(student_model), fresh_teacher(), cfg_args, criterion=criterion
            )
            cached = _engine_step(cached_distiller, train, optim, dev, num_classes, cache=store)
            x_c, y_c = cached.to_device(images, target)
            # as in training: the loader's workers read the rows (WithIndex) and pin them with the batch;
            # the step copies them to the device
            row_order = torch.randperm(rows).tolist()
            loaded = []
            for b in range(blocks):
                items = [store.read_rows(i) for i in row_order[b * batch_size : (b + 1) * batch_size]]
                batch_rows = {k: torch.from_numpy(np.stack([r[k] for r, _ in items])) for k in outputs}
                if on_cuda:
                    batch_rows = {k: v.pin_memory() for k, v in batch_rows.items()}
                loaded.append(
                    (
                        torch.tensor(row_order[b * batch_size : (b + 1) * batch_size]),
                        (batch_rows, torch.tensor([ok for _, ok in items])),
                    )
                )
            counter = {"i": 0}

            def cached_step():
                indices, prefetched = loaded[counter["i"] % blocks]
                counter["i"] += 1
                return _as_engine(cached, x_c, y_c, indices, prefetched)

            variants.append(Variant("ours_cached", cached_step))

    # warm-up (compiles, allocator, oneDNN primitives)
    log(
        f"bench: {teacher} -> {student} ({method}), batch {batch_size}, {img_size} px, {dev}"
        f"{' (' + torch.cuda.get_device_name(dev) + ')' if on_cuda else ''}, amp {autocast or 'off'}, "
        f"channels_last {channels_last}, compile {compile}; warm-up {warmup} step(s) per variant"
    )
    for variant in variants:
        for _ in range(warmup):
            variant.fn()
        _sync(dev)

    # timed rounds, interleaved: the variants compared in the ratios run next to each other (ours by the
    # reference, the cached and precomputed steps on either side of the student alone), in reversed
    # order every other round, so that a change of machine load hits both sides of a ratio alike
    adjacency = ["ours", "reference", "ours_cached", "student_only", "ours_precomputed_teacher", "teacher_forward"]
    variants.sort(key=lambda v: adjacency.index(v.name))
    rounds = 0
    deadline = time.perf_counter() + max_seconds
    while rounds < steps:
        order = variants if rounds % 2 == 0 else variants[::-1]
        for variant in order:
            variant.times.append(_time_block(variant, block, dev))
        rounds += 1
        if time.perf_counter() > deadline and rounds >= 3:
            log(f"bench: time budget of {max_seconds:.0f}s reached after {rounds} round(s)")
            break

    by_name = {v.name: v for v in variants}
    result_variants = {v.name: v.summary(batch_size) for v in variants}

    def paired(a: str, b: str, clock: str = "times") -> float | None:
        """Median over rounds of time(b)/time(a) (= images/s of a over images/s of b)."""
        if a not in by_name or b not in by_name or not getattr(by_name[a], clock):
            return None
        return statistics.median(tb / ta for ta, tb in zip(getattr(by_name[a], clock), getattr(by_name[b], clock)))

    def paired_cpu(a: str, b: str) -> float | None:
        return paired(a, b, "cpu_times")

    def of_medians(a: str, b: str) -> float | None:
        if a not in by_name or b not in by_name:
            return None
        return statistics.median(by_name[b].times) / statistics.median(by_name[a].times)

    def overhead(pick: Callable[[str, str], float | None]) -> float | None:
        ratio = pick("ours_precomputed_teacher", "student_only")
        return None if ratio is None else 1.0 / ratio - 1.0

    pairs = {
        "ours_over_reference": ("ours", "reference"),
        "ours_over_student_only": ("ours", "student_only"),
        "cached_over_student_only": ("ours_cached", "student_only"),
        "cached_over_reference": ("ours_cached", "reference"),
        "teacher_forward_over_ours": ("teacher_forward", "ours"),
    }
    ratios = {k: paired(*v) for k, v in pairs.items()}
    ratios["method_overhead"] = overhead(paired)
    medians = {k: of_medians(*v) for k, v in pairs.items()}
    medians["method_overhead"] = overhead(of_medians)
    cpu_ratios = None
    if not on_cuda:
        cpu_ratios = {k: paired_cpu(*v) for k, v in pairs.items()}
        cpu_ratios["method_overhead"] = overhead(paired_cpu)
        cpu_ratios["teacher_share_of_ours"] = 1.0 / cpu_ratios.pop("teacher_forward_over_ours")
    # teacher_forward_over_ours is in images/s: invert to get the teacher's share of our step time
    ratios["teacher_share_of_ours"] = 1.0 / ratios.pop("teacher_forward_over_ours")
    medians["teacher_share_of_ours"] = 1.0 / medians.pop("teacher_forward_over_ours")
    if tmp is not None:
        store.close()
        tmp.cleanup()
    return {
        "config": {
            "teacher": teacher,
            "student": student,
            "method": method,
            "method_args": dict(cfg_args.__dict__),
            "img_size": img_size,
            "batch_size": batch_size,
            "num_classes": num_classes,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if on_cuda else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "amp": str(autocast).replace("torch.", "") if autocast else "none",
            "channels_last": channels_last,
            "compile": compile,
            "check_finite": check_finite,
            "steps": rounds,
            "warmup": warmup,
            "block": block,
            "torch": torch.__version__,
            "timm": timm.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "variants": result_variants,
        "ratios": ratios,
        "ratios_of_medians": medians,
        "ratios_cpu_time": cpu_ratios,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if not on_cuda else None,
        "wall_s": time.perf_counter() - started,
        "notes": (
            "ratios: median over rounds of paired ratios (images/s of the first over the second); "
            "ratios_cpu_time (CPU only): the same on the process's CPU time, robust to other processes "
            "sharing the machine; "
            "method_overhead: step time of ours with a precomputed teacher over student_only, minus 1; "
            "teacher_share_of_ours: teacher forward time over our step time"
        ),
    }


def _time_block(variant: Variant, block: int, device: torch.device) -> float:
    """Seconds per step over ``block`` consecutive steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(block):
            variant.fn()
        end.record()
        end.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
        variant.peak_bytes = max(variant.peak_bytes or 0, peak)
        return start.elapsed_time(end) / 1e3 / block
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(block):
        variant.fn()
    variant.cpu_times.append((time.process_time() - c0) / block)
    return (time.perf_counter() - t0) / block


# ---------------------------------------------------------------- CLI


LABELS = {
    "ours": "ours (engine step)",
    "reference": "reference (official, fp32 eager)",
    "student_only": "student alone (CE)",
    "teacher_forward": "teacher forward alone",
    "ours_precomputed_teacher": "ours, teacher output given",
    "ours_cached": "ours, teacher cache (fp16)",
}


def format_result(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"{c['teacher']} -> {c['student']} | {c['method']} | batch {c['batch_size']} | {c['img_size']} px | "
        f"{c['device']} ({c['device_name']}, {c['threads']} threads) | amp {c['amp']} | channels_last "
        f"{c['channels_last']} | compile {c['compile']} | {c['steps']} steps x {c['block']}, median",
        f"{'variant':<36}{'img/s':>10}{'ms/step':>11}{'peak MiB':>11}",
    ]
    for name, v in result["variants"].items():
        if not v.get("steps"):
            continue
        mem = "n/a" if v["peak_mem_mb"] is None else f"{v['peak_mem_mb']:.0f}"
        lines.append(f"{LABELS.get(name, name):<36}{v['img_per_s']:>10.1f}{v['step_ms_median']:>11.1f}{mem:>11}")
    cpu = result.get("ratios_cpu_time")
    lines.append(
        "ratios (median of per-round ratios; of medians in brackets"
        + ("; on CPU time, robust to other processes, after the bar" if cpu else "")
        + "):"
    )

    def show(key, value):
        if value is None:
            return "n/a"
        return f"{100 * value:+.1f}%" if key == "method_overhead" else f"{value:.3f}"

    for key, value in result["ratios"].items():
        line = f"  {key:<28} {show(key, value)} ({show(key, result['ratios_of_medians'].get(key))})"
        if cpu:
            line += f" | {show(key, cpu.get(key))}"
        lines.append(line)
    if result.get("peak_rss_mb") is not None:
        lines.append(
            f"process peak RSS {result['peak_rss_mb']:.0f} MiB (per-variant memory: n/a on CPU) | "
            f"wall {result['wall_s']:.0f}s"
        )
    return "\n".join(lines)


def _cmd_bench(args: argparse.Namespace) -> int:
    result = run_bench(
        args.teacher,
        args.student,
        img_size=args.img_size,
        batch_size=args.batch_size,
        method=args.method,
        method_args=parse_method_args(args.set),
        num_classes=args.num_classes,
        steps=args.steps,
        warmup=args.warmup,
        block=args.block,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        check_finite=not args.no_check_finite,
        cache=not args.no_cache,
        precomputed=not args.no_precomputed,
        max_seconds=args.max_seconds,
        seed=args.seed,
        threads=args.threads,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time a distillation training step against the official-code reference step",
        description="Time one training step (forward, backward, optimiser) of a method for a teacher/student pair "
        "on random data, interleaved with the official RSD step (fp32 eager), the student alone, the "
        "teacher forward alone, and our step with a precomputed / cached teacher output. "
        "See docs/PERFORMANCE.md.",
    )
    p.add_argument("--teacher", required=True, help="timm model name")
    p.add_argument("--student", required=True, help="timm model name")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--method", default="rsd")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method argument, e.g. kappa=0.02")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 2 CPU, 5 GPU)")
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="consecutive steps per timing (default 1 on CPU, 4 on GPU: lets the host queue ahead)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop timing rounds after this long, set-up and warm-up not counted (at least 3 rounds; "
        "default 75 on CPU, 120 on GPU)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "none", "bf16", "fp16"),
        help="autocast of our step (auto: bf16 on GPUs that have it, fp16 on others, off on CPU)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=TrainConfig().channels_last,
        help="channels_last memory format in our step (default: the engine's, train.channels_last)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile our step's models")
    p.add_argument("--no-check-finite", action="store_true", help="our step without train.check_finite")
    p.add_argument("--no-cache", action="store_true", help="skip the teacher-cache variant")
    p.add_argument(
        "--no-precomputed",
        action="store_true",
        help="skip the precomputed-teacher and teacher-cache variants (and the method overhead)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (torch.set_num_threads); 1 makes CPU-time ratios robust on a shared machine",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON (ratios.ours_over_reference, ...)")
    p.set_defaults(func=_cmd_bench)
    return p
