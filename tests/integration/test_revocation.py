"""Revocation takes effect without a restart: a site revoked between rounds receives nothing
in the next round (real processes over mutual TLS, the CRL rewritten by `fedgen certs`)."""

import os
import re
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from fedgen import pki
from fedgen.cli.demo import write_consortium
from fedgen.client.ledger import PrivacyLedger
from fedgen.config import AggregatorConfig, RunConfig, load_toml, write_toml
from fedgen.lineage import read_records
from fedgen.processes import ProcessGroup, wait_for_port
from fedgen.server.coordinator import follow, submit

pytestmark = pytest.mark.slow
FEDGEN = [sys.executable, "-m", "fedgen.cli"]
LOG_TIME = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*site site-1 \(node \d+\): certificate revoked", re.MULTILINE
)


class RevokeAfterFirstRound(threading.Thread):
    """Freeze site-1 as soon as it has sent its round-1 reply, revoke it once the aggregator
    has committed round 1, then wait for its `fedgen site start` to exit (reaping it, as a
    service manager would).

    Frozen (SIGSTOP), the site can pull nothing; its log then proves it received exactly
    one train message before the CRL changed, so whatever it receives afterwards would be
    a failure of revocation, not a race of the test. Waiting for the commit matters: a
    node cut off before the ServerApp pulled its reply has that reply replaced by Flower
    with "node unavailable", so a revocation also voids a reply not yet collected.
    """

    def __init__(self, log: Path, process, certs: Path, lineage: Path) -> None:
        super().__init__(daemon=True)
        self.log, self.process, self.certs, self.lineage = log, process, certs, lineage
        self.revoked_wall: datetime | None = None
        self.exit_code: int | None = None
        self.exited_after: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 900
            while "Sent successfully" not in self.log.read_text(errors="replace"):
                assert time.monotonic() < deadline, "site-1 never sent its round-1 reply"
                time.sleep(0.1)
            os.killpg(self.process.pid, signal.SIGSTOP)
            try:
                received = self.log.read_text(errors="replace").count("Receiving: train message")
                assert received == 1, f"site-1 already received {received} train messages"
                while not self.round_1_committed():
                    assert time.monotonic() < deadline, "the aggregator never committed round 1"
                    time.sleep(0.1)
                pki.revoke_site(self.certs, "site-1", "privilege-withdrawn")
                revoked_at, self.revoked_wall = time.monotonic(), datetime.now()
            finally:
                os.killpg(self.process.pid, signal.SIGCONT)
            self.exit_code = self.process.wait(timeout=120)  # refused at its next request
            self.exited_after = time.monotonic() - revoked_at
        except BaseException as exc:  # reported by the test
            self.error = exc

    def round_1_committed(self) -> bool:
        records = read_records(self.lineage) if self.lineage.exists() else []
        return any(r["type"] == "round_committed" for r in records)


def test_a_site_revoked_between_rounds_receives_nothing_more(tmp_path: Path):
    aggregator_toml, site_tomls, run_toml = write_consortium(tmp_path, sites=2, rounds=2, epsilon=50.0, seed=0)
    run = load_toml(run_toml, RunConfig)
    write_toml(
        run.model_copy(
            update={"training": run.training.model_copy(update={"local_epochs": 0.25, "round_timeout": 300.0})}
        ),
        run_toml,
    )
    aggregator = load_toml(aggregator_toml, AggregatorConfig)
    (tmp_path / "logs").mkdir()
    group = ProcessGroup(tmp_path / "logs")
    try:
        process, aggregator_log = group.start(
            "aggregator", [*FEDGEN, "aggregator", "start", "--config", str(aggregator_toml)]
        )
        wait_for_port(aggregator.fleet_port, process, aggregator_log)
        sites = {
            t.parent.name: group.start(t.parent.name, [*FEDGEN, "site", "start", "--config", str(t)])
            for t in site_tomls
        }
        site_1, site_1_log = sites["site-1"]
        revoker = RevokeAfterFirstRound(site_1_log, site_1, tmp_path / "certs", aggregator.state_dir / "lineage.jsonl")
        revoker.start()
        result = follow(submit(load_toml(run_toml, RunConfig), str(run_toml)), poll_seconds=1)
        revoker.join(120)
        assert revoker.error is None, revoker.error
    finally:
        group.stop()

    first, second = ({s.site: s for s in r.sites} for r in result.rounds)
    assert first["site-0"].status == first["site-1"].status == "trained"
    assert second["site-0"].status == "trained"
    assert "site-1" not in second or second["site-1"].status == "failed"  # absent, or its node unavailable
    # It received nothing: no second train message, no training, no budget spent.
    site_log = site_1_log.read_text(errors="replace")
    assert site_log.count("Receiving: train message") == 1
    ledger = PrivacyLedger.open(site_tomls[1].parent / "state", accountant="rdp", delta=1e-5)
    assert len(ledger.rounds) == 1 and ledger.epsilon == pytest.approx(first["site-1"].epsilon)
    assert revoker.exit_code == 1  # it stopped by itself, saying why
    assert "error: the aggregator refused this site: certificate revoked" in site_log
    # The aggregator says why, with the peer's address, and cut the node off by itself.
    log = aggregator_log.read_text(errors="replace")
    assert "Fleet API refused 127.0.0.1 (site site-1): revoked" in log
    cut_off = LOG_TIME.search(log)
    assert cut_off is not None, log[-3000:]
    logged_at = datetime.strptime(cut_off.group(1), "%Y-%m-%d %H:%M:%S,%f")
    cut_off_after = (logged_at - revoker.revoked_wall).total_seconds()
    records = read_records(aggregator.state_dir / "lineage.jsonl")
    round_2 = [r["body"] for r in records if r["type"] == "round_committed"][-1]
    assert [c["site"] for c in round_2["contributions"]] == ["site-0"]
    print(
        f"revoked site cut off {cut_off_after:.2f} s after the CRL was written; "
        f"its `fedgen site start` exited {revoker.exited_after:.1f} s after"
    )
