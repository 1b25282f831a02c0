"""Run metrics: evaluation accuracy, an epoch's loss totals, and the log (a CSV file per run, TensorBoard when
installed)."""

from __future__ import annotations

import contextlib
import csv
import io
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import is_disk_full, write_text_atomic
from ..errors import CrossDistillError
from .distributed import DistEnv, all_reduce_sum


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    env: DistEnv | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) of ``model`` on ``loader`` (sharded across ranks under DDP)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        top1, top5 = topk_correct(logits.float(), target)
        counts += torch.stack([top1, top5, torch.tensor(target.shape[0], device=device)]).double()
    if env is not None:
        all_reduce_sum(counts, env)
    model.train(was_training)
    total = max(counts[2].item(), 1.0)
    return {
        "top1": 100.0 * counts[0].item() / total,
        "top5": 100.0 * counts[1].item() / total,
        "samples": int(counts[2].item()),
    }


class TeacherClassifier(nn.Module):
    """The frozen teacher as :func:`evaluate` runs a model: its inputs prepared (re-normalised, resized) as in
    training. The teacher is not a child module: evaluating leaves it in eval mode and its flags untouched."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher.model(self.teacher.prepare(images))


class EpochTotals:
    """The sums of an epoch's loss terms over its counted steps, and its skipped steps, kept on the device
    (no host sync per step); a mid-epoch checkpoint keeps them (:meth:`partial`) and a resume continues them."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None = None):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        if partial is not None:
            self.sums = {k: torch.tensor(v, device=device) for k, v in partial.get("sums", {}).items()}
            self.steps = int(partial.get("steps", 0))
        self.skipped = torch.zeros((), device=device)

    def add(self, result) -> None:
        """Count one optimiser step's :class:`~crossdistill.engine.step.StepResult`: its loss terms are the means
        over its micro-batches (``train.grad_accum_steps``), its gradient norm the step's (a step the deferred
        finiteness check skipped on the device adds nothing)."""
        terms = {**result.losses, "loss": result.loss}
        if result.grad_norm is not None:
            terms["grad_norm"] = result.grad_norm
        for name, value in terms.items():
            value = value.detach().float()
            if result.ok is not None:
                value = torch.where(result.ok, value, torch.zeros_like(value))
            self.sums[name] = self.sums.get(name, 0) + value
        self.steps += 1

    def partial(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps}

    def running_means(self) -> dict[str, str]:
        """The means so far, for the progress bar (one sync)."""
        return {k: f"{v.item() / max(self.steps, 1):.4g}" for k, v in self.sums.items() if k != "grad_norm"}

    def reduce(self, env: DistEnv) -> dict[str, Any]:
        """The epoch's means over every rank (``train_<term>``) and its skipped steps (``skipped_steps``)."""
        names = sorted(self.sums)
        totals = torch.stack([torch.as_tensor(self.sums[n], device=self.device) for n in names] + [self.skipped])
        all_reduce_sum(totals, env)
        counted = max(self.steps, 1) * env.world_size
        means = (totals[:-1] / counted).tolist()
        stats: dict[str, Any] = {f"train_{n}": v for n, v in zip(names, means)}
        stats["skipped_steps"] = int(totals[-1].item())
        return stats


def _csv_text(fields: list[str], rows: list[dict[str, Any]], header: bool = True) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv``; mirrors scalars to TensorBoard if available.

    The file is rewritten atomically with each row (it is small): a full disk or a kill leaves the
    previous version, never a torn row, and a full disk is one line (see :func:`~crossdistill.checkpoint.write_atomic`).
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def _read_text(self) -> str:
        return self.path.read_bytes().decode("utf-8") if self.path.exists() else ""  # bytes: keep csv's \r\n

    def write(self, row: dict[str, Any]) -> None:
        previous = self._read_text()
        if previous and next(csv.reader(io.StringIO(previous)), None) != list(row):
            self.path.rename(self.path.with_suffix(".csv.old"))
            previous = ""
        write_text_atomic(self.path, previous + _csv_text(list(row), [row], header=not previous))
        if self.writer is not None:
            with self._tensorboard_errors():
                step = int(row["epoch"])
                for key, value in row.items():
                    if key != "epoch" and isinstance(value, (int, float)):
                        self.writer.add_scalar(key.replace("_", "/", 1), value, step)
                self.writer.flush()

    def write_step(self, scalars: dict[str, float], step: int) -> None:
        """Mirror the step scalars of ``step`` (optimiser steps done) to TensorBoard, as ``step/<name>``."""
        if self.writer is not None:
            with self._tensorboard_errors():
                for key, value in scalars.items():
                    self.writer.add_scalar(f"step/{key}", value, step)

    @contextlib.contextmanager
    def _tensorboard_errors(self):
        """TensorBoard writes in a thread and raises its OSError at the next call: a full disk is one line."""
        try:
            yield
        except Exception as err:
            if not is_disk_full(err):
                raise
            self.writer = None  # its queue cannot be flushed: do not try again when closing
            raise CrossDistillError(
                f"no space left on the device while writing TensorBoard events to {self.path.parent / 'tensorboard'}; "
                "the checkpoints and metrics.csv are intact. Free some space (or move train.output_dir) and resume "
                "with --resume."
            ) from None

    def restore(self, history: list[dict[str, Any]]) -> None:
        """Make the file hold the rows of ``history``, the epochs of the checkpoint a run resumes from: rows past
        it are dropped (the run repeats those epochs), and rows a kill kept from being written (after the epoch's
        checkpoint, before its row) are written again from the checkpoint."""
        rows = list(csv.DictReader(io.StringIO(self._read_text())))
        last = int(history[-1]["epoch"]) if history else 0
        kept = [r for r in rows if int(r["epoch"]) <= last]
        if [int(r["epoch"]) for r in kept] != [int(h["epoch"]) for h in history]:
            write_text_atomic(self.path, _csv_text(list(dict.fromkeys(k for h in history for k in h)), history))
        elif len(kept) < len(rows):
            write_text_atomic(self.path, _csv_text(list(rows[0]), kept))

    def close(self) -> None:
        if self.writer is not None:
            with self._tensorboard_errors():
                self.writer.close()
