"""The site's privacy ledger: the accountant's history, persisted on the site's disk.

Each Flower message runs in a fresh process, so an in-memory accountant would silently
start from zero every round. The ledger stores the accountant's full history (noise
multiplier, sample rate, steps) and every round's spend, and is rewritten atomically
(`fedgen.atomic`: temporary file, fsync, rename) so it is always either the old or the new state.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from fedgen import atomic
from fedgen.errors import FedgenError
from fedgen.state_files import PRIVACY_LEDGER_FILE

LEDGER_VERSION = 1
# Past this noise multiplier an update carries almost no signal: refuse instead.
MAX_NOISE_MULTIPLIER = 50.0
CALIBRATION_TOLERANCE = 1e-3  # relative: a calibrated σ is at most 0.1% above the smallest that fits

Mechanism = tuple[float, float, int]  # noise multiplier, sample rate, steps


@lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    return rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))


class RememberingRDPAccountant(RDPAccountant):
    """Opacus' RDP accountant, computing each mechanism's RDP once per process.

    Opacus computes a mechanism's RDP as its steps times the RDP of one step, at ~0.1 s per
    (σ, q) on a CPU. A site's history repeats the same (σ, q) round after round, and a
    calibration asks for many histories that differ only in their last entry, so the
    one-step RDP is remembered. The sum, the orders and the conversion to ε are Opacus'
    own: the ε is `RDPAccountant`'s to the bit (a test holds them equal).
    """

    def get_privacy_spent(self, *, delta: float, alphas: list[float] | None = None) -> tuple[float, float]:
        if not self.history:
            return 0, 0
        orders = tuple(self.DEFAULT_ALPHAS if alphas is None else alphas)
        rdp = sum([_rdp_of_one_step(sigma, rate, orders) * steps for sigma, rate, steps in self.history])
        eps, best_alpha = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
        return float(eps), float(best_alpha)


def smallest_fitting(epsilon: Callable[[float], float], ceiling: float, hint: float | None = None) -> float:
    """The smallest σ in (0, MAX_NOISE_MULTIPLIER] with ``epsilon(σ) <= ceiling``, to
    `CALIBRATION_TOLERANCE`. ``epsilon`` must decrease with σ, and MAX_NOISE_MULTIPLIER fit.

    Only a σ whose ε was computed and fits is returned, and only once a σ less than a
    quarter of the tolerance below it was computed not to fit. So the answer is sound
    however the search goes, and close enough that the next rounds of a run of up to four
    still find it the smallest that fits (`PrivacyLedger.calibrate` then skips the search).

    Each new σ costs the accountant ~0.1 s, so the search guesses. ε is close to a power
    law in σ: a guess interpolates log ε against log σ between the bracket's ends (one of
    them ``hint``, a σ near the answer, when given), and is tested as a pair just above and
    just below it, which closes the bracket when the guess was right. About five accountant
    calls, where halving took about fifteen.
    """
    precision = CALIBRATION_TOLERANCE / 4
    low, eps_low = 0.0, math.inf  # does not fit (σ = 0 is no noise)
    high, eps_high = MAX_NOISE_MULTIPLIER, epsilon(MAX_NOISE_MULTIPLIER)

    def probe(sigma: float) -> None:
        nonlocal low, eps_low, high, eps_high
        if low < sigma < high:
            value = epsilon(sigma)
            if value <= ceiling:
                high, eps_high = sigma, value
            else:
                low, eps_low = sigma, value

    if hint is not None:
        probe(hint)
    for _ in range(8):  # then plain halving, if ever the guesses do not close the bracket
        if high - low <= precision * high:
            return high
        guess = _power_law_guess(low, eps_low, high, eps_high, ceiling)
        width = high - low
        guess = min(max(guess, low + width / 20), high - width / 20)  # strictly inside
        probe(guess * (1 + precision / 2))
        probe(guess * (1 - precision / 2))
    while high - low > precision * high:
        probe((low + high) / 2)
    return high


def _power_law_guess(low: float, eps_low: float, high: float, eps_high: float, ceiling: float) -> float:
    """Where ε crosses ``ceiling``, from the bracket's ends, taking log ε linear in log σ."""
    if eps_high <= 0:
        return (low + high) / 2
    if low > 0 and math.isfinite(eps_low) and eps_low > eps_high:
        slope = math.log(eps_low / eps_high) / math.log(high / low)
    else:
        slope = 1.0  # ε roughly inversely proportional to σ, until a second point says otherwise
    return high * (eps_high / ceiling) ** (1 / slope)


class LedgerError(FedgenError, RuntimeError):
    """The ledger file is unreadable or inconsistent with the site's privacy settings."""


class BudgetExceeded(FedgenError, RuntimeError):
    """Training this round would push the site past its epsilon ceiling."""


@dataclass
class PrivacyLedger:
    """Accountant history and per-round spend of one site.

    Parameters
    ----------
    path : Path
        The JSON file in the site's state directory.
    accountant : str
        Opacus accountant mechanism: ``"rdp"`` or ``"prv"``.
    delta : float
        The δ every ε of this site is reported at.
    history : list of (noise multiplier, sample rate, steps)
        The accountant's composition history.
    rounds : list of dict
        One entry per trained round: run, round, steps, σ, q, ε after.
    """

    path: Path
    accountant: str
    delta: float
    history: list[Mechanism] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, state_dir: Path, *, accountant: str, delta: float) -> PrivacyLedger:
        """Load the site's ledger, or start an empty one if the site never trained.

        Raises
        ------
        LedgerError
            If the file is corrupt, or its accountant or δ differ from the settings:
            composing across a change of either would misreport the spend.
        """
        path = Path(state_dir) / PRIVACY_LEDGER_FILE
        if not path.exists():
            return cls(path=path, accountant=accountant, delta=delta)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            history = [(float(s), float(q), int(n)) for s, q, n in raw["history"]]
            ledger = cls(
                path=path,
                accountant=raw["accountant"],
                delta=float(raw["delta"]),
                history=history,
                rounds=list(raw["rounds"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{path}: privacy ledger is unreadable ({exc}); restore it from backup, never delete it"
            ) from None
        if ledger.accountant != accountant or ledger.delta != delta:
            raise LedgerError(
                f"{path}: ledger was kept with accountant={ledger.accountant} "
                f"delta={ledger.delta}, the site is now configured with "
                f"accountant={accountant} delta={delta}; restore the original settings"
            )
        return ledger

    def make_accountant(self, history: list[Mechanism] | None = None) -> IAccountant:
        """A fresh Opacus accountant holding ``history`` (default: the ledger's)."""
        accountant = RememberingRDPAccountant() if self.accountant == "rdp" else create_accountant(self.accountant)
        accountant.history = list(self.history if history is None else history)
        return accountant

    def epsilon_of(self, history: list[Mechanism]) -> float:
        if not history:
            return 0.0
        return float(self.make_accountant(history).get_epsilon(delta=self.delta))

    @property
    def epsilon(self) -> float:
        """ε spent so far, from the accountant."""
        return self.epsilon_of(self.history)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the site would have spent after ``steps`` more steps of this mechanism."""
        return self.epsilon_of(self.history + [(noise_multiplier, sample_rate, steps)])

    def calibrate(self, sample_rate: float, planned_steps: int, ceiling: float, run_id: int | None = None) -> float:
        """Smallest noise multiplier that keeps ``planned_steps`` more steps under ``ceiling``
        (to 0.1%).

        Within a run the answer barely moves from round to round (the rounds before spent
        what the plan said), so the σ of the run's last committed round is tried first: if
        it still fits and 0.1% less does not, it is the answer, for two accountant calls;
        otherwise the search starts from it (`smallest_fitting`). The accountant remembers
        each σ's one-step RDP, so a σ asked for twice costs once.

        Raises
        ------
        BudgetExceeded
            If no noise multiplier up to MAX_NOISE_MULTIPLIER fits the remaining budget.
        """

        def epsilon(sigma: float) -> float:
            return self.epsilon_after(sigma, sample_rate, planned_steps)

        def fits(sigma: float) -> bool:
            return epsilon(sigma) <= ceiling

        last = self.rounds[-1] if self.rounds else None
        hint = None
        if last is not None and run_id is not None and last["run_id"] == run_id and last["sample_rate"] == sample_rate:
            hint = float(last["noise_multiplier"])
            if fits(hint) and not fits(hint * (1 - CALIBRATION_TOLERANCE)):
                return hint
        spent = self.epsilon
        if spent >= ceiling or not fits(MAX_NOISE_MULTIPLIER):
            raise BudgetExceeded(
                f"privacy budget exhausted: ε spent {spent:.4f} of ceiling {ceiling:g} "
                f"(δ={self.delta:g}); {planned_steps} more steps would exceed it"
            )
        return smallest_fitting(epsilon, ceiling, hint)

    def check(self, noise_multiplier: float, sample_rate: float, steps: int, ceiling: float) -> float:
        """ε after this round; raise BudgetExceeded if it would pass ``ceiling``."""
        after = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if after > ceiling:
            raise BudgetExceeded(
                f"refusing round: ε would rise from {self.epsilon:.4f} to {after:.4f}, "
                f"past the site's ceiling {ceiling:g} (δ={self.delta:g})"
            )
        return after

    def commit(
        self,
        history: list[Mechanism],
        *,
        run_id: int,
        server_round: int,
        steps: int,
        noise_multiplier: float,
        sample_rate: float,
    ) -> float:
        """Record a trained round with the accountant's new history; return ε spent."""
        self.history = [(float(s), float(q), int(n)) for s, q, n in history]
        epsilon = self.epsilon
        self.rounds.append(
            {
                "run_id": run_id,
                "round": server_round,
                "steps": steps,
                "noise_multiplier": noise_multiplier,
                "sample_rate": sample_rate,
                "epsilon_after": epsilon,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        self._write()
        return epsilon

    def _write(self) -> None:
        body = json.dumps(
            {
                "version": LEDGER_VERSION,
                "accountant": self.accountant,
                "delta": self.delta,
                "history": self.history,
                "rounds": self.rounds,
            },
            indent=1,
        )
        atomic.write_text(self.path, body)
