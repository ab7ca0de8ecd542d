"""What a run produced, round by round: the object notebooks and `--json` share."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from fedgen import atomic

SiteStatus = Literal["trained", "refused", "rejected", "failed"]
"""How a site took part in a round: it trained (its update was aggregated), it refused
(its privacy budget would be exceeded, or it would not train the run's model: another base
checkpoint, or per-sample gradients that fail fedgen's DP check), its update was rejected (digest, signature, shape
or norm checks), or it failed (an error, or no reply within the round timeout)."""


@dataclass
class SiteRound:
    """One site's part in one round: its `SiteStatus` and, unless it trained, the reason.

    ``train_seconds`` is the time the site reports it spent inside local training.
    """

    site: str
    status: SiteStatus
    examples: int = 0
    train_loss: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    steps: int = 0
    reason: str | None = None
    train_seconds: float | None = None


@dataclass
class RoundResult:
    """A committed round: global evaluation, per-site outcomes and the checkpoint.

    ``wall_seconds`` is the round's time on the aggregator, from configuring it (sending
    the train messages) to committing its model (evaluated, checkpointed, recorded).
    """

    round: int
    accuracy: float
    loss: float
    sites: list[SiteRound] = field(default_factory=list)
    checkpoint: str | None = None
    model_digest: str | None = None
    wall_seconds: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> RoundResult:
        """Inverse of the round entries of `RunResult.to_dict` (``epsilon`` is derived)."""
        fields = {k: v for k, v in data.items() if k != "epsilon"}
        fields["sites"] = [SiteRound(**site) for site in fields.get("sites", [])]
        return cls(**fields)

    @property
    def epsilon(self) -> dict[str, float]:
        """ε spent so far by each site that trained this round (its accountant's)."""
        return {s.site: s.epsilon for s in self.sites if s.status == "trained" and s.epsilon is not None}


@dataclass
class RunResult:
    """All rounds of a run plus where its files are."""

    rounds: list[RoundResult]
    initial_accuracy: float
    out_dir: str
    config: dict
    lineage: str | None = None  # the signed ledger the run was recorded in
    model: dict | None = None  # `fedgen.model_source.model_summary`: source, architecture, sizes, base digest

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else self.initial_accuracy

    @property
    def accuracy(self) -> list[float]:
        return [r.accuracy for r in self.rounds]

    @property
    def loss(self) -> list[float]:
        return [r.loss for r in self.rounds]

    @property
    def checkpoints(self) -> list[Path]:
        return [Path(r.checkpoint) for r in self.rounds if r.checkpoint]

    def epsilon_by_site(self) -> dict[str, dict[int, float]]:
        """Each site's cumulative ε by the round it trained in: ``{site: {round: ε}}``.

        Rounds a site missed (refused, failed, not sampled) are absent from its series, so
        every ε stays paired with the round it was spent in.
        """
        series: dict[str, dict[int, float]] = {}
        for r in self.rounds:
            for site, eps in r.epsilon.items():
                series.setdefault(site, {})[r.round] = eps
        return series

    def summary(self) -> dict:
        """The `--json` object: ``rounds`` [{round, accuracy, loss, epsilon, wall_seconds,
        sites: [{site, status, train_seconds, ...}]}], ``final_accuracy``, ``model``."""
        return {
            "rounds": [
                {
                    "round": r.round,
                    "accuracy": r.accuracy,
                    "loss": r.loss,
                    "epsilon": r.epsilon,
                    "wall_seconds": r.wall_seconds,
                    "sites": [asdict(site) for site in r.sites],
                }
                for r in self.rounds
            ],
            "final_accuracy": self.final_accuracy,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, data: dict) -> RunResult:
        return cls(
            rounds=[RoundResult.from_dict(r) for r in data["rounds"]],
            initial_accuracy=data["initial_accuracy"],
            out_dir=data["out_dir"],
            config=data["config"],
            lineage=data.get("lineage"),
            model=data.get("model"),
        )

    def to_dict(self) -> dict:
        """Everything: the `summary` keys plus per-site detail, checkpoints and config."""
        record = asdict(self)
        for row, result in zip(record["rounds"], self.rounds):
            row["epsilon"] = result.epsilon
        return {**record, "final_accuracy": self.final_accuracy}

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, json.dumps(self.to_dict(), indent=2))

    def plot(self, ax=None):  # noqa: ANN001 - matplotlib is optional
        """Plot accuracy and each site's ε per round (needs matplotlib)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        rounds = [r.round for r in self.rounds]
        ax.plot(rounds, self.accuracy, marker="o", color="black", label="global accuracy")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        eps_ax = ax.twinx()
        for site, series in self.epsilon_by_site().items():
            eps_ax.plot(list(series), list(series.values()), linestyle="--", marker=".", label=f"ε {site}")
        eps_ax.set_ylabel("ε spent")
        ax.legend(loc="upper left")
        eps_ax.legend(loc="lower right")
        return ax
