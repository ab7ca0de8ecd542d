"""Sites dying and coming back, with real processes over mutual TLS."""

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from fedgen.cli.demo import write_consortium
from fedgen.client.ledger import PrivacyLedger
from fedgen.config import AggregatorConfig, RunConfig, load_toml, to_toml
from fedgen.lineage import read_records
from fedgen.processes import ProcessGroup, wait_for_port
from fedgen.server.coordinator import follow, submit

from .processes import processes_in_session

pytestmark = pytest.mark.slow
FEDGEN = [sys.executable, "-m", "fedgen.cli"]


def _wait_until_it_takes_work(site: int, timeout: float = 180) -> None:
    """Wait until the site started in session ``site`` runs a ClientApp: it has taken a message.

    Flower starts one ClientApp process per message, in the SuperNode's session; it lives until
    the site has replied, and first spends seconds importing torch.
    """
    deadline = time.monotonic() + timeout
    while not any("flwr-clientapp" in args for args in processes_in_session(site).values()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the site in session {site} ran no ClientApp within {timeout:.0f} s")
        time.sleep(0.1)


def test_a_site_killed_mid_round_is_reported_and_rejoins_later(tmp_path: Path, process_tree):
    aggregator_toml, site_tomls, run_toml = write_consortium(tmp_path, sites=3, rounds=3, epsilon=8.0, seed=0)
    run = load_toml(run_toml, RunConfig)
    # Flower reports the killed site within about a minute (missed heartbeats); the round timeout
    # only bounds the live sites, which a machine busy with other test runs can make slow.
    training = run.training.model_copy(update={"round_timeout": 300.0, "min_updates": 2, "local_epochs": 0.5})
    run_toml.write_text(to_toml(run.model_copy(update={"training": training}), run_toml))
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    (tmp_path / "logs").mkdir()
    group = ProcessGroup(tmp_path / "logs")
    rounds, restarted = [], []
    try:
        process, log = group.start("aggregator", [*FEDGEN, "aggregator", "start", "--config", str(aggregator_toml)])
        wait_for_port(aggregator.fleet_port, process, log)
        sites = [group.start(t.parent.name, [*FEDGEN, "site", "start", "--config", str(t)])[0] for t in site_tomls]
        submitted = submit(load_toml(run_toml, RunConfig), str(run_toml))
        _wait_until_it_takes_work(sites[2].pid)  # round 1's train message
        os.killpg(sites[2].pid, signal.SIGKILL)  # the SuperNode and its ClientApp, mid-round

        def on_round(result) -> None:
            rounds.append(result)
            if not restarted:  # bring site-2 back once round 1 is over
                restarted.append(
                    group.start("site-2-again", [*FEDGEN, "site", "start", "--config", str(site_tomls[2])])
                )

        result = follow(submitted, on_round, poll_seconds=1)
    finally:
        group.stop()
    assert process_tree.wait_until_ended() == {}

    first = {s.site: s for s in result.rounds[0].sites}
    assert first["site-0"].status == first["site-1"].status == "trained"
    lost = [s for s in result.rounds[0].sites if s.site not in ("site-0", "site-1")]
    assert len(lost) == 1 and lost[0].status == "failed" and lost[0].reason  # the dead site, reported
    assert result.rounds[0].model_digest  # the round committed without it
    later = [s.site for r in result.rounds[1:] for s in r.sites if s.status == "trained"]
    assert "site-2" in later  # it rejoined as itself (same certificate, same node identity)
    ledger = PrivacyLedger.open(site_tomls[2].parent / "state", accountant="rdp", delta=1e-5)
    last_reported = [s.epsilon for r in result.rounds for s in r.sites if s.site == "site-2" and s.epsilon]
    assert ledger.epsilon == pytest.approx(last_reported[-1])  # its budget carried across the restart
    records = read_records(aggregator.state_dir / "lineage.jsonl")
    assert [r["type"] for r in records] == ["run_started"] + ["round_committed"] * 3 + ["run_finished"]
    assert records[1]["body"]["failed"][0]["reason"] == lost[0].reason


def _wait_until_unlocked(ledger: Path, timeout: float = 60) -> None:
    """The killed aggregator's ServerApp holds the ledger until Flower's watchdog ends it."""
    import fcntl

    deadline = time.monotonic() + timeout
    with open(ledger.with_suffix(ledger.suffix + ".lock"), "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def test_aggregator_killed_mid_run_resumes_without_repeating_or_losing_a_round(tmp_path: Path, process_tree):
    from fedgen import pki
    from fedgen.lineage import verify
    from fedgen.server.coordinator import RunFailed

    aggregator_toml, site_tomls, run_toml = write_consortium(tmp_path, sites=2, rounds=3, epsilon=8.0, seed=0)
    run = load_toml(run_toml, RunConfig)
    run_toml.write_text(
        to_toml(run.model_copy(update={"training": run.training.model_copy(update={"local_epochs": 0.5})}), run_toml)
    )
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    ledger = aggregator.state_dir / "lineage.jsonl"
    (tmp_path / "logs").mkdir()
    group = ProcessGroup(tmp_path / "logs")
    start_aggregator = [*FEDGEN, "aggregator", "start", "--config", str(aggregator_toml)]
    committed = []
    try:
        first, log = group.start("aggregator", start_aggregator)
        wait_for_port(aggregator.fleet_port, first, log)
        for site_toml in site_tomls:
            group.start(site_toml.parent.name, [*FEDGEN, "site", "start", "--config", str(site_toml)])
        submitted = submit(load_toml(run_toml, RunConfig), str(run_toml))

        def kill_aggregator_after_round_1() -> None:
            if committed and first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()  # reaped, as its service manager would: Flower's watchdogs see it gone

        with pytest.raises(RunFailed):
            follow(submitted, committed.append, poll_seconds=0.5, check=kill_aggregator_after_round_1)
        assert [r.round for r in committed] == [1]
        _wait_until_unlocked(ledger)

        second, log = group.start("aggregator-again", start_aggregator)
        wait_for_port(aggregator.fleet_port, second, log)
        resumed = submit(load_toml(run_toml, RunConfig), str(run_toml), resume=True)
        result = follow(resumed, poll_seconds=1)
    finally:
        group.stop()

    assert [r.round for r in result.rounds] == [2, 3]
    records = read_records(ledger)
    rounds = [r["body"]["round"] for r in records if r["type"] == "round_committed"]
    assert sorted(rounds) == [1, 2, 3]  # none repeated, none lost
    restart = [r for r in records if r["type"] == "run_started"][-1]
    assert restart["body"]["resumes"]["after_round"] == 1
    round_1, round_2 = [r["body"] for r in records if r["type"] == "round_committed"][:2]
    assert round_2["model_in"]["digest"] == round_1["model_out"]["digest"]
    certs = pki.layout(tmp_path / "certs")
    report = verify(
        ledger,
        pki.load_certificate(certs.lineage_cert),
        checkpoints_dir=aggregator.state_dir / "checkpoints",
        ca_certificate=pki.load_certificate(certs.ca_cert),
    )
    assert report.ok, report.error
    # The sites' receipts agree: the resumed run's rounds carry on the numbering they signed.
    from fedgen.lineage.receipts import check_receipts, collect_receipts

    witnessed = check_receipts(
        read_records(ledger),
        collect_receipts([t.parent / "state" for t in site_tomls]),
        [pki.load_certificate(certs.lineage_cert)],
    )
    assert witnessed.ok, [f.detail for f in witnessed.findings if f.failed]
    assert witnessed.count("witnessed") >= 2 * 3 - 2  # each site, each committed round (a late reply aside)
    # The killed aggregator's SuperExec and ServerApp ended too (the ServerApp by its orphan watch).
    assert process_tree.wait_until_ended() == {}
