"""What the aggregator writes into the lineage ledger for a run and each of its rounds.

The bodies are the types of `fedgen.lineage.records`; here they are filled in from the
run's configuration and each round's `RoundLog`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import platform
from pathlib import Path

import flwr
import opacus
import torch

import fedgen
from fedgen.config import TrainingConfig
from fedgen.lineage.records import (
    Body,
    Contribution,
    HeadRef,
    LeftOut,
    ModelIn,
    ModelOut,
    Resumes,
    RoundCommitted,
    RunFailed,
    RunFinished,
    RunStarted,
    SiteRefused,
    Strategy,
    UpdateRejected,
)
from fedgen.model import ModelConfig
from fedgen.strategies.recorder import RoundLog, SiteOutcome


def software_versions() -> dict[str, str]:
    return {
        "fedgen": fedgen.__version__,
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "python": platform.python_version(),
    }


def code_digest() -> str:
    """SHA-256 over the source of the fedgen that runs (every .py file, by relative path)."""
    h = hashlib.sha256()
    for package in ("fedgen", "fedgen.client", "fedgen.server", "fedgen.strategies"):
        # Found, not imported: the server never imports the client.
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.rglob("*.py")):  # subpackages (fedgen.lineage, fedgen.cli) included
            h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def finite(value: float | None) -> float | None:
    """JSON has no NaN: a metric that could not be computed is recorded as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def strategy_of(training: TrainingConfig) -> Strategy:
    return Strategy(name=training.strategy, options=dict(training.strategy_options))


def run_started(
    *,
    config: dict,
    training: TrainingConfig,
    model_config: ModelConfig,
    labels: list[str],
    sites: int,
    initial_model: str,
    resumes: Resumes | None,
) -> RunStarted:
    """The start of a run, with the software that runs it."""
    return RunStarted(
        config=config,
        training=TrainingConfig.model_validate(training.model_dump()),  # every setting, defaults included
        model_config=json.loads(model_config.to_json()),
        labels=list(labels),
        sites=sites,
        strategy=strategy_of(training),
        initial_model=initial_model,
        versions=software_versions(),
        code_digest=code_digest(),
        resumes=resumes,
    )


def contribution(outcome: SiteOutcome) -> Contribution:
    report = outcome.report
    assert report is not None and outcome.update_digest is not None
    return Contribution(
        site=outcome.site,
        fingerprint=outcome.fingerprint,
        update_digest=outcome.update_digest,
        signature=outcome.signature,
        certificate=outcome.certificate,
        examples=report.num_examples,
        steps=report.steps,
        train_loss=finite(report.train_loss),
        dp=report.dp,
        noise_multiplier=report.noise_multiplier,
        sample_rate=report.sample_rate,
        max_grad_norm=report.max_grad_norm,
        epsilon=report.epsilon,
        delta=report.delta,
    )


def left_out_records(log: RoundLog | None) -> list[UpdateRejected | SiteRefused]:
    """A record for each update the round rejected and each site that refused it."""
    records: list[UpdateRejected | SiteRefused] = []
    for o in log.outcomes if log is not None else []:
        if o.status == "rejected":
            records.append(
                UpdateRejected(round=log.server_round, site=o.site, update_digest=o.update_digest, reason=o.reason)
            )
        elif o.status == "refused":
            records.append(SiteRefused(round=log.server_round, site=o.site, reason=o.reason))
    return records


def round_records(
    log: RoundLog | None,
    *,
    server_round: int,
    model_in: str,
    model_out: str,
    checkpoint: Path,
    strategy: Strategy,
    metrics: dict[str, float],
) -> list[Body]:
    """The records of one committed round: each rejected update, each refusal, then the commit."""
    outcomes = log.outcomes if log is not None else []
    records: list[Body] = [*left_out_records(log)]
    head = log.head if log is not None else None
    records.append(
        RoundCommitted(
            round=server_round,
            started_at=log.started_at if log is not None else None,
            ledger_head=HeadRef(seq=head.seq, hash=head.hash) if head is not None else None,
            model_in=ModelIn(digest=model_in),
            model_out=ModelOut(digest=model_out, checkpoint=checkpoint.name),
            strategy=strategy,
            contributions=[contribution(o) for o in outcomes if o.contributed],
            rejected=[LeftOut(site=o.site, reason=o.reason) for o in outcomes if o.status == "rejected"],
            refused=[LeftOut(site=o.site, reason=o.reason) for o in outcomes if o.status == "refused"],
            failed=[LeftOut(site=o.site, reason=o.reason) for o in outcomes if o.status == "failed"],
            metrics={name: finite(value) for name, value in metrics.items()},
        )
    )
    return records


def run_finished(*, rounds: int, model_digest: str, head: str | None) -> RunFinished:
    return RunFinished(rounds=rounds, model_digest=model_digest, head=head)


def run_failed(error: BaseException) -> RunFailed:
    return RunFailed(error=f"{type(error).__name__}: {error}")
