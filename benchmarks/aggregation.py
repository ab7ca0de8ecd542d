"""Aggregating K updates of P parameters: peak memory and time, against memcpy.

For K = 3, 10, 100 updates of P float32 parameters (split into named arrays as a model's
layers are), each (strategy, K) in a fresh process:

* Flower's strategies as fedgen calls them today (`fedgen.strategies.registry.make_strategy`,
  then ``aggregate_train`` on all K replies, which the ServerApp's grid hands over
  together): fedavg, fedprox, fedadam, and the robust rules median, fedtrimmedavg, krum;
* streaming: `fedgen.strategies.accumulate.RunningMean` fed one update at a time as it
  would arrive, each dropped once added (fedavg; fedadam = Flower's FedAdam step applied
  to the streamed mean, handed over as a single reply). FedProx aggregates as FedAvg does
  (its proximal term acts on the sites), so it streams the same way.

Peak memory is tracemalloc's peak of Python and numpy allocations during aggregation,
above what the process held before (the replies, for Flower's path, count: they are what
the aggregator must hold), divided by one update's bytes; ru_maxrss growth is recorded
beside it. The machine's memcpy bandwidth (numpy copy of a large array) is measured in
the same run, so time also reads as "x memcpy of the K updates' bytes".

Run: ``python benchmarks/aggregation.py`` (``--quick``: small P, K = 3 and 10).
Figures go to ``benchmarks/results/aggregation.json`` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from worker_process import rss_mib, run_worker  # a sibling: benchmarks run as scripts

import fedgen  # noqa: F401  (sovereign switches before flwr)

RESULTS = Path(__file__).parent / "results" / "aggregation.json"
FLOWER = ("fedavg", "fedprox", "fedadam", "median", "fedtrimmedavg", "krum")
STREAMING = ("fedavg", "fedprox", "fedadam")
ROBUST = ("median", "fedtrimmedavg", "krum")
ARRAYS = 8  # named arrays per update, like a model's layers


def _update(index: int, parameters: int) -> dict[str, np.ndarray]:
    """Site ``index``'s update: ``parameters`` float32 values in ``ARRAYS`` named arrays."""
    rng = np.random.default_rng(index)
    size = parameters // ARRAYS
    return {f"layer{i}.weight": rng.standard_normal(size, dtype=np.float32) for i in range(ARRAYS)}


def _reply(index: int, arrays: dict[str, np.ndarray], weight: int):
    from flwr.app import Message, MessageType, Metadata, MetricRecord, RecordDict

    from fedgen.params import arrays_to_record
    from fedgen.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

    metadata = Metadata(
        run_id=1, message_id="", src_node_id=index + 1, dst_node_id=0, reply_to_message_id="m",
        group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN,
    )  # fmt: skip
    content = RecordDict({ARRAYS_KEY: arrays_to_record(arrays), METRICS_KEY: MetricRecord({WEIGHT_KEY: weight})})
    return Message(metadata=metadata, content=content)


def _strategy(name: str, sites: int, parameters: int):
    from fedgen.strategies.registry import make_strategy

    strategy = make_strategy(name, min_sites=sites)
    if name == "fedadam":  # the global model FedAdam steps from (set by configure_train in a run)
        from fedgen.params import arrays_to_record

        size = parameters // ARRAYS
        record = arrays_to_record({f"layer{i}.weight": np.zeros(size, np.float32) for i in range(ARRAYS)})
        strategy.current_arrays = {key: array.numpy() for key, array in record.items()}
    return strategy


def worker(path: str, name: str, sites: int, parameters: int) -> dict:
    """Aggregate ``sites`` updates with ``name`` along ``path`` ("flower" or "streaming")."""
    from fedgen.strategies.accumulate import RunningMean

    strategy = _strategy(name, sites, parameters)
    weights = [100 + 7 * k for k in range(sites)]
    # A rehearsal on one-value arrays: Flower's and fedgen's lazy imports happen now, not
    # under tracemalloc (which would count them and slow them down by orders of magnitude).
    rehearsal = RunningMean()
    rehearsal.add(_update(0, ARRAYS), 1)
    rehearse = [_reply(k, _update(k, ARRAYS), weights[k]) for k in range(sites)]
    _strategy(name, sites, ARRAYS).aggregate_train(1, rehearse if path == "flower" else rehearse[:1])
    del rehearsal, rehearse
    gc.collect()
    rss_before = rss_mib()
    tracemalloc.start()
    if path == "flower":
        replies = [_reply(k, _update(k, parameters), weights[k]) for k in range(sites)]
        held = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        arrays, _ = strategy.aggregate_train(1, replies)
        seconds = time.perf_counter() - start
    else:
        held, seconds = 0, 0.0
        mean = RunningMean()
        for k in range(sites):
            update = _update(k, parameters)  # arrives
            start = time.perf_counter()
            mean.add(update, weights[k])
            seconds += time.perf_counter() - start
            del update  # dropped once added
        start = time.perf_counter()
        result = mean.result()
        del mean
        if name == "fedadam":  # Flower's own server step, on the streamed mean as one reply
            arrays, _ = strategy.aggregate_train(1, [_reply(0, result, 1)])
        else:
            arrays = result
        seconds += time.perf_counter() - start
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert arrays is not None, f"{name} returned no aggregate"
    update_bytes = parameters // ARRAYS * ARRAYS * 4
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "peak_over_update": peak / update_bytes,
        "replies_held_over_update": held / update_bytes,
        "rss_growth_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before,
    }


def memcpy_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-``repeats`` numpy copy bandwidth, GB/s of bytes copied (each byte read and written once)."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return src.nbytes / best / 1e9


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small P, K = 3 and 10: a smoke test")
    parser.add_argument("--parameters", type=int, default=2**20 * 4, help="P, float32 parameters per update")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    parameters = 2**16 if args.quick else args.parameters
    counts = (3, 10) if args.quick else (3, 10, 100)
    update_bytes = parameters // ARRAYS * ARRAYS * 4
    bandwidth = memcpy_gbps(64 if args.quick else 512)
    rows = []
    for sites in counts:
        for path, names in (("flower", FLOWER), ("streaming", STREAMING)):
            for name in names:
                row = {"path": path, "strategy": name, "K": sites} | run_worker(__file__, path, name, sites, parameters)
                memcpy_seconds = sites * update_bytes / (bandwidth * 1e9)
                row["seconds_over_memcpy"] = row["seconds"] / memcpy_seconds
                row["needs_all_K"] = name in ROBUST
                print(json.dumps(row), flush=True)
                rows.append(row)
    streamed = [r for r in rows if r["path"] == "streaming"]
    report = {
        "command": "python benchmarks/aggregation.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
        "parameters": parameters,
        "update_bytes": update_bytes,
        "arrays_per_update": ARRAYS,
        "memcpy_gb_per_s": bandwidth,
        "target_streaming_peak_over_update": 3.0,
        "streaming_worst_peak_over_update": max(r["peak_over_update"] for r in streamed),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, name, sites, parameters = sys.argv[2:6]
        print(json.dumps(worker(path, name, int(sites), int(parameters))))
    else:
        main()
