"""Shared helpers: tiny, fast run configs on scikit-learn's digits (no download, CPU)."""

from __future__ import annotations

import contextlib
import copy
import os
import socket

import pytest
import torch

from crossdistill.engine.distributed import init_distributed, shutdown

TINY_TEACHER = {"name": "test_vit", "kwargs": {"img_size": 32, "patch_size": 8}}
TINY_STUDENT = {"name": "test_resnet"}


def tiny_run(tmp_path, method: str = "rsd", **sections) -> dict:
    """A raw run config that trains in about a second per epoch on 2 cores."""
    cfg = {
        "student": copy.deepcopy(TINY_STUDENT),
        "teacher": copy.deepcopy(TINY_TEACHER) if method != "vanilla" else None,
        "method": method,
        "data": {
            "dataset": "digits",
            "img_size": 32,
            "train_subset": 256,
            "eval_subset": 100,
            "num_workers": 0,
            "hflip": 0.0,
            "scale": [0.7, 1.0],
        },
        "optim": {"opt": "adamw", "lr": 2e-3, "weight_decay": 0.01, "sched": "cosine", "min_lr": 1e-5},
        "train": {
            "epochs": 2,
            "batch_size": 32,
            "device": "cpu",
            "output_dir": str(tmp_path / "runs"),
            "run_name": "run",
            "tensorboard": False,
            "progress": False,
            "seed": 7,
        },
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


TINY_CLASSES, TINY_SIZE = 10, 32


def tiny_resnet(**kwargs):
    """timm's ``test_resnet`` with 10 classes (a CNN: BatchNorm, four stages)."""
    import timm

    return timm.create_model("test_resnet", num_classes=TINY_CLASSES, **kwargs)


def tiny_vit(**kwargs):
    """timm's ``test_vit`` at 32 px with 8 px patches (a 4x4 token grid and a class token), 10 classes."""
    import timm

    return timm.create_model("test_vit", num_classes=TINY_CLASSES, img_size=TINY_SIZE, patch_size=8, **kwargs)


def tiny_pair(student=tiny_resnet, teacher=tiny_vit, seed: int = 0):
    """A cross-architecture (student, frozen Teacher) pair, seeded: ResNet student, ViT teacher by default."""
    from crossdistill.models import Teacher

    torch.manual_seed(seed)
    return student(), Teacher(teacher())


def tiny_batch(seed: int = 1, n: int = 8):
    """``n`` random 32 px images and labels in 0..9, from their own generator."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, TINY_SIZE, TINY_SIZE, generator=gen), torch.randint(0, TINY_CLASSES, (n,), generator=gen))


def distill(distiller, images: torch.Tensor, target: torch.Tensor, indices: torch.Tensor | None = None):
    """One forward of ``distiller`` as the engine runs it: the teacher outputs the method asks for,
    computed by the engine's :class:`~crossdistill.engine.teacher_runner.TeacherRunner`, then the method."""
    from crossdistill.engine.teacher_runner import TeacherRunner

    teacher = TeacherRunner(distiller).compute(images) if distiller.reads_teacher else None
    return distiller(images, target, teacher, indices)


def adamw_training(distiller, term: str, images, target, *, steps: int, lr: float, indices=None):
    """``steps`` AdamW steps of ``distiller`` on one batch; returns the ``term`` and total losses of each step,
    after checking that the frozen teacher got no gradient, stayed in eval mode and kept its weights."""
    teacher = distiller.teacher
    teacher_before = copy.deepcopy(teacher.model.state_dict())
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=lr)
    terms, totals = [], []
    for _ in range(steps):
        out = distill(distiller, images, target, indices)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        terms.append(out.losses[term].item())
        totals.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(terms + totals)))
    assert all(p.grad is None for p in teacher.model.parameters()) and not teacher.model.training
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    return terms, totals


def bf16_losses(distiller, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The method's loss terms under CPU bf16 autocast (as a GPU run with ``train.amp: bf16`` computes
    them), checked finite and backpropagated."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distill(distiller, images, target)
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    out.loss.backward()
    return out.losses


def run_teacher(teacher, images: torch.Tensor, *, logits: bool = False, stages=()):
    """The teacher's embedding (and logits, stage features when asked) on ``images``."""
    from crossdistill.models import TeacherRequest

    return teacher.outputs(images, TeacherRequest(embedding=True, logits=logits, stages=tuple(stages or ())))


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


SYNCING_OPS = ("masked_select", "nonzero", "_local_scalar_dense", "index.Tensor")
"""aten ops whose output size or value the host must read: on a GPU each makes the host wait for the device."""


def ops_called(fn, *args) -> set[str]:
    """Names (``op.overload``) of the aten ops that ``fn(*args)`` dispatches, backward included if it runs one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__ + ("." + func._overloadname if func._overloadname else ""))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        fn(*args)
    return mode.names


@pytest.fixture
def rsd_nan_at_calls_3_and_4(monkeypatch):
    """The RSD loss term is NaN at the 3rd and 4th forward; returns the call counter ({"n": calls so far,
    "nan": the calls that are NaN, which a test may change})."""
    from crossdistill.distillers.rsd import RSD

    original = RSD.forward
    calls = {"n": 0, "nan": (3, 4)}

    def sometimes_nan(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in calls["nan"]:
            out.losses["rsd"] = out.losses["rsd"] * float("nan")
        return out

    monkeypatch.setattr(RSD, "forward", sometimes_nan)
    return calls


def tiny_config_file(tmp_path, method: str = "kd", **sections) -> str:
    """:func:`tiny_run` (1 epoch, a validation split) written as a YAML file; its path."""
    import yaml

    sections.setdefault("train", {})
    sections["train"] = {"epochs": 1, "run_name": None, **sections["train"]}
    sections["data"] = {"train_subset": 128, "eval_subset": 60, "val_fraction": 0.2, **sections.get("data", {})}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_run(tmp_path, method, **sections)))
    return str(path)


def free_port() -> int:
    """A TCP port free on this machine now (for a test's process group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def cpu_process_group(rank: int, world_size: int, port: int):
    """Rank ``rank`` of a ``world_size``-process gloo group on this machine, with one torch thread (in a spawned test
    worker): yields the engine's DistEnv, shut down on exit."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        yield env
    finally:
        shutdown(env)
