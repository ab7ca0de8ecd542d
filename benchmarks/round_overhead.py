"""Round overhead of a deployment: fedgen's polling vs Flower's stock polling, side by side.

Runs `fedgen demo` (a CA, an aggregator and the sites as real processes over mutual TLS on
loopback; the same model, data, sites and seed each time) twice in one run:

* ``fedgen``: as shipped, without Flower's polling floor (client/supernode.py,
  server/superlink.py, `fedgen.flower_pin.prompt_superexec_polling`);
* ``stock``: with ``FEDGEN_STOCK_FLOWER_POLLING=1``, the internal switch that leaves
  Flower 1.41's own pace (SuperNode idle poll 3 s, ServerApp reply poll 3 s, SuperExec
  task poll 1 s) for this baseline.

A round's overhead is its ``wall_seconds`` (the aggregator's, configure to commit) minus
the slowest trained site's ``train_seconds`` (the site's, inside local training); the
figure per setting is the median over rounds 2 onward (round 1 also waits for the sites
to connect). Also printed: each demo's wall time, and what a fresh Python pays to import
the ClientApp module, which each Flower message's ClientApp process pays again.

Run: ``python benchmarks/round_overhead.py`` (2 sites, 4 rounds; ``--quick``: 1 site,
2 rounds, for the test suite). Figures go to ``benchmarks/results/round_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "round_overhead.json"
STOCK_POLLING_ENV = "FEDGEN_STOCK_FLOWER_POLLING"  # fedgen.flower_pin.STOCK_POLLING_ENV
SETTINGS = {"stock": {STOCK_POLLING_ENV: "1"}, "fedgen": {}}


def round_overheads(summary: dict) -> list[dict]:
    """Per round of a `--json` summary: wall time, slowest trained site's training, overhead."""
    rows = []
    for entry in summary["rounds"]:
        trained = [s["train_seconds"] for s in entry["sites"] if s["status"] == "trained"]
        slowest = max(trained) if trained else 0.0
        rows.append(
            {
                "round": entry["round"],
                "wall_seconds": entry["wall_seconds"],
                "slowest_train_seconds": slowest,
                "overhead_seconds": entry["wall_seconds"] - slowest,
            }
        )
    return rows


def run_demo(setting: str, sites: int, rounds: int, out: Path) -> dict:
    """`fedgen demo --json` in a fresh process under ``setting``; its summary and wall time."""
    env = {k: v for k, v in os.environ.items() if k != STOCK_POLLING_ENV}
    env.update(SETTINGS[setting])
    command = [sys.executable, "-m", "fedgen.cli", "demo", "--sites", str(sites), "--rounds", str(rounds)]
    command += ["--seed", "0", "--out", str(out), "--json"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"fedgen demo ({setting}) failed with code {proc.returncode}:\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    rows = round_overheads(summary)
    later = [row["overhead_seconds"] for row in rows[1:]] or [rows[0]["overhead_seconds"]]
    return {
        "demo_wall_seconds": wall,
        "rounds": rows,
        "median_overhead_seconds": statistics.median(later),
        "final_accuracy": summary["final_accuracy"],
    }


def clientapp_import_seconds(repeats: int = 3) -> float:
    """Median time for a fresh Python to import the ClientApp module (a cold ClientApp's floor)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import fedgen.client.app"], check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 site, 2 rounds (a smoke test)")
    parser.add_argument("--sites", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the figures go (JSON)")
    args = parser.parse_args()
    sites = args.sites or (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 4)
    if rounds < 2:
        parser.error("--rounds must be at least 2: round 1 also waits for the sites to connect")

    settings = {}
    with tempfile.TemporaryDirectory(prefix="fedgen-round-overhead-") as scratch:
        for setting in SETTINGS:
            print(f"fedgen demo --sites {sites} --rounds {rounds} ({setting} polling) ...", file=sys.stderr)
            settings[setting] = run_demo(setting, sites, rounds, Path(scratch) / setting)
    stock, ours = settings["stock"], settings["fedgen"]
    report = {
        "command": " ".join(["python", "benchmarks/round_overhead.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch CPU",
        "sites": sites,
        "rounds": rounds,
        "settings": settings,
        "overhead_ratio_stock_over_fedgen": stock["median_overhead_seconds"] / ours["median_overhead_seconds"],
        "demo_wall_ratio_stock_over_fedgen": stock["demo_wall_seconds"] / ours["demo_wall_seconds"],
        "clientapp_import_seconds": clientapp_import_seconds(1 if args.quick else 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    print(f"{'setting':8} {'overhead/round (median, rounds 2+)':>36} {'demo wall':>10}")
    for name, row in settings.items():
        print(f"{name:8} {row['median_overhead_seconds']:35.2f}s {row['demo_wall_seconds']:9.1f}s")
        per_round = ", ".join(f"r{r['round']} {r['overhead_seconds']:.2f}s" for r in row["rounds"])
        print(f"         per round: {per_round}")
    print(f"stock / fedgen: overhead {report['overhead_ratio_stock_over_fedgen']:.2f}x, "
          f"demo wall {report['demo_wall_ratio_stock_over_fedgen']:.2f}x")
    print(f"a fresh Python importing the ClientApp module: {report['clientapp_import_seconds']:.2f}s")
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
