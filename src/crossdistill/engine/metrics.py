"""Run logging: a CSV file per run, TensorBoard when installed."""

from __future__ import annotations

import contextlib
import csv
import io
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import is_disk_full, write_text_atomic
from ..errors import CrossDistillError


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hits = pred.eq(target.view(-1, 1))
    return [hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


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
                "with --resume.") from None

    def truncate_after(self, epoch: int) -> None:
        """Drop rows past ``epoch`` (a resumed run repeats the epochs after its last checkpoint)."""
        rows = list(csv.DictReader(io.StringIO(self._read_text())))
        if not rows:
            return
        kept = [r for r in rows if int(r["epoch"]) <= epoch]
        write_text_atomic(self.path, _csv_text(list(rows[0]), kept))

    def close(self) -> None:
        if self.writer is not None:
            with self._tensorboard_errors():
                self.writer.close()
