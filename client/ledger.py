"""The site's privacy ledger: the accountant's history, persisted on the site's disk.

Each Flower message runs in a fresh process, so an in-memory accountant would silently
start from zero every round. The ledger stores the accountant's full history (noise
multiplier, sample rate, steps) and every round's spend, and is rewritten atomically
(`fedgen.atomic`: temporary file, fsync, rename) so it is always either the old or the new state.
"""

from __future__ import annotations

import json
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


def smallest_fitting(fits: Callable[[float], bool], hint: float | None = None) -> float:
    """The smallest σ in (0, MAX_NOISE_MULTIPLIER] with ``fits(σ)`` (monotone: more noise
    always fits), to `CALIBRATION_TOLERANCE`; ``fits(MAX_NOISE_MULTIPLIER)`` must hold.

    With a ``hint`` (a σ near the answer) the search brackets the answer from there, in
    steps of 10%, before halving: about 8 accountant calls instead of about 16.
    """
    low, high = 0.0, MAX_NOISE_MULTIPLIER
    if hint is not None and 0 < hint < MAX_NOISE_MULTIPLIER:
        if fits(hint):
            high = hint
            while fits(candidate := high * 0.9):
                high = candidate
            low = high * 0.9
        else:
            low = hint
            while (candidate := min(low * 1.1, MAX_NOISE_MULTIPLIER)) < MAX_NOISE_MULTIPLIER and not fits(candidate):
                low = candidate
            high = candidate
    while high - low > CALIBRATION_TOLERANCE * high:
        mid = (low + high) / 2
        if mid > 0 and fits(mid):
            high = mid
        else:
            low = mid
    return high


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
        otherwise the search starts from it (`smallest_fitting`).

        Raises
        ------
        BudgetExceeded
            If no noise multiplier up to MAX_NOISE_MULTIPLIER fits the remaining budget.
        """

        def fits(sigma: float) -> bool:
            return self.epsilon_after(sigma, sample_rate, planned_steps) <= ceiling

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
        return smallest_fitting(fits, hint)

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
