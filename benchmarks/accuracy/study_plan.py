"""The accuracy study's plan: every run (teachers, the pairs x methods x seeds cells, the RSD grid) with its
crossdistill config, which runs the command line selects, and how long they should take (from the speeds of
``study_protocols.SPEEDS``, the workers' rules: runs at a time, teachers first)."""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from study_protocols import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    GPU_NOTE,
    MODELS,
    OFA_CNN_STUDENT,
    OPTIM,
    PAIRS,
    SPEEDS,
    Protocol,
    crd_negatives,
    method_defaults,
    rsd_default,
    teacher_model,
)
from study_teachers import KeptTeacher

# ------------------------------------------------------------------------------------------- the plan


@dataclass
class Run:
    name: str
    part: str  # teachers | cells | sensitivity
    method: str
    seed: int
    student: str  # MODELS key
    teacher: str | None  # MODELS key
    pairs: tuple[str, ...]  # pairs this run belongs to (a scratch run: every pair with its student)
    config: dict[str, Any]
    needs: tuple[str, ...] = ()  # run names that must have finished first
    grid: tuple[float, float] | None = None  # (lambda, kappa) of an RSD run
    est_s: float = 0.0

    @property
    def run_dir(self) -> Path:
        return Path(self.config["train"]["output_dir"]) / self.name


@dataclass
class Settings:
    protocol: Protocol
    out: Path
    data_root: str
    dataset: str
    cache_dir: str | None
    teacher_cache: bool
    device: str
    methods: tuple[str, ...]
    jobs: int
    threads: int | None = None
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE on every run (not the protocol: marked in the report)
    kept: Mapping[str, KeptTeacher] = field(default_factory=dict)  # teachers the students start from, by model key


def teacher_needs(s: Settings, teacher: str) -> tuple[str, ...]:
    """What a student of ``teacher`` waits for: the teacher's run, unless a kept teacher is used."""
    return () if teacher in s.kept else (teacher_run_name(teacher),)


def is_done(run: Run) -> bool:
    return (run.run_dir / "summary.json").is_file()


def is_done_name(s: Settings, name: str) -> bool:
    return (s.out / name / "summary.json").is_file()


def check_teacher_weights(s: Settings, names: Sequence[str]) -> None:
    """The finished teacher runs among ``names`` hold their weights: the archived run folders of
    ``benchmarks/accuracy/results/`` keep no checkpoints, and a student would fail on a missing one."""
    weightless = [n for n in dict.fromkeys(names) if is_done_name(s, n) and not (s.out / n / "last.pt").is_file()]
    if weightless:
        folders = " ".join(str(s.out / n) for n in weightless)
        raise SystemExit(
            f"{', '.join(weightless)}: finished in {s.out} but without its weights (last.pt; archived run folders "
            f"keep no checkpoints): delete {folders} to train it again (deterministic on CPU), or use another --out"
        )


def available_methods(wanted: Sequence[str]) -> tuple[str, ...]:
    from crossdistill import METHODS

    names = set(METHODS.names())
    return tuple(m for m in wanted if m in names)


def detect_dataset(root: str) -> str:
    path = Path(root)
    if path.is_file() or path.suffix in (".gz", ".tgz", ".tar", ".zip"):
        return "folder"
    if (path / "cifar-10-batches-py").is_dir():
        return "cifar10"
    if (path / "cifar-100-python").is_dir():
        return "cifar100"
    return "folder"


def teacher_run_name(key: str) -> str:
    return f"teacher-{key}"


def scratch_run_name(student: str, seed: int) -> str:
    return f"scratch-{student}-s{seed}"


def cell_run_name(pair: str, method: str, seed: int) -> str:
    return scratch_run_name(PAIRS[pair][1], seed) if method == "vanilla" else f"{pair}-{method}-s{seed}"


def grid_run_name(pair: str, weight: float, kappa: float, seed: int) -> str:
    if (weight, kappa) == rsd_default():
        return cell_run_name(pair, "rsd", seed)
    return f"sens-{pair}-w{weight:g}-k{kappa:g}-s{seed}"


def run_config(
    s: Settings, name: str, student: str, teacher: str | None, method: str, method_args: dict[str, Any], seed: int
) -> dict[str, Any]:
    p = s.protocol
    spec = MODELS[student]
    is_teacher_run = name.startswith("teacher-")
    mean_std = {} if s.dataset == "cifar100" else {"mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    data = {
        "dataset": s.dataset,
        "root": s.data_root,
        "img_size": 32,
        "train_subset": p.teacher_train_subset if is_teacher_run else p.train_subset,
        "eval_subset": p.eval_subset,
        "scale": list(p.scale),
        "hflip": 0.5,
        "train_interpolation": "bilinear",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        **mean_std,
        "num_workers": p.teacher_num_workers if is_teacher_run and p.teacher_num_workers is not None else p.num_workers,
    }
    if p.device_augment:
        data["device_augment"] = True
    if s.cache_dir:
        data["cache_dir"] = s.cache_dir
    train = {
        "epochs": p.teacher_epochs if is_teacher_run else p.epochs,
        "batch_size": p.batch_size,
        "seed": seed,
        "device": s.device,
        "amp": p.amp,
        "label_smoothing": 0.1,
        "output_dir": str(s.out),
        "run_name": name,
        "tensorboard": False,
        "progress": False,
        "eval_every": 1,
    }
    # channels_last: 1.5-2.5x faster ResNet training under oneDNN on 2 CPU cores (calibration below), and the
    # layout GPUs prefer for convolutions; set whenever a CNN is involved (student or teacher).
    cnn_teacher = teacher is not None and method != "vanilla" and MODELS[teacher].family == "cnn"
    if spec.family == "cnn" or cnn_teacher:
        train["channels_last"] = True
    if s.teacher_cache and teacher is not None and method != "vanilla":
        train["teacher_cache"] = str(s.out / "teacher_cache")
    cfg: dict[str, Any] = {
        "student": {"name": spec.name, "kwargs": copy.deepcopy(spec.kwargs)},
        "teacher": None,
        "method": method,
        "method_args": copy.deepcopy(method_args),
        "data": data,
        "optim": copy.deepcopy(OPTIM[spec.family]),
        "train": train,
    }
    if train["epochs"] < 3:  # a smoke-test schedule: no warm-up epoch (it would be the whole run)
        cfg["optim"]["warmup_epochs"] = 0
    if teacher is not None and method != "vanilla":
        t = teacher_model(teacher, kept=teacher in s.kept)
        cfg["teacher"] = {
            "name": t.name,
            "kwargs": copy.deepcopy(t.kwargs),
            "checkpoint": str(
                s.kept[teacher].weights if teacher in s.kept else s.out / teacher_run_name(teacher) / "last.pt"
            ),
        }
    return cfg


def method_args_for(method: str, student: str, protocol: Protocol) -> dict[str, Any]:
    args = method_defaults(method)
    if method == "ofa" and MODELS[student].family == "cnn":
        args.update(OFA_CNN_STUDENT)
    if method == "crd":
        args["num_negatives"] = crd_negatives(train_images(protocol))
    return args


def train_images(protocol: Protocol) -> int:
    """How many images a student run of ``protocol`` trains on (CIFAR's 50,000 without a subset)."""
    return protocol.train_subset or 50_000


def build_plan(s: Settings) -> list[Run]:
    p = s.protocol
    runs: dict[str, Run] = {}
    teachers = []
    for pair in p.pairs:
        t = PAIRS[pair][0]
        if t not in teachers:
            teachers.append(t)
    for t in teachers:
        if t in s.kept:
            continue
        name = teacher_run_name(t)
        runs[name] = Run(
            name,
            "teachers",
            "vanilla",
            0,
            t,
            None,
            tuple(pp for pp in p.pairs if PAIRS[pp][0] == t),
            run_config(s, name, t, None, "vanilla", {}, 0),
        )
    # seeds innermost: the workers take runs in this order, and runs side by side then differ in seed, so they
    # neither share teacher-cache files nor both compute the same teacher outputs
    for pair in p.pairs:
        teacher, student = PAIRS[pair]
        for method in s.methods:
            for seed in p.seeds:
                name = cell_run_name(pair, method, seed)
                if name in runs:
                    runs[name].pairs += (pair,)
                    continue
                args = method_args_for(method, student, p)
                t = None if method == "vanilla" else teacher
                runs[name] = Run(
                    name,
                    "cells",
                    method,
                    seed,
                    student,
                    t,
                    (pair,),
                    run_config(s, name, student, t, method, args, seed),
                    needs=teacher_needs(s, teacher) if t else (),
                    grid=rsd_default() if method == "rsd" else None,
                )
    if "rsd" in s.methods and p.grid_weights and p.grid_kappas:
        teacher, student = PAIRS[p.sens_pair]
        for weight in p.grid_weights:
            for kappa in p.grid_kappas:
                name = grid_run_name(p.sens_pair, weight, kappa, p.sens_seed)
                if name in runs:
                    continue
                args = dict(method_args_for("rsd", student, p), weight=weight, kappa=kappa)
                runs[name] = Run(
                    name,
                    "sensitivity",
                    "rsd",
                    p.sens_seed,
                    student,
                    teacher,
                    (p.sens_pair,),
                    run_config(s, name, student, teacher, "rsd", args, p.sens_seed),
                    needs=teacher_needs(s, teacher),
                    grid=(weight, kappa),
                )
    plan = list(runs.values())
    if s.overrides:
        from crossdistill.config import apply_overrides

        for run in plan:
            run.config = apply_overrides(run.config, s.overrides)
    estimate_plan(s, plan)
    return plan


def grid_runs(plan: Sequence[Run], protocol: Protocol) -> dict[tuple[float, float], Run]:
    """The runs of the sensitivity grid, by (lambda, kappa) (the default cell's run included)."""
    out = {}
    for run in plan:
        if (
            run.method == "rsd"
            and run.grid is not None
            and protocol.sens_pair in run.pairs
            and run.seed == protocol.sens_seed
        ):
            out[run.grid] = run
    return {k: v for k, v in out.items() if k[0] in protocol.grid_weights and k[1] in protocol.grid_kappas}


# ------------------------------------------------------------------------------------------ estimates


def _train_images(run: Run) -> int:
    n = run.config["data"]["train_subset"]
    if n is None:
        n = 50_000
    bs = run.config["train"]["batch_size"]
    return (n // bs) * bs  # drop_last


def _eval_images(run: Run) -> int:
    n = run.config["data"]["eval_subset"]
    return 10_000 if n is None else n


def speed_key(run: Run) -> str:
    return f"{run.student}|{run.teacher or '-'}|{run.method}"


@functools.cache
def teacher_outputs(method: str) -> tuple[str, ...]:
    """What the teacher cache stores for ``method`` at its default arguments, as the engine decides it: the
    method's own teacher request when it is cacheable (empty: nothing is cached, e.g. FitNet's teacher stage
    features). The study's one reader of the methods' teacher needs; asked of the method built on two tiny models
    (which outputs a shipped method reads does not depend on the models)."""
    import timm

    from crossdistill.distillers import METHODS, build_distiller
    from crossdistill.models import Teacher

    if not METHODS.get(method).needs_teacher:
        return ()
    size = 32
    student = timm.create_model("test_resnet", num_classes=10)
    teacher = Teacher(timm.create_model("test_vit", num_classes=10, img_size=size, patch_size=8))
    fields = {f.name for f in dataclasses.fields(METHODS.get(method).config_cls)}
    args = {"img_size": size} if "img_size" in fields else {}
    distiller = build_distiller(method, student, teacher, args)
    return distiller.teacher_request().outputs if distiller.teacher_cacheable else ()


def estimate_seconds(s: Settings, run: Run, teacher_cached: bool = False) -> float:
    """Seconds of one run on the protocol's reference machine: a fixed cost, then per epoch the training
    images at the measured speed of this (student, teacher, method) (the teacher's forward included,
    less it when the run reads the teacher's outputs from the cache) and the evaluation images."""
    table = SPEEDS[s.protocol.speed]
    train_ips = table["train"].get(speed_key(run), table["train"].get(run.method) if run.teacher else None)
    if train_ips is None:  # unmeasured combination: the student alone, slowed by a teacher forward
        alone = table["train"].get(f"{run.student}|-|vanilla", table["default_train"])
        train_ips = alone * (table.get("teacher_factor", 0.6) if run.teacher else 1.0)
    per_image = 1.0 / train_ips
    if teacher_cached and run.teacher in table["forward"]:
        per_image = max(0.5 * per_image, per_image - 1.0 / table["forward"][run.teacher])
    elif run.teacher in s.kept and run.teacher in table["forward"]:  # the kept architecture's slower forward
        per_image += (table.get("kept_forward_factor", {}).get(run.teacher, 1.0) - 1.0) / table["forward"][run.teacher]
    per_image /= table.get("margin", 1.0)
    eval_ips = table["eval"].get(run.student, table["default_eval"]) * table.get("margin", 1.0)
    epochs = run.config["train"]["epochs"]
    per_epoch = _train_images(run) * per_image + _eval_images(run) / eval_ips
    return table["run_overhead_s"] + epochs * per_epoch


def estimate_plan(s: Settings, plan: Sequence[Run]) -> None:
    """Set ``est_s`` of every run, in plan order: with the teacher cache on, the first run of a (teacher,
    seed, output) computes the teacher's outputs and the later ones read them."""
    filled: set[tuple] = set()
    for run in plan:
        cached = False
        output = teacher_outputs(run.method)
        if s.teacher_cache and run.teacher is not None and output:
            key = (run.teacher, run.seed, output, run.config["train"]["epochs"], run.config["data"]["train_subset"])
            cached = key in filled
            filled.add(key)
        run.est_s = estimate_seconds(s, run, cached)


# ------------------------------------------------------------------------------------------ selection


def parse_only(items: Sequence[str]) -> dict[str, set[str]]:
    """``--only`` filters: parts (teachers, cells, sensitivity) and key=value (pair, method, seed, run)."""
    filters: dict[str, set[str]] = {}
    for item in items:
        for token in filter(None, (t.strip() for t in item.split(","))):
            if "=" in token:
                key, value = token.split("=", 1)
                key = key.strip()
                if key not in ("pair", "method", "seed", "run", "part"):
                    raise SystemExit(f"--only {token!r}: keys are pair, method, seed, run, part")
                filters.setdefault(key, set()).add(value.strip())
            elif token in ("teachers", "cells", "sensitivity", "table"):
                filters.setdefault("part", set()).add("cells" if token == "table" else token)
            else:
                raise SystemExit(f"--only {token!r}: use teachers, cells, sensitivity or pair=/method=/seed=/run=")
    return filters


def select(plan: Sequence[Run], filters: dict[str, set[str]]) -> list[Run]:
    def keep(run: Run) -> bool:
        if "part" in filters and run.part not in filters["part"]:
            return False
        if "pair" in filters and not (set(run.pairs) & filters["pair"]):
            return False
        if "method" in filters and run.method not in filters["method"]:
            return False
        if "seed" in filters and str(run.seed) not in filters["seed"]:
            return False
        if "run" in filters and run.name not in filters["run"]:
            return False
        return True

    chosen = [r for r in plan if keep(r)]
    names = {r.name for r in chosen}
    by_name = {r.name: r for r in plan}
    extra = [by_name[n] for r in chosen for n in r.needs if n not in names and not is_done(by_name[n])]
    for run in extra:  # teachers the selection needs and that are not trained yet
        if run.name not in names:
            names.add(run.name)
    return [r for r in plan if r.name in names]


# ------------------------------------------------------------------------------------------ schedule


def estimate_wall(s: Settings, runs: Sequence[Run]) -> float:
    """Estimated wall time of ``runs`` on ``s.jobs`` workers that each take the next free run whose needs (its
    teacher) have finished: Graham's bound for such a greedy schedule with precedence, work / jobs + (1 - 1 / jobs)
    x the longest chain of runs (a teacher then its longest student)."""
    if not runs:
        return 0.0
    jobs = max(1, s.jobs)
    est = {r.name: r.est_s for r in runs}
    chain = max(r.est_s + max((est.get(n, 0.0) for n in r.needs), default=0.0) for r in runs)
    return sum(est.values()) / jobs + (1 - 1 / jobs) * chain


# ------------------------------------------------------------------------------------------ dry list


def fmt_min(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def dry_list(s: Settings, plan: Sequence[Run], selected: Sequence[Run]) -> None:
    from crossdistill.config import build_config
    from crossdistill.engine.setup import check_run_config

    p = s.protocol
    for run in plan:  # every planned config must validate (keys, types, method arguments)
        check_run_config(build_config(copy.deepcopy(run.config)))
    print(f"protocol {p.name}: {p.summary}")
    print(f"output {s.out}; data {s.data_root} ({s.dataset}); device {s.device}; {s.jobs} run(s) at a time")
    print(
        f"methods: {', '.join(s.methods)}"
        + (
            f" (not in this installation: {', '.join(m for m in p.methods if m not in s.methods)})"
            if set(p.methods) - set(s.methods)
            else ""
        )
    )
    for key, kept in s.kept.items():
        print(
            f"teacher {key}: kept, {kept.weights} (top-1 {kept.last_top1:.2f} after {kept.epochs} epochs on "
            f"{kept.train_images:,} images; SHA-256 {kept.sha256[:12]}... checked)"
        )
    print(f"{'status':7s} {'run':36s} {'part':11s} {'epochs':>6s} {'images':>7s} {'est':>8s}")
    todo_s = 0.0
    for run in selected:
        status = "done" if is_done(run) else ("partial" if run.run_dir.exists() else "todo")
        if status != "done":
            todo_s += run.est_s
        print(
            f"{status:7s} {run.name:36s} {run.part:11s} {run.config['train']['epochs']:6d} "
            f"{_train_images(run):7d} {fmt_min(run.est_s):>8s}"
        )
    left = estimate_wall(s, [r for r in selected if not is_done(r)])
    total_work = sum(r.est_s for r in plan)
    makespan = estimate_wall(s, plan)
    parts = {}
    for run in plan:
        parts[run.part] = parts.get(run.part, 0.0) + run.est_s
    print(
        f"\n{len(selected)} runs listed, {sum(is_done(r) for r in selected)} done; "
        f"estimated wall time of what is left: {fmt_min(left)}"
    )
    print(
        f"whole study (estimate, free machine): work {', '.join(f'{k} {fmt_min(v)}' for k, v in parts.items())} "
        f"= {fmt_min(total_work)} of run time; {s.jobs} at a time: total {fmt_min(makespan)}"
        + (
            f" (limit {p.budget_min:g} min: {'fits' if makespan <= p.budget_min * 60 else 'OVER'})"
            if p.budget_min
            else ""
        )
    )
    if p.speed == "gpu":
        print(GPU_NOTE)
