"""End-to-end simulations on Flower's Ray engine with real Opacus training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedgen.client.ledger import PrivacyLedger
from fedgen.client.trainer import local_steps, poisson_sample_rate
from fedgen.data import load_bundled
from fedgen.lineage import read_records
from fedgen.partition import partition
from fedgen.server.checkpoints import load_checkpoint

pytestmark = pytest.mark.slow
CHANCE = 451 / 888  # majority class of the bundled held-out split


def test_two_sites_two_rounds_learn_under_dp(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedgen.cli",
            "simulate",
            "--sites",
            "2",
            "--rounds",
            "2",
            "--model",
            "nano",
            "--epsilon",
            "8",
            "--seed",
            "0",
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout holds the JSON object and nothing else
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"] > CHANCE + 0.1
    for entry in summary["rounds"]:  # round timing: the aggregator's wall time covers each site's training
        trained = [s["train_seconds"] for s in entry["sites"] if s["status"] == "trained"]
        assert sorted(s["site"] for s in entry["sites"]) == ["site-0", "site-1"] and len(trained) == 2
        assert entry["wall_seconds"] > max(trained) >= min(trained) > 0
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
    return subprocess.run([sys.executable, "-m", "fedgen.cli", *args], capture_output=True, text=True, timeout=300)


def _lineage_approval_and_export(out, checkpoints):
    """The run's lineage verifies; a model is exported only once a person approved it."""
    ledger = str(out / "lineage.jsonl")
    verified = _fedgen("lineage", "verify", "--ledger", ledger)
    assert verified.returncode == 0, verified.stderr
    assert "OK, 4 records" in verified.stdout and "2 checkpoint digests" in verified.stdout
    # Each simulated site kept a receipt of the ledger head of each round it trained.
    receipts = [arg for site in ("site-0", "site-1") for arg in ("--receipts", str(out / "sites" / site / "state"))]
    witnessed = _fedgen("lineage", "verify", "--ledger", ledger, *receipts)
    assert witnessed.returncode == 0, witnessed.stderr
    assert "receipts: 4 checked: 4 witnessed" in witnessed.stdout
    refused = _fedgen("model", "export", "--round", "2", "--ledger", ledger, "--out", str(out / "release"))
    assert refused.returncode == 2 and "not approved" in refused.stderr
    approved = _fedgen(
        "model",
        "approve",
        "--round",
        "2",
        "--ledger",
        ledger,
        "--by",
        "Dr. Ada Lovelace",
        "--reason",
        "held-out accuracy reviewed",
    )
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
    checkpoints[2].unlink()  # a checkpoint the ledger names is gone: a failure, not "1 checked"
    checkpoints[1].write_bytes(bytes(blob[:-1]) + bytes([blob[-1] ^ 1]))
    missing = _fedgen("lineage", "verify", "--ledger", ledger)
    assert missing.returncode == 1 and "BROKEN at record seq 2" in missing.stderr
    assert checkpoints[2].name in missing.stderr and "missing" in missing.stderr


def _epsilons(scheme: str, sigma: float, batch: int) -> list[list[float]]:
    """ε of each of 2 sites after 1 and after 2 rounds, worked out as each site will."""
    train = load_bundled("train")
    sizes = [len(s) for s in partition(train.labels, 2, scheme, 0, alpha=1.0)]
    probe = PrivacyLedger(path=Path("unused"), accountant="rdp", delta=1e-5)
    return [
        [probe.epsilon_of([(sigma, poisson_sample_rate(n, batch), rounds * local_steps(n, batch, 1.0))]) for n in sizes]
        for rounds in (1, 2)
    ]


def test_a_site_at_its_ceiling_refuses_and_the_run_goes_on_without_it(tmp_path):
    import fedgen

    # Dirichlet split: a large site (more privacy amplification) and a small one. The
    # ceiling lets the small site train round 1 only, the large one both rounds.
    (large_1, small_1), (large_2, small_2) = _epsilons("dirichlet", 1.0, 128)
    assert max(large_2, small_1) < small_2
    ceiling = (max(large_2, small_1) + small_2) / 2
    reported = []
    result = fedgen.simulate(
        sites=2,
        rounds=2,
        model="nano",
        partition_scheme="dirichlet",
        epsilon=ceiling,
        noise_multiplier=1.0,
        batch_size=128,
        local_epochs=1.0,
        out=tmp_path / "run",
        on_round=reported.append,
    )
    assert [r.round for r in reported] == [1, 2]  # rounds are reported as they commit
    round1, round2 = result.rounds
    assert [s.status for s in round1.sites] == ["trained", "trained"]
    assert [(s.site, s.status) for s in round2.sites] == [("site-0", "trained"), ("site-1", "refused")]
    assert "ceiling" in round2.sites[1].reason
    assert round2.model_digest != round1.model_digest  # the large site's update was aggregated
    small = PrivacyLedger.open(tmp_path / "run" / "sites" / "site-1" / "state", accountant="rdp", delta=1e-5)
    assert small.epsilon == pytest.approx(round1.epsilon["site-1"]) and small.epsilon <= ceiling
    records = read_records(tmp_path / "run" / "lineage.jsonl")
    assert [r["type"] for r in records] == [
        "run_started",
        "round_committed",
        "site_refused",
        "round_committed",
        "run_finished",
    ]
    assert records[2]["body"]["site"] == "site-1"


def test_a_round_without_quorum_fails_the_run_cleanly(tmp_path):
    import fedgen

    # Label skew: two sites of equal size; round 2 would take both past the ceiling.
    (a_1, b_1), (a_2, b_2) = _epsilons("label-skew", 1.0, 128)
    ceiling = (max(a_1, b_1) + min(a_2, b_2)) / 2
    with pytest.raises(
        RuntimeError,
        match=r"round 2 has 0 valid update\(s\), fewer than the quorum of 1; "
        r"left out: site-0: .*ceiling.*; site-1: .*ceiling",
    ):
        fedgen.simulate(
            sites=2,
            rounds=2,
            model="nano",
            partition_scheme="label-skew",
            epsilon=ceiling,
            noise_multiplier=1.0,
            batch_size=128,
            local_epochs=1.0,
            out=tmp_path / "run",
        )
    records = read_records(tmp_path / "run" / "lineage.jsonl")
    assert [r["type"] for r in records] == [
        "run_started",
        "round_committed",
        "site_refused",
        "site_refused",
        "run_failed",
    ]
    assert len(list((tmp_path / "run" / "checkpoints").glob("round-0001-*"))) == 1  # round 1 kept
    assert not list((tmp_path / "run" / "checkpoints").glob("round-0002-*"))


def test_a_robust_strategy_bounds_the_damage_of_one_poisoned_site(tmp_path):
    import fedgen

    def final(strategy: str, adversaries: dict | None, name: str) -> float:
        return fedgen.simulate(
            sites=3,
            rounds=3,
            epsilon=None,
            partition_scheme="iid",
            local_epochs=1.0,
            strategy=strategy,
            adversaries=adversaries,
            out=tmp_path / name,
        ).final_accuracy

    flip = {"site-0": "sign-flip"}  # sends global - 10 x its honest change
    honest = final("fedavg", None, "honest")
    poisoned_fedavg = final("fedavg", flip, "fedavg")
    poisoned_median = final("median", flip, "median")
    assert honest > CHANCE + 0.15
    assert poisoned_fedavg < honest - 0.15  # FedAvg follows the attacker
    assert poisoned_median > honest - 0.05  # the coordinate-wise median does not
