"""Round overhead of a deployment: fedgen's polling vs Flower's stock polling, side by side.

Runs the machinery of `fedgen demo` (`fedgen.cli.demo.run_demo`: a CA, an aggregator and
the sites as real processes over mutual TLS on loopback; the same model, data, sites,
seed and training settings each time) twice in one run:

* ``fedgen``: as shipped, without Flower's polling floor (client/supernode.py,
  server/superlink.py, `fedgen.flower_pin.prompt_superexec_polling`);
* ``stock``: with ``FEDGEN_STOCK_FLOWER_POLLING=1``, the internal switch that leaves
  Flower 1.41's own pace (SuperNode idle poll 3 s, ServerApp reply poll 3 s, SuperExec
  task poll 1 s) for this baseline.

A round's overhead is its ``wall_seconds`` (the aggregator's, configure to commit) minus
the slowest trained site's ``train_seconds`` (the site's, inside local training); the
figure per setting is the median over rounds 2 onward (round 1 also waits for the sites
to connect). Also printed: each demo's wall time (start to stop of every process), and
what a fresh Python pays to import the ClientApp module, which each Flower message's
ClientApp process pays again.

Run: ``python benchmarks/round_overhead.py`` (2 sites, 4 rounds, the demo's training
settings: what ``fedgen demo --sites 2 --rounds 4`` runs); ``--quick``: 1 site, 2 rounds
of a twentieth of an epoch, for the test suite. Figures go to
``benchmarks/results/round_overhead.json``.
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

import fedgen  # noqa: F401  (sovereign switches before torch and flwr)

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


def run_demo(setting: str, sites: int, rounds: int, local_epochs: float | None, out: Path) -> dict:
    """The demo's consortium under ``setting`` (its processes inherit this environment);
    its per-round overheads and wall time."""
    from fedgen.cli.demo import run_demo as demo
    from fedgen.config import TrainingConfig

    training = TrainingConfig() if local_epochs is None else TrainingConfig(local_epochs=local_epochs)
    saved = os.environ.pop(STOCK_POLLING_ENV, None)
    os.environ.update(SETTINGS[setting])
    try:
        started = time.perf_counter()
        result = demo(sites=sites, rounds=rounds, seed=0, out=out, training=training)
        wall = time.perf_counter() - started
    finally:
        os.environ.pop(STOCK_POLLING_ENV, None)
        if saved is not None:
            os.environ[STOCK_POLLING_ENV] = saved
    summary = result.summary()
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
    parser.add_argument("--local-epochs", type=float, default=None, help="default: the demo's")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the figures go (JSON)")
    args = parser.parse_args()
    sites = args.sites or (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 4)
    local_epochs = args.local_epochs or (0.05 if args.quick else None)
    if rounds < 2:
        parser.error("--rounds must be at least 2: round 1 also waits for the sites to connect")

    settings = {}
    with tempfile.TemporaryDirectory(prefix="fedgen-round-overhead-") as scratch:
        for setting in SETTINGS:
            print(f"demo consortium, {sites} site(s), {rounds} rounds, {setting} polling ...", file=sys.stderr)
            settings[setting] = run_demo(setting, sites, rounds, local_epochs, Path(scratch) / setting)
    stock, ours = settings["stock"], settings["fedgen"]
    report = {
        "command": " ".join(["python", "benchmarks/round_overhead.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch CPU",
        "sites": sites,
        "rounds": rounds,
        "local_epochs": local_epochs,
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
    print(
        f"stock / fedgen: overhead {report['overhead_ratio_stock_over_fedgen']:.2f}x, "
        f"demo wall {report['demo_wall_ratio_stock_over_fedgen']:.2f}x"
    )
    print(f"a fresh Python importing the ClientApp module: {report['clientapp_import_seconds']:.2f}s")
    print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
