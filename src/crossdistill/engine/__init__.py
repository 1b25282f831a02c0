"""Training engine: loop, step, checkpoints, loaders, evaluation, distributed set-up."""

from .loaders import build_eval_loader, build_train_loader
from .setup import build_run
from .step import StepResult, TrainStep, build_optimizer, build_train_step, make_scaler
from .trainer import EpochHook, RunSummary, StoppedByHook, Trainer, evaluate, train

__all__ = [
    "EpochHook",
    "RunSummary",
    "StepResult",
    "StoppedByHook",
    "TrainStep",
    "Trainer",
    "build_eval_loader",
    "build_optimizer",
    "build_run",
    "build_train_loader",
    "build_train_step",
    "evaluate",
    "make_scaler",
    "train",
]
