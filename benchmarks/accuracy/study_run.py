"""Running the accuracy study's plan: each run an ordinary crossdistill training run, trained by the workers of
``crossdistill sweep`` (``crossdistill.search.runs``: several processes, each taking the next free run); the study's
log; and the two checks that run no study: ``--check-build`` (every model/method combination builds) and
``--calibrate`` (this machine's speeds)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from study_plan import (
    Run,
    Settings,
    check_teacher_weights,
    estimate_wall,
    fmt_min,
    is_done,
    is_done_name,
    speed_key,
)
from study_protocols import CIFAR10_MEAN, CIFAR10_STD
from study_teachers import settings_under

# ------------------------------------------------------------------------------------------ execution


_COMPARED = (
    "student",
    "teacher.name",
    "teacher.kwargs",
    "method",
    "method_args",
    "optim",
    "train.epochs",
    "train.batch_size",
    "train.seed",
    "train.amp",
    "data.dataset",
    "data.train_subset",
    "data.eval_subset",
    "data.img_size",
    "data.scale",
    "data.hflip",
    "data.mean",
    "data.std",
)


def _defining(config: dict[str, Any]) -> dict[str, Any]:
    from crossdistill.report import flatten

    flat = flatten(config)
    out = settings_under(flat, _COMPARED)
    if flat.get("teacher.checkpoint"):  # a kept teacher (<key>.safetensors) or one trained in the study (last.pt)
        out["teacher.checkpoint"] = Path(flat["teacher.checkpoint"]).name
    return out


def check_existing(run: Run) -> None:
    """An existing run directory must hold this run (same defining settings), not one of another protocol."""
    import yaml

    from crossdistill.config import build_config
    from crossdistill.report import normalised_config

    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = _defining(normalised_config(yaml.safe_load(path.read_text()) or {}))
    planned = _defining(build_config(copy.deepcopy(run.config)).to_dict())
    diff = sorted(k for k in set(saved) | set(planned) if saved.get(k) != planned.get(k))
    # a kept teacher may be another architecture than the study's own (study_protocols.KEPT_MODELS)
    if "teacher.checkpoint" in diff and all(k.startswith("teacher.") for k in diff):
        trained_here = saved["teacher.checkpoint"] == "last.pt"
        raise SystemExit(
            f"{run.run_dir} was distilled from "
            + (
                "a teacher trained in the study, the plan uses a kept teacher: pass --train-teachers, or use "
                "another --out"
                if trained_here
                else "a kept teacher, the plan trains its own (--train-teachers): leave that flag out, or use "
                "another --out"
            )
        )
    if diff:
        details = "; ".join(f"{k}: run has {saved.get(k)!r}, plan has {planned.get(k)!r}" for k in diff[:4])
        raise SystemExit(
            f"{run.run_dir} holds a run with other settings ({details}). It belongs to another protocol or "
            "version of the study: use another --out, or delete that run directory to retrain it."
        )


KEPT_RECORD = "kept_teachers.json"  # in an output folder: the SHA-256 of the kept teachers its students learnt from


def check_teachers(s: Settings, runs: Sequence[Run]) -> None:
    """The runs already in ``s.out`` were distilled from the teachers the plan uses: kept or trained in the study
    (each existing run's config, :func:`check_existing`), and the same kept weights (the folder's record)."""
    path = s.out / KEPT_RECORD
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    for key, kept in s.kept.items():
        if recorded.get(key, kept.sha256) != kept.sha256:
            raise SystemExit(
                f"{s.out}: its students were distilled from another kept {key} (SHA-256 {recorded[key][:12]}..., "
                f"the kept one now is {kept.sha256[:12]}...): use another --out"
            )
    for run in runs:
        check_existing(run)


def record_kept(s: Settings) -> None:
    """Remember in ``s.out`` which kept teachers its runs use (before any of them trains)."""
    from crossdistill.files import write_text_atomic

    if not s.kept:
        return
    path = s.out / KEPT_RECORD
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded.update({key: kept.sha256 for key, kept in s.kept.items()})
    write_text_atomic(path, json.dumps(recorded, indent=2, sort_keys=True) + "\n", hint="the study's output folder")


def write_run_yaml(run: Run, out: Path) -> Path:
    import yaml

    from crossdistill.files import write_text_atomic

    path = out / "configs" / f"{run.name}.yaml"
    header = (
        f"# accuracy study run {run.name} ({run.part}); generated by benchmarks/accuracy/run_study.py.\n"
        "# Rerun alone: python benchmarks/accuracy/study_models.py train --config THIS_FILE\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(run.config, sort_keys=False), hint="the study's output folder")
    return path


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def append_log(out: Path, record: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "study_log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(out: Path) -> list[dict[str, Any]]:
    path = out / "study_log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def describe_run(run: Run) -> str:
    if run.part == "teachers":
        return f"teacher {run.student}"
    where = "/".join(run.pairs) if run.method == "vanilla" else run.pairs[0]
    grid = f" lambda={run.grid[0]:g} kappa={run.grid[1]:g}" if run.part == "sensitivity" and run.grid else ""
    return f"{where} {run.method}{grid} seed {run.seed}"


POLL_S = 5.0  # how often a worker with only waiting students looks whether their teacher finished


@dataclass(frozen=True)
class StudyJob:
    """A run as a worker sees it: its name (folder and ``configs/<name>.yaml``), how it is described, its estimate."""

    name: str
    label: str
    est_s: float
    needs: tuple[str, ...] = ()  # runs that must have finished first (a student's teacher)


def execute(s: Settings, todo: list[Run], invocation: str) -> None:
    """Train the runs of ``todo`` on ``s.jobs`` processes, the workers of ``crossdistill sweep``: each takes the next
    run that is neither finished nor claimed by another (the run directory's lock) and whose teacher has finished:
    the teachers first, and a student as soon as its own teacher is done (no barrier after all the teachers). One
    line per finished run, with an ETA; a failed run is reported and the others go on."""
    from crossdistill.search.runs import start_workers

    print(
        f"{len(todo)} runs to train, estimated {fmt_min(estimate_wall(s, todo))} ({s.jobs} at a time); "
        f"logs in {s.out / 'logs'}",
        flush=True,
    )
    check_teacher_weights(s, [name for run in todo for name in run.needs])
    prepare_data(s)
    todo_est = {run.name: run.est_s for run in todo}
    started = time.time()
    jobs = []
    for run in sorted(todo, key=lambda r: r.part != "teachers"):  # the teachers first
        never = [name for name in run.needs if not is_done_name(s, name) and name not in todo_est]
        if never:
            print(f"{describe_run(run)}: not trained, it needs {', '.join(never)}, which is not trained")
            continue
        write_run_yaml(run, s.out)
        jobs.append(StudyJob(run.name, describe_run(run), run.est_s, run.needs))
    if jobs:
        start_workers(train_jobs, (str(s.out), jobs, todo_est, s.threads, invocation, started), s.jobs)
    unfinished = [run.name for run in todo if not is_done(run)]
    if unfinished:
        print(f"{len(unfinished)} run(s) not finished: {', '.join(unfinished)}; see {s.out / 'logs'}", flush=True)


def train_jobs(
    out: str,
    jobs: Sequence[StudyJob],
    todo_est: dict[str, float],
    threads: int | None,
    invocation: str,
    started: float,
    worker: int,
    workers: int,
) -> None:
    """One worker (``crossdistill.search.runs.start_workers``'s target): every job not finished, starting at its own
    offset, each trained (or resumed) by ``train_once`` with its output in ``logs/<name>.log``. A run another worker
    holds is left to it; a student whose teacher is still training (or not yet tried by this worker) waits, polled
    every ``POLL_S`` seconds, while the worker trains what it can; a student whose teacher failed is reported."""
    import torch

    import study_models  # noqa: F401  (registers resmlp_cifar in this process)
    from crossdistill.engine.rundir import lock_holder

    if threads:
        torch.set_num_threads(threads)
    root = Path(out)
    pending = list(jobs[worker:]) + list(jobs[:worker])
    untried = {job.name for job in pending}
    while pending:
        waiting = []
        for job in pending:
            missing = [name for name in job.needs if not (root / name / "summary.json").is_file()]
            if missing and any(name in untried or lock_holder(root / name) is not None for name in missing):
                waiting.append(job)
                continue
            untried.discard(job.name)
            if missing:
                say(f"{job.label}: not trained, it needs {', '.join(missing)}, which did not finish")
                continue
            train_job(root, job, todo_est, invocation, started, workers)
        pending = waiting
        if pending:
            time.sleep(POLL_S)


def say(line: str) -> None:
    """``line`` on stdout in one write: the workers share it, and where it is unbuffered (PYTHONUNBUFFERED) print
    writes a line's text and its newline apart, so two workers' lines ran together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def eta_seconds(log: Sequence[dict[str, Any]], invocation: str, left_est: dict[str, float], workers: int) -> float:
    """The time the runs of ``left_est`` (name -> estimated seconds) will take on ``workers`` workers: their
    estimates, spread over the workers, times how much slower than estimated this invocation's finished runs were
    (runs trained from the start only; 1 before any finished). A rate of estimated work done per elapsed second
    would count nothing of the runs in progress and, early on, overshoot by hours."""
    runs = [
        r
        for r in log
        if r.get("event") == "run" and r.get("invocation") == invocation and r.get("ok") and not r.get("resumed")
    ]
    est = sum(r["est_s"] for r in runs)
    slowdown = sum(r["seconds"] for r in runs) / est if est > 0 else 1.0
    return sum(left_est.values()) / max(1, workers) * slowdown


def train_job(
    root: Path, job: StudyJob, todo_est: dict[str, float], invocation: str, started: float, workers: int = 1
) -> None:
    """Train (or resume) one job unless it is finished or another worker holds it; log it and print its line."""
    from crossdistill.config import load_config
    from crossdistill.engine.preemption import Preempted
    from crossdistill.engine.rundir import inspect_run_dir
    from crossdistill.search.runs import train_once

    if (root / job.name / "summary.json").is_file():
        return
    cfg = load_config(root / "configs" / f"{job.name}.yaml")
    resumed = inspect_run_dir(root / job.name).has_checkpoint
    log_path = root / "logs" / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load0, wall0, cpu0 = loadavg(), time.time(), time.process_time()
    try:
        with open(log_path, "a") as log:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            log.write(f"# {stamp} {'resume' if resumed else 'start'} {root / job.name}\n")
            log.flush()
            status, summary = train_once(cfg, out=log)
        error = None
    except (KeyboardInterrupt, Preempted):  # Ctrl-C, or SIGTERM/SIGUSR1 (the run saved a checkpoint)
        say(f"stopped during {job.name}; rerun the same command to resume it")
        raise
    except Exception as err:  # one failed run must not stop the study
        status, summary, error = "failed", None, f"{type(err).__name__}: {err}"
    if status in ("busy", "finished"):  # another worker holds it, or finished it between our look and claim
        return
    seconds = time.time() - wall0
    # CPU seconds of this process (all its threads; not of data-loader worker processes): unlike the wall time,
    # not inflated by other jobs on a shared machine, so speeds can be read from a loaded run (see SPEEDS)
    cpu_s = round(time.process_time() - cpu0, 2)
    append_log(
        root,
        {
            "event": "run",
            "invocation": invocation,
            "run": job.name,
            "seconds": round(seconds, 2),
            "cpu_s": cpu_s if error is None else None,
            "resumed": resumed,
            "est_s": round(job.est_s, 1),
            "load_before": load0,
            "load_after": loadavg(),
            "ok": error is None,
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    )
    done = [name for name in todo_est if (root / name / "summary.json").is_file()]
    elapsed = time.time() - started
    eta = eta_seconds(read_log(root), invocation, {n: e for n, e in todo_est.items() if n not in done}, workers)
    top = f"top-1 last {summary.last_top1:.2f} best {summary.best_top1:.2f}" if error is None else f"FAILED: {error}"
    say(
        f"[{len(done)}/{len(todo_est)}] {job.label:42s} {top} | {fmt_min(seconds)} (est {fmt_min(job.est_s)}) | "
        f"elapsed {fmt_min(elapsed)} | ETA {fmt_min(eta)}"
    )


def stop_code(err: BaseException, prog: str, what: str = "") -> int | None:
    """The exit code of a study that ``err`` stopped: 130 for Ctrl-C; the preemption code for SIGTERM/SIGUSR1 and 1
    for a run that stopped with an error, each after one line on stderr (``prog: what: ...``); None for anything
    else, a fault of the script to raise as it is."""
    from crossdistill.engine.preemption import EXIT_PREEMPTED, Preempted
    from crossdistill.errors import CrossDistillError, one_line

    if isinstance(err, KeyboardInterrupt):
        return 130
    if not isinstance(err, (Preempted, CrossDistillError)):
        return None
    head = f"{prog}: {what}: " if what else f"{prog}: "
    error = "" if isinstance(err, Preempted) else "error: "
    print(f"{head}{error}{one_line(err)}", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED if isinstance(err, Preempted) else 1


def run_invocation(s: Settings, todo: list[Run], argv: Sequence[str], prog: str) -> int | None:
    """Train ``todo`` as one logged invocation (its machine, load and argv before, its duration after) and turn a stop
    into an exit code (``stop_code``); None when it ran to its end."""
    invocation = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.time()
    machine = machine_info(s.device)
    if s.threads:
        machine["torch_threads"] = s.threads
    machine["jobs"] = s.jobs
    append_log(
        s.out,
        {
            "event": "invocation",
            "invocation": invocation,
            "argv": list(argv),
            "machine": machine,
            "load": loadavg(),
            "todo": len(todo),
        },
    )
    try:
        execute(s, todo, invocation)
    except (KeyboardInterrupt, Exception) as err:
        code = stop_code(err, prog)
        if code is None:
            raise
        return code
    finally:
        append_log(s.out, {"event": "invocation_end", "invocation": invocation, "seconds": round(time.time() - t0, 1)})
    return None


def prepare_data(s: Settings) -> None:
    """Decode an image archive into its cache once, before runs (or parallel workers) read it."""
    root = Path(s.data_root)
    if s.dataset == "folder" and root.is_file():
        from crossdistill.data.archive import open_archive

        t0 = time.time()
        open_archive(root, s.cache_dir)
        if time.time() - t0 > 2:
            print(f"decoded {root.name} into the cache in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------ machine


def machine_info(device: str) -> dict[str, Any]:
    import timm
    import torch

    import crossdistill

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "crossdistill": crossdistill.__version__,
        "python": platform.python_version(),
        "os": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ------------------------------------------------------------------------------------------ build check


def check_build(plan: Sequence[Run]) -> None:
    """Validate every planned config and build each distinct (student, teacher, method) with one step on
    random data (CPU, random weights): the recipes are sound even where they cannot run here."""
    import torch

    import study_models  # noqa: F401
    from crossdistill.config import build_config
    from crossdistill.distillers import build_distiller
    from crossdistill.engine.setup import check_run_config, create_teacher
    from crossdistill.models import create_model

    seen = set()
    for run in plan:
        cfg = build_config(copy.deepcopy(run.config))
        args = check_run_config(cfg)
        key = (run.student, run.teacher, run.method)
        if key in seen:
            continue
        seen.add(key)
        student = create_model(cfg.student, 10)
        teacher = None
        if cfg.teacher is not None:
            tcfg = dataclasses.replace(cfg.teacher, checkpoint=None)
            teacher = create_teacher(tcfg, 10, CIFAR10_MEAN, CIFAR10_STD)
        if getattr(args, "img_size", "absent") is None:
            args = dataclasses.replace(args, img_size=cfg.data.img_size)
        distiller = build_distiller(cfg.method, student, teacher, args)
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        out = distiller(x, y)
        out.loss.backward()
        print(
            f"built {run.student} <- {run.teacher or '-'} ({run.method}): loss {out.loss.item():.3f}, "
            f"losses {', '.join(out.losses)}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------ calibration


class _EpochClock:
    """A text stream for the trainer's output that notes wall and CPU time when each epoch's row is printed."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def write(self, text: str) -> int:
        if text.startswith("epoch "):
            self.marks.append((time.perf_counter(), _cpu_seconds()))
        return len(text)

    def flush(self) -> None:
        pass


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def calibrate(s: Settings, plan: Sequence[Run], images: int) -> None:
    """Time every distinct (student, teacher, method): 2 epochs of ``images`` images, the second one timed.

    Prints, per combination, training images/s from wall time and from CPU time (process CPU seconds /
    torch threads: what a free machine would give if the threads ran in parallel without waiting, an
    estimate for a shared machine), the evaluation speed, the fixed cost of a run and the load average.
    """
    import tempfile

    import torch

    import study_models  # noqa: F401
    from crossdistill.config import build_config
    from crossdistill.engine.trainer import train

    seen: dict[str, Run] = {}
    for run in plan:
        seen.setdefault(speed_key(run), run)
    threads = torch.get_num_threads()
    n_eval = 1000
    results: dict[str, Any] = {"train_wall": {}, "train_cpu": {}, "eval_wall": {}, "eval_cpu": {}, "overhead": []}
    print(
        f"calibrating {len(seen)} combinations: 2 epochs of {images} images each, the second timed; "
        f"torch threads {threads}; load average {loadavg()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for key, run in seen.items():
            cfg = copy.deepcopy(run.config)
            cfg["data"]["train_subset"] = images
            cfg["data"]["eval_subset"] = n_eval
            cfg["train"].update(epochs=2, output_dir=tmp, run_name=f"cal-{len(results['train_wall'])}")
            cfg["train"].pop("teacher_cache", None)
            cfg["optim"]["warmup_epochs"] = 0
            if cfg.get("teacher"):
                cfg["teacher"]["checkpoint"] = None  # random weights: the same speed
            clock = _EpochClock()
            load0 = loadavg()
            t0 = time.perf_counter()
            summary = train(build_config(cfg), out=clock)
            total = time.perf_counter() - t0
            (w1, c1), (w2, c2) = clock.marks[-2], clock.marks[-1]
            epoch_wall = summary.history[1]["epoch_time_s"]
            interval_wall, interval_cpu = w2 - w1, c2 - c1
            train_share = min(1.0, epoch_wall / interval_wall)
            trained = (images // cfg["train"]["batch_size"]) * cfg["train"]["batch_size"]
            ips_wall = trained / epoch_wall
            ips_cpu = trained / (interval_cpu * train_share / threads)
            eval_wall = max(1e-3, interval_wall - epoch_wall)
            eval_cpu = max(1e-3, interval_cpu * (1 - train_share) / threads)
            results["train_wall"][key], results["train_cpu"][key] = round(ips_wall, 1), round(ips_cpu, 1)
            if run.method == "vanilla":
                results["eval_wall"][run.student] = round(n_eval / eval_wall, 1)
                results["eval_cpu"][run.student] = round(n_eval / eval_cpu, 1)
            results["overhead"].append(total - summary.wall_time_s)
            print(
                f"{key:34s} train {ips_wall:6.1f} img/s wall, {ips_cpu:6.1f} from CPU time | eval+save "
                f"{eval_wall:5.2f} s per {n_eval} | setup {total - summary.wall_time_s:4.1f} s | "
                f"load {load0:.2f} -> {loadavg():.2f}",
                flush=True,
            )
    print("\nmeasured (wall clock):")
    print(
        json.dumps(
            {
                "train": results["train_wall"],
                "eval": results["eval_wall"],
                "run_overhead_s": round(max(results["overhead"]), 1),
            },
            indent=1,
        )
    )
    print("\nmeasured (CPU time / threads):")
    print(json.dumps({"train": results["train_cpu"], "eval": results["eval_cpu"]}, indent=1))
