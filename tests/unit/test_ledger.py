import json
import subprocess
import sys

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fedgen.client.ledger import (
    CALIBRATION_TOLERANCE,
    BudgetExceeded,
    LedgerError,
    PrivacyLedger,
    RememberingRDPAccountant,
    smallest_fitting,
)
from fedgen.state_files import PRIVACY_LEDGER_FILE


def test_accountant_anchor_rdp(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    assert ledger.epsilon == 0.0
    assert ledger.epsilon_after(1.0, 0.01, 1000) == pytest.approx(2.10137, abs=1e-4)


def test_accountant_anchor_prv(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, accountant="prv", delta=1e-5)
    assert ledger.epsilon_after(1.0, 0.01, 1000) == pytest.approx(1.838, abs=0.02)


def test_ledger_survives_a_fresh_process(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    spent = ledger.commit(
        [(1.0, 0.01, 500)], run_id=1, server_round=1, steps=500, noise_multiplier=1.0, sample_rate=0.01
    )
    code = (
        "import sys, json; from fedgen.client.ledger import PrivacyLedger\n"
        "l = PrivacyLedger.open(sys.argv[1], accountant='rdp', delta=1e-5)\n"
        "e = l.commit(l.history + [(1.0, 0.01, 500)], run_id=1, server_round=2, steps=500,"
        " noise_multiplier=1.0, sample_rate=0.01)\n"
        "print(json.dumps([l.epsilon, len(l.rounds)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    epsilon, rounds = json.loads(out.stdout)
    assert rounds == 2
    # Two halves compose to the same ε as 1000 steps at once: nothing was forgotten.
    assert epsilon == pytest.approx(2.10137, abs=1e-4) and epsilon > spent
    reopened = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    assert reopened.epsilon == pytest.approx(epsilon)
    assert [r["round"] for r in reopened.rounds] == [1, 2]


def test_check_refuses_a_round_past_the_ceiling(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    assert ledger.check(1.0, 0.01, 1000, ceiling=3.0) == pytest.approx(2.10137, abs=1e-4)
    with pytest.raises(BudgetExceeded, match="past the site's ceiling 2"):
        ledger.check(1.0, 0.01, 1000, ceiling=2.0)


def test_calibrate_spends_the_remaining_budget_exactly(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    ledger.commit([(1.5, 0.02, 200)], run_id=1, server_round=1, steps=200, noise_multiplier=1.5, sample_rate=0.02)
    sigma = ledger.calibrate(0.02, 600, ceiling=8.0)
    assert ledger.epsilon_after(sigma, 0.02, 600) <= 8.0
    assert ledger.epsilon_after(sigma * 0.99, 0.02, 600) > 8.0
    with pytest.raises(BudgetExceeded, match="budget exhausted"):
        ledger.calibrate(0.02, 600, ceiling=ledger.epsilon)


def test_changed_delta_or_accountant_is_refused(tmp_path):
    PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5).commit(
        [(1.0, 0.01, 10)], run_id=1, server_round=1, steps=10, noise_multiplier=1.0, sample_rate=0.01
    )
    with pytest.raises(LedgerError, match="delta=1e-05"):
        PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-6)
    with pytest.raises(LedgerError, match="accountant=rdp"):
        PrivacyLedger.open(tmp_path, accountant="prv", delta=1e-5)


def test_corrupt_ledger_is_an_error_not_a_fresh_budget(tmp_path):
    (tmp_path / PRIVACY_LEDGER_FILE).write_text('{"history": [[1.0, 0.01')
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)


def test_commit_leaves_no_temporary_file(tmp_path):
    PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5).commit(
        [(1.0, 0.01, 10)], run_id=1, server_round=1, steps=10, noise_multiplier=1.0, sample_rate=0.01
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [PRIVACY_LEDGER_FILE]


def test_calibrate_reuses_the_runs_sigma_only_while_it_is_the_smallest_that_fits(tmp_path, monkeypatch):
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    first = ledger.calibrate(0.1, 3 * 50, ceiling=8.0, run_id=7)  # a plan of 3 rounds of 50 steps
    history = ledger.make_accountant([(first, 0.1, 50)]).history
    ledger.commit(history, run_id=7, server_round=1, steps=50, noise_multiplier=first, sample_rate=0.1)
    calls = []
    real = ledger.epsilon_after
    monkeypatch.setattr(ledger, "epsilon_after", lambda *a: calls.append(a) or real(*a))
    # Round 2 of the same run: the run's σ is still the smallest that fits, found in two calls.
    assert ledger.calibrate(0.1, 2 * 50, ceiling=8.0, run_id=7) == first
    assert len(calls) == 2
    calls.clear()
    # Another run, or a plan the old σ no longer fits (more steps), searches afresh.
    assert ledger.calibrate(0.1, 2 * 50, ceiling=8.0, run_id=8) == pytest.approx(first, rel=2e-3)
    assert len(calls) > 5
    wider = ledger.calibrate(0.1, 4 * 50, ceiling=8.0, run_id=7)
    assert wider > first and ledger.epsilon_after(wider, 0.1, 200) <= 8.0
    # A looser plan (fewer steps) would waste noise at the old σ: it searches too.
    looser = ledger.calibrate(0.1, 50, ceiling=8.0, run_id=7)
    assert looser < first * (1 - 1e-3)


@pytest.mark.parametrize("sample_rate, steps", [(0.1, 50), (1 / 8, 30), (0.02, 200)])
def test_a_four_round_run_calibrates_once(tmp_path, monkeypatch, sample_rate, steps):
    """Round 1's σ is tight enough that every later round finds it still the smallest that
    fits: one search per run, then two accountant calls a round."""
    ledger = PrivacyLedger.open(tmp_path, accountant="rdp", delta=1e-5)
    sigma = ledger.calibrate(sample_rate, 4 * steps, ceiling=8.0, run_id=3)
    calls = []
    real = ledger.epsilon_after
    monkeypatch.setattr(ledger, "epsilon_after", lambda *a: calls.append(a) or real(*a))
    for server_round in (1, 2, 3, 4):
        history = ledger.history + [(sigma, sample_rate, steps)]
        ledger.commit(
            history, run_id=3, server_round=server_round, steps=steps, noise_multiplier=sigma, sample_rate=sample_rate
        )
        if server_round < 4:
            calls.clear()
            assert ledger.calibrate(sample_rate, (4 - server_round) * steps, ceiling=8.0, run_id=3) == sigma
            assert len(calls) == 2
    assert 8.0 * (1 - 4e-3) < ledger.epsilon <= 8.0  # the whole budget, spent


def test_the_remembering_accountant_reports_opacus_rdp_epsilon_to_the_bit():
    rng = np.random.default_rng(0)
    for _ in range(5):
        history = [
            (float(rng.uniform(0.5, 3.0)), float(rng.uniform(0.001, 0.5)), int(rng.integers(1, 500)))
            for _ in range(int(rng.integers(1, 5)))
        ]
        history.append(history[0])  # a mechanism seen before: its RDP comes from memory
        for delta in (1e-5, 1e-6):
            opacus, remembering = RDPAccountant(), RememberingRDPAccountant()
            opacus.history, remembering.history = list(history), list(history)
            assert remembering.get_privacy_spent(delta=delta) == opacus.get_privacy_spent(delta=delta)


THRESHOLD, CEILING = 1.234, 8.0
EPSILON_CURVES = {
    # ε = CEILING exactly at THRESHOLD in each, decreasing in σ.
    "power law, as RDP is nearly": lambda sigma: CEILING * (THRESHOLD / sigma) ** 1.7,
    "curved in log-log": lambda sigma: CEILING * (0.3 * (THRESHOLD / sigma) ** 3 + 0.7 * (THRESHOLD / sigma) ** 0.8),
    "a cliff": lambda sigma: CEILING / 2 if sigma >= THRESHOLD else CEILING * 2,
}


@pytest.mark.parametrize("curve", list(EPSILON_CURVES))
@pytest.mark.parametrize("hint", [None, 0.7, 1.234, 1.3, 4.0, 49.0])
def test_the_smallest_fitting_sigma_is_found_from_any_hint(curve, hint):
    calls = []

    def epsilon(sigma: float) -> float:
        calls.append(sigma)
        return EPSILON_CURVES[curve](sigma)

    found = smallest_fitting(epsilon, CEILING, hint)
    assert THRESHOLD <= found <= THRESHOLD / (1 - CALIBRATION_TOLERANCE)
    assert epsilon(found) <= CEILING  # sound, whatever the curve
    if curve.startswith("power"):
        assert len(calls) <= 8  # guesses close the bracket in a few accountant calls
        if hint is not None and abs(hint - THRESHOLD) < 0.1 * THRESHOLD:
            assert len(calls) <= 6
    assert len(calls) <= 40  # halving still finishes where guesses fail (the cliff)
