"""The round-overhead benchmark runs on its tiny setting and writes its figures (no timed
assertions: the figures come from full runs, recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def test_round_overhead_benchmark_compares_fedgen_with_stock_flower(tmp_path, process_tree):
    out = tmp_path / "round_overhead.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "round_overhead.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sites"] == 1 and report["rounds"] == 2
    settings = report["settings"]
    assert set(settings) == {"stock", "fedgen"}
    for row in settings.values():
        assert [r["round"] for r in row["rounds"]] == [1, 2]
        for r in row["rounds"]:
            assert r["wall_seconds"] > r["slowest_train_seconds"] > 0
            assert r["overhead_seconds"] == r["wall_seconds"] - r["slowest_train_seconds"]
        assert row["median_overhead_seconds"] == row["rounds"][1]["overhead_seconds"]
        assert row["demo_wall_seconds"] > sum(r["wall_seconds"] for r in row["rounds"])
    ratio = settings["stock"]["median_overhead_seconds"] / settings["fedgen"]["median_overhead_seconds"]
    assert report["overhead_ratio_stock_over_fedgen"] == ratio
    assert report["clientapp_import_seconds"] > 0
    assert "stock / fedgen: overhead" in proc.stdout
    assert process_tree.running() == {}  # every demo stopped all it started
