"""A site rejoins as itself after a clean stop, a crash and an aggregator restart (real
processes over mutual TLS): the same Flower node, and it trains in the next round."""

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from fedgen.cli.demo import write_consortium
from fedgen.client.ledger import PrivacyLedger
from fedgen.config import AggregatorConfig, RunConfig, SiteConfig, load_toml, write_toml
from fedgen.processes import ProcessGroup, wait_for_port
from fedgen.server.coordinator import follow, submit
from fedgen.server.fleet_registry import FleetRegistry
from fedgen.state_files import FLEET_REGISTRY_FILE

pytestmark = pytest.mark.slow
FEDGEN = [sys.executable, "-m", "fedgen.cli"]
NODE_ID = re.compile(r"SuperNode ID: (\d+)")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """An aggregator and two sites running; runs of one short round."""
    root = tmp_path_factory.mktemp("rejoin")
    aggregator_toml, site_tomls, run_toml = write_consortium(root, sites=2, rounds=1, epsilon=50.0, seed=0)
    run = load_toml(run_toml, RunConfig)
    write_toml(
        run.model_copy(update={"training": run.training.model_copy(update={"local_epochs": 0.25, "site_wait": 180.0})}),
        run_toml,
    )
    for toml in site_tomls:  # a fixed noise: each one-round run spends a little, not the whole budget
        site = load_toml(toml, SiteConfig)
        write_toml(site.model_copy(update={"privacy": site.privacy.model_copy(update={"noise_multiplier": 1.0})}), toml)
    (root / "logs").mkdir()
    group = ProcessGroup(root / "logs")
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    state = {
        "group": group,
        "aggregator_toml": aggregator_toml,
        "aggregator": aggregator,
        "run_toml": run_toml,
        "sites": {},
        "root": root,
    }
    try:
        _start_aggregator(state, "aggregator")
        for toml in site_tomls:
            _start_site(state, toml.parent.name, toml.parent.name)
        yield state
    finally:
        group.stop()


def _start_aggregator(state: dict, name: str) -> None:
    process, log = state["group"].start(
        name, [*FEDGEN, "aggregator", "start", "--config", str(state["aggregator_toml"])]
    )
    state["aggregator_process"], state["aggregator_log"] = process, log
    wait_for_port(state["aggregator"].fleet_port, process, log)
    wait_for_port(state["aggregator"].control_port, process, log)


def _start_site(state: dict, site: str, name: str) -> float:
    """Start a site's `fedgen site start`; seconds until it holds an active Flower node."""
    toml = state["root"] / "sites" / site / "site.toml"
    started = time.monotonic()
    process, log = state["group"].start(name, [*FEDGEN, "site", "start", "--config", str(toml)])
    state["sites"][site] = (process, log, toml)
    _wait_for_node(process, log)
    return time.monotonic() - started


def _wait_for_node(process, log: Path, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while not (found := NODE_ID.findall(log.read_text(errors="replace"))):
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no active node after {timeout} s: {log}"
        time.sleep(0.5)
    return int(found[-1])


def _node(state: dict, site: str) -> int:
    process, log, _ = state["sites"][site]
    return _wait_for_node(process, log)


def _rounds_in_ledger(state: dict, site: str) -> int:
    ledger = PrivacyLedger.open(state["root"] / "sites" / site / "state", accountant="rdp", delta=1e-5)
    return len(ledger.rounds)


def _one_round_trains_both(state: dict) -> None:
    before = {site: _rounds_in_ledger(state, site) for site in ("site-0", "site-1")}
    result = follow(submit(load_toml(state["run_toml"], RunConfig), str(state["run_toml"])), poll_seconds=1)
    statuses = {s.site: s.status for s in result.rounds[0].sites}
    assert statuses == {"site-0": "trained", "site-1": "trained"}, result.rounds[0].sites
    assert {site: _rounds_in_ledger(state, site) for site in before} == {s: n + 1 for s, n in before.items()}


def _registered_nodes(state: dict, site: str) -> list[int]:
    return FleetRegistry(state["aggregator"].state_dir / FLEET_REGISTRY_FILE).nodes_of(site)


def _stop(process, sig: int) -> int:
    os.killpg(process.pid, sig)
    return process.wait(timeout=60)


def test_a_site_rejoins_as_itself_after_a_clean_stop(federation):
    node = _node(federation, "site-1")
    process, _, _ = federation["sites"]["site-1"]
    assert _stop(process, signal.SIGTERM) == 0  # a clean stop, not a failure
    seconds = _start_site(federation, "site-1", "site-1-after-stop")
    assert _node(federation, "site-1") == node  # the same node: registered under its certificate key
    print(f"rejoined {seconds:.1f} s after `fedgen site start` (clean stop)")
    _one_round_trains_both(federation)
    assert _registered_nodes(federation, "site-1") == [node]


def test_a_site_rejoins_as_itself_after_a_crash(federation):
    node = _node(federation, "site-1")
    process, _, _ = federation["sites"]["site-1"]
    assert _stop(process, signal.SIGKILL) == -signal.SIGKILL
    # Its session is still marked online at the aggregator: the restarted site replaces it
    # instead of waiting for Flower's heartbeat timeout (a minute).
    seconds = _start_site(federation, "site-1", "site-1-after-crash")
    assert _node(federation, "site-1") == node
    log = federation["aggregator_log"].read_text(errors="replace")
    assert f"site site-1 reconnected: its previous session of node {node}" in log
    print(f"rejoined {seconds:.1f} s after `fedgen site start` (SIGKILL)")
    _one_round_trains_both(federation)
    assert _registered_nodes(federation, "site-1") == [node]


def test_sites_rejoin_as_themselves_after_an_aggregator_restart(federation):
    nodes = {site: _node(federation, site) for site in ("site-0", "site-1")}
    assert _stop(federation["aggregator_process"], signal.SIGTERM) == 0
    _start_aggregator(federation, "aggregator-again")
    _one_round_trains_both(federation)  # the sites were not restarted: they reconnected
    for site, (process, log, _) in federation["sites"].items():
        assert process.poll() is None
        assert {int(n) for n in NODE_ID.findall(log.read_text(errors="replace"))} == {nodes[site]}
        assert _registered_nodes(federation, site) == [nodes[site]]
