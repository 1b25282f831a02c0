"""Run logging: a CSV file per run, TensorBoard when installed."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv``; mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        exists = self.path.exists()
        if exists:
            with self.path.open() as handle:
                header = next(csv.reader(handle), None)
            if header != list(row):
                exists = False
                self.path.rename(self.path.with_suffix(".csv.old"))
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if not exists:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, step)
            self.writer.flush()

    def truncate_after(self, epoch: int) -> None:
        """Drop rows past ``epoch`` (a resumed run repeats the epochs after its last checkpoint)."""
        if not self.path.exists():
            return
        with self.path.open() as handle:
            rows = list(csv.DictReader(handle))
            fields = list(rows[0]) if rows else []
        if not rows:
            return
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
