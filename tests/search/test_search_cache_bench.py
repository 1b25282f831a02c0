"""benchmarks/search_cache_bench.py (the teacher cache's saving on a search, reported in docs/PERFORMANCE.md) on a
three-trial, one-epoch search: the same trials with and without the cache, the cached one never running the teacher
for rows it stored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("optuna", reason="crossdistill tune needs optuna (pip install 'crossdistill[search]')")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "search_cache_bench.py"


@pytest.mark.slow
def test_the_search_benchmark_runs_the_same_trials_with_and_without_the_cache(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("search_cache_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = tmp_path / "result.json"
    argv = ["--trials", "3", "--workers", "2", "--epochs", "1", "--out", str(tmp_path / "runs"), "--json", str(report)]
    assert bench.main(argv) == 0
    result = json.loads(report.read_text())
    cached, uncached = result["searches"]["cached"], result["searches"]["uncached"]
    assert result["trials"] == 3 and result["epochs"] == 1 and result["speedup"] > 0
    # the configs drawn once and queued, in both, and no trial past --trials
    assert cached["tried"] == uncached["tried"] and len(cached["tried"]) == 3
    # the first two trials run side by side and may both compute a row; the third starts after one of them has
    # stored every row and reads them all; without the cache nothing is stored or read
    trials = len(cached["tried"])
    rows = (cached["rows_computed"] + cached["rows_read"]) // trials
    assert rows > 0 and cached["rows_computed"] + cached["rows_read"] == trials * rows
    assert rows <= cached["rows_computed"] <= 2 * rows and cached["rows_read"] >= rows
    assert uncached["rows_computed"] == uncached["rows_read"] == 0
    assert "faster with the cache" in capsys.readouterr().out
