"""benchmarks/search_cache_bench.py (the teacher cache's saving on a search, reported in docs/PERFORMANCE.md) on a
two-trial, one-epoch search: the same trials with and without the cache, the cached one never running the teacher
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
    argv = ["--trials", "2", "--workers", "2", "--epochs", "1", "--out", str(tmp_path / "runs"), "--json", str(report)]
    assert bench.main(argv) == 0
    result = json.loads(report.read_text())
    cached, uncached = result["searches"]["cached"], result["searches"]["uncached"]
    assert result["trials"] == 2 and result["epochs"] == 1 and result["speedup"] > 0
    assert cached["tried"] == uncached["tried"] and len(cached["tried"]) == 2  # one sampler seed: the same configs
    # the first trial fills the cache, the second reads all of it; without the cache nothing is stored or read
    assert cached["rows_computed"] == cached["rows_read"] > 0
    assert uncached["rows_computed"] == uncached["rows_read"] == 0
    assert "faster with the cache" in capsys.readouterr().out
