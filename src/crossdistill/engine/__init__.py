"""Training engine: loop, evaluation, distributed set-up."""

from .setup import build_run
from .trainer import RunSummary, Trainer, evaluate, train

__all__ = ["RunSummary", "Trainer", "build_run", "evaluate", "train"]
