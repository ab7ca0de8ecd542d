"""Committing a round: evaluate the new global model, checkpoint it, sign its lineage
records and report it.

Flower's strategy calls `RoundCommitter.commit` once with the initial model (round 0 of
this run) and once after every aggregation; the committer keeps what crosses rounds (the
last committed model's digest, the initial accuracy, the rounds so far).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, MetricRecord

from fedgen.lineage import LineageWriter
from fedgen.lineage.records import Strategy
from fedgen.model import evaluate_classifier
from fedgen.params import load_trainable, record_to_arrays
from fedgen.results import RoundResult, SiteRound
from fedgen.strategies.recorder import RecordingStrategy, RoundLog

from .checkpoints import save_checkpoint
from .lineage_records import round_records
from .plan import RunPlan

RoundCallback = Callable[[RoundResult], None]
EvaluationSet = tuple[torch.Tensor, torch.Tensor]  # token ids, labels


def site_rounds(log: RoundLog | None) -> list[SiteRound]:
    """Per-site outcomes of a round, as reported to people and `--json`."""
    if log is None:
        return []
    rows = []
    for outcome in log.outcomes:
        if outcome.contributed:
            r = outcome.report
            rows.append(
                SiteRound(
                    site=outcome.site,
                    status="trained",
                    examples=r.num_examples,
                    train_loss=r.train_loss,
                    epsilon=r.epsilon if r.dp else None,
                    delta=r.delta if r.dp else None,
                    noise_multiplier=r.noise_multiplier if r.dp else None,
                    steps=r.steps,
                    train_seconds=r.train_seconds,
                )
            )
        else:
            report = outcome.report  # a rejected update still says how long it trained
            rows.append(
                SiteRound(
                    site=outcome.site,
                    status=outcome.status,
                    reason=outcome.reason,
                    train_seconds=report.train_seconds if report is not None else None,
                )
            )
    return sorted(rows, key=lambda row: row.site)


class RoundCommitter:
    """Commits each round of one run; Flower's strategy calls `commit` as its evaluate_fn.

    Parameters
    ----------
    plan
        The run's plan: checkpoints folder, model shape, the round it resumes after.
    model
        The global model, loaded with each round's tensors to evaluate them.
    evaluation
        The aggregator's held-out set, encoded; ``None`` reports NaN accuracy and loss.
    strategy
        The recording strategy whose per-round logs say which sites contributed.
    writer, run_id, strategy_record
        Where and how each round's lineage records are signed (``writer`` None: no lineage).
    initial_digest
        The digest of the model this run starts from.
    on_round
        Called with every committed round.
    """

    def __init__(
        self,
        plan: RunPlan,
        model: torch.nn.Module,
        device: torch.device,
        evaluation: EvaluationSet | None,
        strategy: RecordingStrategy,
        writer: LineageWriter | None,
        run_id: str,
        strategy_record: Strategy,
        initial_digest: str,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.plan = plan
        self.model = model
        self.device = device
        self.evaluation = evaluation
        self.strategy = strategy
        self.writer = writer
        self.run_id = run_id
        self.strategy_record = strategy_record
        self.on_round = on_round
        self.offset = plan.resume.after_round if plan.resume is not None else 0
        self.model_digest = initial_digest  # of the last committed model
        self.initial_accuracy = math.nan
        self.rounds: list[RoundResult] = []

    def commit(self, local_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate, checkpoint, record and report ``arrays``, the model after ``local_round``."""
        # Flower counts this run's rounds from 1; a resumed run continues the numbering.
        server_round = local_round + self.offset
        named = record_to_arrays(arrays)
        loss, accuracy = math.nan, math.nan
        if self.evaluation is not None:
            load_trainable(self.model, named)
            loss, accuracy = evaluate_classifier(self.model, *self.evaluation, self.device)
        if local_round == 0:
            self.initial_accuracy = accuracy
            if self.plan.resume is None:
                save_checkpoint(self.plan.checkpoints, 0, named, self.plan.model.to_json())
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        path, model_digest = save_checkpoint(self.plan.checkpoints, server_round, named, self.plan.model.to_json())
        log = self.strategy.rounds.get(local_round)
        if self.writer is not None:
            for body in round_records(
                log,
                server_round=server_round,
                model_in=self.model_digest,
                model_out=model_digest,
                checkpoint=path,
                strategy=self.strategy_record,
                metrics={"accuracy": accuracy, "loss": loss},
            ):
                self.writer.append_body(body, self.run_id)
        self.model_digest = model_digest
        result = RoundResult(
            round=server_round,
            accuracy=accuracy,
            loss=loss,
            sites=site_rounds(log),
            checkpoint=str(path),
            model_digest=model_digest,
            wall_seconds=time.monotonic() - log.started if log is not None else None,
        )
        self.rounds.append(result)
        if self.on_round is not None:
            self.on_round(result)
        return MetricRecord({"accuracy": accuracy, "loss": loss})
