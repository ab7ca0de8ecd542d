"""Aggregating K updates of P parameters: peak memory and time, against memcpy.

For K = 3, 10, 100 updates of P float32 parameters (split into named arrays as a model's
layers are), each (strategy, K) in a fresh process:

* flower: Flower's strategies on their own (`fedgen.strategies.registry.make_strategy`, then
  ``aggregate_train`` on all K replies at once, as Flower's stock grid hands them over):
  fedavg, fedprox, fedadam, and the robust rules median, fedtrimmedavg, krum;
* fedgen: the aggregator's own path, `fedgen.strategies.recorder.RecordingStrategy` around
  the same strategy, fed the K replies one at a time as fedgen's grid gives them
  (`fedgen.server.superlink.prompt_replies`), each made only when it "arrives". Every
  reply is decoded, digest-checked and validated as in a run; for fedavg, fedprox and
  fedadam it is added to a running mean and released, the robust rules keep them all.

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
import tempfile
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


class _Grid:
    def __init__(self, sites: int) -> None:
        self.sites = sites

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.sites + 1))


def _stage_replies(sites: int, parameters: int, folder: Path) -> None:
    """Write each site's update to ``folder`` as the bytes a reply carries (and the index
    ``staged.json``), so that in the measured process a reply can "arrive" as a pulled one
    does: its bytes, and nothing else, in memory."""
    from fedgen.params import arrays_to_record, digest

    staged = []
    for k in range(sites):
        arrays = _update(k, parameters)
        ((key, array),) = arrays_to_record(arrays).items()  # one dtype: one packed Array
        (folder / f"update-{k}.bin").write_bytes(array.data)
        staged.append({"key": key, "dtype": array.dtype, "shape": list(array.shape), "stype": array.stype,
                       "file": f"update-{k}.bin", "digest": digest(arrays)})  # fmt: skip
    (folder / "staged.json").write_text(json.dumps(staged))


def _staged(folder: Path) -> list[dict]:
    return [entry | {"path": folder / entry["file"]} for entry in json.loads((folder / "staged.json").read_text())]


def _site_reply(index: int, staged: dict, weight: int):
    """Site ``index``'s full train reply (update, report, digest), its update read from disk."""
    from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, RecordDict

    from fedgen.protocol import ARRAYS_KEY, METRICS_KEY, SITE_KEY, TrainReport, site_record

    report = TrainReport(
        num_examples=weight, train_loss=0.5, steps=3, sample_rate=0.1, noise_multiplier=1.0,
        max_grad_norm=1.0, epsilon=1.0, delta=1e-5, dp=True, train_seconds=1.0,
    )  # fmt: skip
    metadata = Metadata(
        run_id=1, message_id="", src_node_id=index + 1, dst_node_id=0, reply_to_message_id="m",
        group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN,
    )  # fmt: skip
    update = Array(
        dtype=staged["dtype"], shape=tuple(staged["shape"]), stype=staged["stype"], data=staged["path"].read_bytes()
    )
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({staged["key"]: update}),
            METRICS_KEY: report.to_record(),
            SITE_KEY: site_record(f"site-{index}", staged["digest"]),
        }
    )
    return Message(metadata=metadata, content=content)


def _recorder(name: str, sites: int, parameters: int):
    """fedgen's recording strategy around ``name``, having sent round 1's zero model."""
    from flwr.app import ConfigRecord

    from fedgen.params import arrays_to_record
    from fedgen.strategies.recorder import RecordingStrategy

    recorder = RecordingStrategy(_strategy(name, sites, parameters))
    size = parameters // ARRAYS
    zeros = arrays_to_record({f"layer{i}.weight": np.zeros(size, np.float32) for i in range(ARRAYS)})
    recorder.configure_train(1, zeros, ConfigRecord(), _Grid(sites))
    return recorder


def worker(path: str, name: str, sites: int, parameters: int, folder: str) -> dict:
    """Aggregate ``sites`` updates with ``name`` along ``path`` ("flower" or "fedgen"; the
    latter reads the replies staged in ``folder``)."""
    from flwr.supercore.task_identity import TaskIdentity

    # Building a Message needs the running Flower task's identity, which a ServerApp has.
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    weights = [100 + 7 * k for k in range(sites)]
    # A rehearsal on one-value arrays: Flower's and fedgen's lazy imports happen now, not
    # under tracemalloc (which would count them and slow them down by orders of magnitude).
    if path == "flower":
        rehearsal = [_reply(k, _update(k, ARRAYS), weights[k]) for k in range(sites)]
        _strategy(name, sites, ARRAYS).aggregate_train(1, rehearsal)
        strategy = _strategy(name, sites, parameters)
    else:
        with tempfile.TemporaryDirectory() as tiny:
            _stage_replies(sites, ARRAYS, Path(tiny))
            rehearsal = [_site_reply(k, staged, weights[k]) for k, staged in enumerate(_staged(Path(tiny)))]
        _recorder(name, sites, ARRAYS).aggregate_train(1, rehearsal)
        strategy, staged = _recorder(name, sites, parameters), _staged(Path(folder))
    del rehearsal
    gc.collect()
    rss_before = rss_mib()
    tracemalloc.start()
    if path == "flower":
        replies = [_reply(k, _update(k, parameters), weights[k]) for k in range(sites)]
        held = tracemalloc.get_traced_memory()[0]
    else:
        # Each reply exists from its arrival on, as its bytes.
        replies, held = (_site_reply(k, staged[k], weights[k]) for k in range(sites)), 0
    start = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    seconds = time.perf_counter() - start
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
        with tempfile.TemporaryDirectory(prefix="fedgen-aggregation-") as folder:
            _stage_replies(sites, parameters, Path(folder))
            for path, name in [("flower", name) for name in FLOWER] + [("fedgen", name) for name in FLOWER]:
                measured = run_worker(__file__, path, name, sites, parameters, folder)
                row = {"path": path, "strategy": name, "K": sites} | measured
                memcpy_seconds = sites * update_bytes / (bandwidth * 1e9)
                row["seconds_over_memcpy"] = row["seconds"] / memcpy_seconds
                row["needs_all_K"] = name in ROBUST
                print(json.dumps(row), flush=True)
                rows.append(row)
    streamed = [r for r in rows if r["path"] == "fedgen" and r["strategy"] in STREAMING]
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
        path, name, sites, parameters, folder = sys.argv[2:7]
        print(json.dumps(worker(path, name, int(sites), int(parameters), folder)))
    else:
        main()
