"""Simulation at scale: one round with 10 and with 100 virtual sites.

`fedgen.simulate` on Flower's simulation engine (Ray), the test-sized ``nano`` model,
DP on (ε 8 per site), the same small share per site at every scale (sequences drawn
from the bundled promoter training set, IID), one round, a fixed held-out set. Each scale
runs in a fresh process (its own Ray instance); the parent samples the resident set of
that process and all its descendants (Ray's GCS, raylet and workers) every 0.25 s with
psutil and keeps the peak of the sum (an upper bound: pages shared between processes,
such as torch's libraries, count once per process).

Target: t(100) / t(10) <= 11 (time per site-round flat), peak memory bounded (it should
not grow with the number of sites: Ray runs them on as many workers as there are CPUs).

Run: ``python benchmarks/simulation_scale.py`` (``--quick``: 2 and 4 sites).
Figures go to ``benchmarks/results/simulation_scale.json`` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "simulation_scale.json"
PER_SITE = 16
TEST_ROWS = 64


def write_data(root: Path, sites: int) -> Path:
    """A Genomic Benchmarks folder: ``sites`` x PER_SITE training and TEST_ROWS test sequences."""
    from fedgen.data import load_bundled

    for split, count in (("train", sites * PER_SITE), ("test", TEST_ROWS)):
        data = load_bundled(split)
        rows: dict[str, list[str]] = {name: [] for name in data.label_names}
        for i in range(count):
            j = i % len(data)
            rows[data.label_names[data.labels[j]]].append(data.sequences[j])
        (root / split).mkdir(parents=True)
        for label, sequences in rows.items():
            with open(root / split / f"{label}.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["sequence"])
                writer.writerows([s] for s in sequences)
    return root


def worker(sites: int, folder: Path) -> dict:
    """One simulation of ``sites`` sites, one round; its wall time and outcome."""
    import fedgen

    data = write_data(folder / "data", sites)
    start = time.perf_counter()
    result = fedgen.simulate(
        data, sites=sites, rounds=1, model="nano", partition_scheme="iid", epsilon=8.0, out=folder / "run", seed=0
    )
    seconds = time.perf_counter() - start
    trained = sum(s.status == "trained" for s in result.rounds[0].sites)
    return {"simulate_seconds": seconds, "sites_trained": trained, "accuracy": result.rounds[0].accuracy}


def _tree_rss(process) -> int:
    import psutil

    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:  # ended between listing and reading
            pass
    return total


def run_scale(sites: int) -> dict:
    """Run one scale in a fresh process, sampling its process tree's memory meanwhile."""
    import psutil

    with tempfile.TemporaryDirectory(prefix="fedgen-bench-") as tmp:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(sites), tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        peak, peak_processes = 0, 0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, peak_processes
            root = psutil.Process(proc.pid)
            while not done.wait(0.25):
                try:
                    rss = _tree_rss(root)
                    processes = 1 + len(root.children(recursive=True))
                except psutil.Error:
                    return
                peak, peak_processes = max(peak, rss), max(peak_processes, processes)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = proc.communicate()
        done.set()
        sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"simulation of {sites} sites failed:\n{stderr[-3000:]}")
        figures = json.loads(stdout.strip().splitlines()[-1])
        return figures | {
            "process_seconds": time.perf_counter() - start,
            "peak_tree_rss_mib": peak / 2**20,
            "peak_processes": peak_processes,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 and 4 sites: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    small, large = (2, 4) if args.quick else (10, 100)
    rows = {}
    for sites in (small, large):
        rows[str(sites)] = run_scale(sites)
        print(json.dumps({sites: rows[str(sites)]}), flush=True)
    a, b = rows[str(small)], rows[str(large)]
    report = {
        "command": "python benchmarks/simulation_scale.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, torch CPU",
        "model": "nano",
        "examples_per_site": PER_SITE,
        "test_examples": TEST_ROWS,
        "dp_epsilon": 8.0,
        "memory": "peak of the summed RSS of the simulating process and its descendants (Ray), sampled every 0.25 s",
        "scales": rows,
        "site_ratio": large / small,
        "time_ratio": b["simulate_seconds"] / a["simulate_seconds"],
        "process_time_ratio": b["process_seconds"] / a["process_seconds"],
        "memory_ratio": b["peak_tree_rss_mib"] / a["peak_tree_rss_mib"],
        "target_time_ratio": 1.1 * large / small,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), Path(sys.argv[3]))))
    else:
        main()
