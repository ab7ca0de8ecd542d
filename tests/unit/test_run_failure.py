"""`fedgen run` says why a run failed: the ServerApp's reason and the refusals at the door."""

import json
from datetime import datetime, timedelta

from fedgen.server.coordinator import SubmittedRun, failure_report
from fedgen.server.fleet_registry import FleetRegistry, Refusal
from fedgen.state_files import FAILURE_FILE


def _submitted(tmp_path, registry=True) -> SubmittedRun:
    run_dir = tmp_path / "runs" / "20261201T000000Z"
    run_dir.mkdir(parents=True)
    return SubmittedRun(
        run_id="42",
        run_dir=run_dir,
        flwr_home=run_dir / "flwr-home",
        registry=tmp_path / "fleet-registry.json" if registry else None,
    )


def _refusal(at: datetime, peer: str, cause: str, site: str | None = None) -> Refusal:
    return Refusal(time=at.isoformat(), peer=peer, cause=cause, site=site)


def test_the_report_gives_the_serverapps_reason_and_the_refusals_since_submission(tmp_path):
    submitted = _submitted(tmp_path)
    (submitted.run_dir / FAILURE_FILE).write_text(
        json.dumps(
            {
                "reason": "only 1 of 2 sites connected after waiting 120 s (hospital-a); check that every site "
                "runs `fedgen site start`"
            }
        )
    )
    registry = FleetRegistry(submitted.registry)
    before = submitted.submitted_at - timedelta(minutes=5)
    registry.note_refusal(_refusal(before, "10.0.0.5", "expired"))  # an older run's business
    for _ in range(3):
        registry.note_refusal(
            _refusal(submitted.submitted_at + timedelta(seconds=1), "10.0.0.9", "revoked", "hospital-b")
        )
    registry.note_refusal(_refusal(submitted.submitted_at + timedelta(seconds=2), "10.0.0.7", "unknown CA"))
    report = failure_report(submitted, "finished:failed")
    assert report.startswith("run 42 failed: only 1 of 2 sites connected after waiting 120 s (hospital-a)")
    refused = "Refused at the aggregator's Fleet API meanwhile: hospital-b: revoked (x3); 10.0.0.7: unknown CA"
    assert refused in report
    assert "10.0.0.5" not in report and str(submitted.run_dir) in report


def test_without_a_reason_the_report_says_so(tmp_path):
    submitted = _submitted(tmp_path, registry=False)
    report = failure_report(submitted, "finished:stopped")
    assert "run 42 failed: it ended as 'finished:stopped' without a reason from the ServerApp" in report
    assert "Refused" not in report
