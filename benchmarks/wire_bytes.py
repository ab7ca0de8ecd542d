"""Bytes on the wire per site per round, against the bytes of the tensors sent.

A real loopback deployment (as `fedgen demo` runs it: consortium CA, aggregator and 2
sites as separate processes over mutual TLS), with one byte-counting TCP forwarder per
site between the site and the aggregator's Fleet port. The forwarder relays the TLS
stream untouched and counts the TCP payload each way (TLS records, HTTP framing and
Flower's messages; not TCP/IP headers). On the same deployment, one run per setting:

* LoRA (r8 on query, value, plus the head) on a Nucleotide-Transformer-v2-50M-shaped ESM
  checkpoint (random weights: nothing is downloaded);
* full fine-tuning of the same checkpoint (every tensor travels).

Each run trains 2 rounds. Round 2 is measured (round 1 also carries the run's start:
the app bundle, registration): the bytes each site sent and received from the moment the
aggregator configured round 2 (its lineage's ``started_at``) to round 2's commit, less
the idle-polling rate measured on the same connections before any run, times that
window. Ratios: upstream bytes / update tensor bytes (the reply) and downstream bytes /
model tensor bytes (the train message); target <= 1.02.

Run: ``python benchmarks/wire_bytes.py`` (``--quick``: a tiny ESM shape).
Figures go to ``benchmarks/results/wire_bytes.json`` and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import fedgen  # noqa: F401  (sovereign switches before torch, transformers, flwr)

RESULTS = Path(__file__).parent / "results" / "wire_bytes.json"
SITES = 2
ROUNDS = 2
IDLE_SECONDS = 15.0  # --quick: 5
EVAL_ROWS = 64  # the aggregator's held-out set: small, so evaluation does not dominate a round


@dataclass
class ByteCounter:
    """TCP forwarders, one listening port per site, all relaying to ``target_port``.

    Every chunk relayed is logged as (monotonic time, site, "up" | "down", bytes).
    """

    target_port: int
    events: list[tuple[float, str, str, int]] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, sites: list[str]) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def listen() -> None:
            for site in sites:
                server = await asyncio.start_server(lambda r, w, site=site: self._relay(site, r, w), "127.0.0.1", 0)
                self.ports[site] = server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(listen(), self._loop)
        if not ready.wait(30):
            raise RuntimeError("byte-counting forwarder did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _relay(self, site: str, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(site, "up", client_reader, server_writer),
            self._pipe(site, "down", server_reader, client_writer),
        )

    async def _pipe(self, site: str, direction: str, reader, writer) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.events.append((time.monotonic(), site, direction, len(data)))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # either side hung up: the other pipe ends too
        finally:
            writer.close()

    def total(self, site: str, direction: str, start: float, end: float) -> int:
        return sum(n for t, s, d, n in list(self.events) if s == site and d == direction and start <= t < end)


def _tensor_bytes(folder: Path, finetune: str) -> dict:
    from fedgen.config import TrainingConfig
    from fedgen.model_source import LocalBase, build_classifier, resolve_model_config
    from fedgen.params import arrays_to_record, to_numpy, trainable_tensors

    config = resolve_model_config(str(folder), TrainingConfig(finetune=finetune), num_labels=2, max_bases=500)
    arrays = to_numpy(trainable_tensors(build_classifier(config, LocalBase(folder))))
    return {
        "trainable_parameters": config.trainable_parameters,
        "tensor_bytes": sum(a.nbytes for a in arrays.values()),
        "record_bytes": arrays_to_record(arrays).count_bytes(),
    }


def _small_eval_set(out: Path) -> Path:
    from fedgen.data import load_bundled

    test = load_bundled("test")
    path = out / "eval.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sequence", "label"])
        for i in range(EVAL_ROWS):
            writer.writerow([test.sequences[i], test.label_names[test.labels[i]]])
    return path


def measure(folder: Path, out: Path, settings: tuple[str, ...], say, idle_seconds: float = IDLE_SECONDS) -> dict:
    """Start the deployment behind the counters, run one run per setting, return the figures."""
    from fedgen.cli.demo import write_consortium
    from fedgen.config import AggregatorConfig, RunConfig, SiteConfig, TrainingConfig, load_toml, write_toml
    from fedgen.lineage import read_records
    from fedgen.processes import ProcessGroup, wait_for_port
    from fedgen.server.coordinator import follow, submit

    # A few DP steps per round: the bytes, not the training, are measured here.
    training = TrainingConfig(model=str(folder), finetune=settings[0], local_epochs=0.01, batch_size=16)
    aggregator_toml, site_tomls, run_toml = write_consortium(
        out, sites=SITES, rounds=ROUNDS, epsilon=1000.0, seed=0, training=training
    )
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    counter = ByteCounter(aggregator.fleet_port)
    counter.start([p.parent.name for p in site_tomls])
    for path in site_tomls:  # each site dials its own counter instead of the Fleet port
        site = load_toml(path, SiteConfig)
        write_toml(site.model_copy(update={"aggregator": f"127.0.0.1:{counter.ports[site.site_id]}"}), path)
    base_run = load_toml(run_toml, RunConfig).model_copy(update={"eval_data": _small_eval_set(out)})
    (out / "logs").mkdir()
    group = ProcessGroup(out / "logs")
    fedgen_cli = [sys.executable, "-m", "fedgen.cli"]
    figures: dict[str, dict] = {}
    clock_offset = time.time() - time.monotonic()  # the counter's clock is monotonic
    try:
        process, log = group.start("aggregator", [*fedgen_cli, "aggregator", "start", "--config", str(aggregator_toml)])
        wait_for_port(aggregator.fleet_port, process, log)
        wait_for_port(aggregator.control_port, process, log)
        for path in site_tomls:
            group.start(path.parent.name, [*fedgen_cli, "site", "start", "--config", str(path)])
        deadline = time.monotonic() + 300
        while {s for _, s, _, _ in list(counter.events)} != set(counter.ports):
            group.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("sites did not reach the aggregator within 300 s")
            time.sleep(0.2)
        idle_start = time.monotonic()
        say(f"sites connected; measuring idle polling for {idle_seconds:.0f} s")
        time.sleep(idle_seconds)  # a measurement window, not a wait for a condition
        idle_end = time.monotonic()
        idle = {
            site: {d: counter.total(site, d, idle_start, idle_end) / (idle_end - idle_start) for d in ("up", "down")}
            for site in counter.ports
        }
        for finetune in settings:
            run = base_run.model_copy(update={"training": base_run.training.model_copy(update={"finetune": finetune})})
            path = write_toml(run, out / f"run-{finetune}.toml")
            commits: list[float] = []
            submitted = submit(load_toml(path, RunConfig), str(path))
            say(f"run {submitted.run_id} ({finetune}) submitted")
            result = follow(
                submitted,
                lambda _, mark=commits.append: mark(time.monotonic()),
                poll_seconds=0.25,
                check=group.check_alive,
            )
            if len(commits) != ROUNDS or any(s.status != "trained" for r in result.rounds for s in r.sites):
                raise RuntimeError(f"run {finetune} did not train {ROUNDS} rounds on every site: {result.to_dict()}")
            # The last round on the aggregator's clock, from configuring it (its train
            # messages leave then) to its commit: when the coordinator notices a commit, the
            # next round's messages may already have crossed.
            records = read_records(aggregator.state_dir / "lineage.jsonl")
            last = [r["body"] for r in records if r["type"] == "round_committed"][-1]
            start = datetime.fromisoformat(last["started_at"]).timestamp() - clock_offset
            end = start + result.rounds[-1].wall_seconds
            per_site = {}
            for site in counter.ports:
                gross = {d: counter.total(site, d, start, end) for d in ("up", "down")}
                per_site[site] = {
                    "gross_bytes": gross,
                    "net_bytes": {d: gross[d] - idle[site][d] * (end - start) for d in gross},
                }
            figures[finetune] = {"round_window_seconds": end - start, "sites": per_site}
    finally:
        group.stop()
        counter.stop()
    return {"idle_bytes_per_second": idle, "runs": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny ESM shape: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from fedgen.hf.random import NT_50M_SHAPE, TINY_SHAPE, esm_checkpoint

    settings = ("lora", "full")
    with tempfile.TemporaryDirectory(prefix="fedgen-bench-") as tmp:
        folder = esm_checkpoint(Path(tmp) / "nt", shape=TINY_SHAPE if args.quick else NT_50M_SHAPE)
        tensors = {finetune: _tensor_bytes(folder, finetune) for finetune in settings}
        (Path(tmp) / "deployment").mkdir()
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        wire = measure(folder, Path(tmp) / "deployment", settings, say, 5.0 if args.quick else IDLE_SECONDS)
    rows = {}
    for finetune in settings:
        sent = tensors[finetune]["tensor_bytes"]
        sites = wire["runs"][finetune]["sites"]
        rows[finetune] = tensors[finetune] | wire["runs"][finetune]
        # Both directions carry the trainable tensors: the global ones down, the update up.
        rows[finetune]["up_over_tensors"] = {s: v["net_bytes"]["up"] / sent for s, v in sites.items()}
        rows[finetune]["down_over_tensors"] = {s: v["net_bytes"]["down"] / sent for s, v in sites.items()}
        rows[finetune]["worst_over_tensors"] = max(
            *rows[finetune]["up_over_tensors"].values(), *rows[finetune]["down_over_tensors"].values()
        )
    report = {
        "command": "python benchmarks/wire_bytes.py" + (" --quick" if args.quick else ""),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "measured": "TCP payload through a byte-counting forwarder between each site and the aggregator's "
        "Fleet port (mutual TLS passes through), round 2 of each run, idle polling subtracted",
        "shape": "tiny" if args.quick else "Nucleotide Transformer v2 50M (ESM, 6-mer, rotary), random weights",
        "sites": SITES,
        "target": 1.02,
        "idle_bytes_per_second": wire["idle_bytes_per_second"],
        "settings": rows,
        "lora_over_full_bytes_up": {
            s: rows["lora"]["sites"][s]["net_bytes"]["up"] / rows["full"]["sites"][s]["net_bytes"]["up"]
            for s in rows["lora"]["sites"]
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
