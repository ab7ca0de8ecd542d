"""End-to-end simulations on Flower's Ray engine with real Opacus training."""

import json
import subprocess
import sys

import pytest

from fedgen.client.ledger import PrivacyLedger
from fedgen.client.trainer import local_steps, poisson_sample_rate
from fedgen.data import load_bundled
from fedgen.partition import partition
from fedgen.server.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow
CHANCE = 451 / 888  # majority class of the bundled held-out split


def test_two_sites_two_rounds_learn_under_dp(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedgen.cli", "simulate", "--sites", "2", "--rounds", "2",
         "--model", "nano", "--epsilon", "8", "--seed", "0", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"] > CHANCE + 0.1
    first, second = (r["epsilon"] for r in summary["rounds"])
    assert set(first) == set(second) == {"site-0", "site-1"}
    for site in first:
        assert 0 < first[site] < second[site] <= 8.0 + 1e-9
        ledger = PrivacyLedger.open(out / "sites" / site / "state", accountant="rdp", delta=1e-5)
        assert ledger.epsilon == pytest.approx(second[site], rel=1e-9)  # reported = accountant's
    # One checkpoint per round (and the initial model), each loadable and digest-checked.
    checkpoints = sorted((out / "checkpoints").glob("*.safetensors"))
    assert [p.name[:10] for p in checkpoints] == ["round-0000", "round-0001", "round-0002"]
    for path in checkpoints:
        load_checkpoint(path)
    saved = json.loads((out / "result.json").read_text())
    assert saved["final_accuracy"] == summary["final_accuracy"]
    assert [r["checkpoint"] for r in saved["rounds"]] == [str(p) for p in checkpoints[1:]]
    _lineage_approval_and_export(out, checkpoints)


def _fedgen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgen.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _lineage_approval_and_export(out, checkpoints):
    """The run's lineage verifies; a model is exported only once a person approved it."""
    ledger = str(out / "lineage.jsonl")
    verified = _fedgen("lineage", "verify", "--ledger", ledger)
    assert verified.returncode == 0, verified.stderr
    assert "OK, 4 records" in verified.stdout and "2 checkpoint digests" in verified.stdout
    refused = _fedgen("model", "export", "--round", "2", "--ledger", ledger, "--out", str(out / "release"))
    assert refused.returncode == 2 and "not approved" in refused.stderr
    approved = _fedgen("model", "approve", "--round", "2", "--ledger", ledger, "--by", "Dr. Ada Lovelace",
                       "--reason", "held-out accuracy reviewed")
    assert approved.returncode == 0, approved.stderr
    exported = _fedgen("model", "export", "--round", "2", "--ledger", ledger, "--out", str(out / "release"))
    assert exported.returncode == 0, exported.stderr
    card = (out / "release" / "MODEL_CARD.md").read_text()
    head = _fedgen("lineage", "verify", "--ledger", ledger).stdout.split("head ")[1].split(";")[0]
    assert "Approved by Dr. Ada Lovelace" in card and head in card and "| site-0 |" in card
    assert (out / "release" / "model.safetensors").read_bytes() == checkpoints[2].read_bytes()
    prov = json.loads(_fedgen("lineage", "export", "--format", "prov-json", "--ledger", ledger).stdout)
    assert {"entity", "activity", "agent", "wasGeneratedBy", "used", "wasAssociatedWith"} <= set(prov)
    # One changed byte in a checkpoint is named by verify, with the record it breaks.
    blob = bytearray(checkpoints[1].read_bytes())
    blob[-1] ^= 1
    checkpoints[1].write_bytes(bytes(blob))
    broken = _fedgen("lineage", "verify", "--ledger", ledger)
    assert broken.returncode == 1 and "BROKEN at record seq 1" in broken.stderr


def test_site_refuses_the_round_that_would_pass_its_ceiling(tmp_path):
    import fedgen

    # Work out, as each site will, the ε of one and of two rounds at a fixed noise multiplier,
    # and put the ceiling in between: round 1 trains, round 2 must be refused.
    train = load_bundled("train")
    sizes = [len(s) for s in partition(train.labels, 2, "iid", 0)]
    sigma, batch = 1.0, 128
    probe = PrivacyLedger(path=tmp_path / "probe", accountant="rdp", delta=1e-5)
    eps = [[probe.epsilon_of([(sigma, poisson_sample_rate(n, batch), rounds * local_steps(n, batch, 1.0))])
            for n in sizes] for rounds in (1, 2)]
    assert max(eps[0]) < min(eps[1])
    ceiling = (max(eps[0]) + min(eps[1])) / 2

    reported = []
    result = fedgen.simulate(
        sites=2, rounds=2, model="nano", partition_scheme="iid", epsilon=ceiling,
        noise_multiplier=sigma, batch_size=batch, local_epochs=1.0, out=tmp_path / "run",
        on_round=reported.append,
    )
    assert [r.round for r in reported] == [1, 2]  # rounds are reported as they commit
    round1, round2 = result.rounds
    assert [s.status for s in round1.sites] == ["trained", "trained"]
    assert [s.status for s in round2.sites] == ["refused", "refused"]
    assert all("ceiling" in s.reason for s in round2.sites)
    assert round2.model_digest == round1.model_digest  # nothing was aggregated
    for site, spent in round1.epsilon.items():
        ledger = PrivacyLedger.open(tmp_path / "run" / "sites" / site / "state", accountant="rdp", delta=1e-5)
        assert ledger.epsilon == pytest.approx(spent) and spent <= ceiling
