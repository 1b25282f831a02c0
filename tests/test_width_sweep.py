"""benchmarks/accuracy/width_sweep.py end to end at a toy size: two teacher widths, both reductions, one epoch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_accuracy_study import CIFAR_TARBALL, small_cifar, synthetic_cifar

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "accuracy" / "width_sweep.py"


def sweep(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_width_sweep_trains_both_reductions_per_width_and_writes_its_page(tmp_path):
    # widths of 64 and up: a ResNet whose stem has fewer than 8 channels corrupts the heap in torch 2.14's
    # channels_last CPU training ("corrupted double-linked list" at the first step; 8 channels train)
    data = (small_cifar if CIFAR_TARBALL.is_file() else synthetic_cifar)(tmp_path / "cifar10_small.tar.gz")
    out, docs = tmp_path / "runs", tmp_path / "docs"
    common = [
        *("--out", str(out), "--docs-dir", str(docs), "--data-root", str(data), "--cache-dir", str(tmp_path / "c")),
        *("--widths", "64,128", "--kappas", "0.01,0.04", "--weights", "0.4", "--seeds", "0"),
        *("--set", "train.epochs=1", "--set", "data.train_subset=320", "--set", "data.eval_subset=200"),
        *("--set", "train.batch_size=64", "--set", "optim.warmup_epochs=0"),
    ]
    listed = sweep(*common, "--dry-list")
    # 2 teachers, then 2 widths x 2 reductions x 3 points (kappa 0.01 and 0.04 at lambda 0.1, lambda 0.4)
    assert "14 runs, 0 done" in listed and "w128-mean-l0.4-k0.01-s0" in listed
    first = sweep(*common)
    assert sum(line.startswith("[") for line in first.splitlines()) == 14, first
    config = yaml.safe_load((out / "configs" / "w64-mean-l0.1-k0.04-s0.yaml").read_text())
    assert config["method_args"] == {
        "weight": 0.1,
        "kappa": 0.04,
        "gamma": 2,
        "reduction": "mean",
        "reference_dim": 768,
    }
    assert config["teacher"]["kwargs"] == {"channels": [8, 16, 32, 64], "stem_width": 8}
    md = (docs / "RESULTS_WIDTH.md").read_text()
    assert "## reduction: mean, kappa at lambda 0.1" in md and "Not the protocol's settings" in md
    assert "| width D | kappa 0.01 | kappa 0.04 | best |" in md
    rows = [line for line in md.splitlines() if line.startswith("| 64 |") or line.startswith("| 128 |")]
    assert len(rows) == 8 and all("**" in row and " ± " in row for row in rows), rows
    png = (docs / "width_sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    again = sweep(*common)  # resumable: nothing left to train
    assert not any(line.startswith("[") for line in again.splitlines()), again
