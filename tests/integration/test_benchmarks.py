"""Each benchmark runs, on a tiny setting, and writes its figures (no timed assertions:
the figures themselves come from full runs, recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


def test_hf_finetuning_benchmark_reports_bytes_ratios_and_memory(tmp_path):
    out = tmp_path / "hf.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "hf_finetuning.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert set(settings) == {"lora", "ffa-lora", "full"}
    lora, ffa, full = settings["lora"], settings["ffa-lora"], settings["full"]
    assert ffa["update_tensor_bytes"] < lora["update_tensor_bytes"] < full["update_tensor_bytes"]
    assert report["update_bytes_vs_full"]["lora"] == lora["update_record_bytes"] / full["update_record_bytes"]
    for row in (lora, full):
        assert row["ratio"] == row["dp_step_s"] / row["plain_step_s"] > 0
        assert row["dp_peak_rss_mib"] > 0 and row["plain_peak_rss_mib"] > 0
