"""Zero egress, proven by syscall trace: each launcher, started by hand, calls nothing outside
the consortium's loopback: no DNS lookup, no telemetry, no update check, no package index.

Each launcher runs as an operator would start it from a shell where none of fedgen's
phone-home switches are set, under ``strace -f`` (every child process included); the
trace is the assertion, see tests/egress_trace.py. strace exits only when the last
process it traces has, so a launcher that returned left nothing running behind it.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedgen.cli.demo import write_consortium
from fedgen.config import AggregatorConfig, RunConfig, SiteConfig, load_toml, to_toml
from fedgen.processes import ProcessGroup, wait_for_port
from fedgen.sovereignty import NO_PHONE_HOME

from ..egress_trace import EgressPolicy, find_egress, strace_command

pytestmark = pytest.mark.slow
FEDGEN = str(Path(sys.executable).with_name("fedgen"))  # the console script an operator runs
RUN_TIMEOUT = 400.0
STOP_TIMEOUT = 60.0


def _operator_shell() -> dict[str, str]:
    """The environment of an operator's shell: none of fedgen's phone-home switches set."""
    return {name: value for name, value in os.environ.items() if name not in NO_PHONE_HOME}


def _start_traced(group: ProcessGroup, name: str, args: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    """Start ``args`` under strace in its own session, tracked by ``group``; (process, log, trace)."""
    assert shutil.which("strace"), "strace is needed to prove zero egress (.ci/run installs it)"
    trace = group.log_dir / f"{name}.strace"
    process, log = group.start(name, [*strace_command(trace), *args], env=_operator_shell())
    return process, log, trace


def _stop(process: subprocess.Popen, log: Path) -> None:
    """SIGTERM the process's session, as a service manager stops it; it must exit cleanly.

    strace keeps running through the signal (fatal signals are blocked while it traces a
    command into a file) and exits with its command's status once the last child is gone.
    """
    os.killpg(process.pid, signal.SIGTERM)
    code = process.wait(timeout=STOP_TIMEOUT)
    assert code == 0, f"{log.stem} did not stop cleanly (exit {code}):\n" + log.read_text(errors="replace")[-2000:]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> dict:
    """A one-site loopback consortium, each launcher traced: aggregator and site started by
    hand, one round run with `fedgen run`, then the site and the aggregator stopped."""
    root = tmp_path_factory.mktemp("egress")
    aggregator_toml, site_tomls, run_toml = write_consortium(root, sites=1, rounds=1, epsilon=8.0, seed=0)
    run = load_toml(run_toml, RunConfig)
    run_toml.write_text(
        to_toml(run.model_copy(update={"training": run.training.model_copy(update={"local_epochs": 0.1})}), run_toml)
    )
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    site = load_toml(site_tomls[0], SiteConfig)
    (root / "logs").mkdir()
    group = ProcessGroup(root / "logs")
    try:
        aggregator_process, aggregator_log, aggregator_trace = _start_traced(
            group, "aggregator", [FEDGEN, "aggregator", "start", "--config", str(aggregator_toml)]
        )
        wait_for_port(aggregator.fleet_port, aggregator_process, aggregator_log)
        wait_for_port(aggregator.control_port, aggregator_process, aggregator_log)
        site_process, site_log, site_trace = _start_traced(
            group, "site", [FEDGEN, "site", "start", "--config", str(site_tomls[0])]
        )
        run_process, run_log, run_trace = _start_traced(group, "run", [FEDGEN, "run", "--config", str(run_toml)])
        code = run_process.wait(timeout=RUN_TIMEOUT)
        assert code == 0, f"fedgen run failed (exit {code}):\n" + run_log.read_text(errors="replace")[-3000:]
        _stop(site_process, site_log)
        _stop(aggregator_process, aggregator_log)
    finally:
        group.stop()
    ports = frozenset({aggregator.fleet_port, aggregator.control_port, site.runtime_port})
    return {
        "policy": EgressPolicy(loopback_ports=ports),
        "aggregator": aggregator_trace,
        "site": site_trace,
        "run": run_trace,
    }


def test_aggregator_start_calls_nothing_outside_the_consortium(deployment):
    assert find_egress(deployment["aggregator"].read_text(), deployment["policy"], "aggregator start") == []


def test_site_start_and_stop_call_nothing_outside_the_consortium(deployment):
    assert find_egress(deployment["site"].read_text(), deployment["policy"], "site start") == []


def test_fedgen_run_calls_nothing_outside_the_consortium(deployment):
    assert find_egress(deployment["run"].read_text(), deployment["policy"], "fedgen run") == []


def test_simulation_calls_nothing_outside_loopback(tmp_path):
    (tmp_path / "logs").mkdir()
    group = ProcessGroup(tmp_path / "logs")
    try:
        process, log, trace = _start_traced(
            group,
            "simulate",
            [
                FEDGEN,
                "simulate",
                "--sites",
                "2",
                "--rounds",
                "1",
                "--model",
                "nano",
                "--local-epochs",
                "0.2",
                "--out",
                str(tmp_path / "out"),
            ],
        )
        code = process.wait(timeout=RUN_TIMEOUT)
        assert code == 0, f"fedgen simulate failed (exit {code}):\n" + log.read_text(errors="replace")[-3000:]
    finally:
        group.stop()
    # Ray picks its own loopback ports; what matters is that none of its calls leaves loopback.
    assert find_egress(trace.read_text(), EgressPolicy(loopback_ports=None), "fedgen simulate") == []
