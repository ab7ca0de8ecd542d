"""fedgen's Flower ServerApp: the aggregator's round loop.

Each round: send the global trainable tensors and instructions to the sites, let the
chosen strategy aggregate what they return, save the new global model as a checkpoint,
evaluate it on the aggregator's held-out set and report the round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedgen.config import TrainingConfig
from fedgen.data import SequenceDataset, load_dataset
from fedgen.model import ModelConfig, build_model, evaluate_classifier, resolve_device
from fedgen.lineage import LineageWriter
from fedgen.params import arrays_to_record, load_trainable, record_to_arrays, to_numpy, trainable_tensors
from fedgen.pki import load_certificate, load_crl, load_private_key, revocation_time
from fedgen.protocol import TrainInstructions
from fedgen.results import RoundResult, RunResult, SiteRound
from fedgen.strategies.recorder import QuorumNotMet, RecordingStrategy, RoundLog, SiteTrust
from fedgen.strategies.validation import UpdatePolicy
from fedgen.strategies.registry import make_strategy
from fedgen.tokenizers import make_tokenizer

from .checkpoints import checkpoint_digest, load_checkpoint, save_checkpoint
from .lineage_records import code_digest, left_out_records, round_records, software_versions

RoundCallback = Callable[[RoundResult], None]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerPlan:
    """Everything the aggregator needs to run a federation."""

    training: TrainingConfig
    model_config: ModelConfig
    label_names: list[str]
    num_sites: int
    out_dir: Path
    eval_data: SequenceDataset | None = None
    config_summary: dict = field(default_factory=dict)
    checkpoints_dir: Path | None = None  # default: out_dir/checkpoints
    lineage: LineageFiles | None = None
    trust: TrustFiles | None = None  # deployment: site signatures are checked against these
    resume: ResumePoint | None = None  # continue an interrupted run after its last committed round

    @property
    def checkpoints(self) -> Path:
        return self.checkpoints_dir or self.out_dir / "checkpoints"


@dataclass(frozen=True)
class LineageFiles:
    """The ledger and the lineage-signing key and certificate that sign its records."""

    ledger: Path
    private_key: Path
    certificate: Path


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run stopped: its last committed round and that round's model."""

    run_id: str
    after_round: int
    checkpoint: Path
    model_digest: str


@dataclass(frozen=True)
class TrustFiles:
    """The consortium CA and CRL that site certificates are checked against."""

    ca_certificate: Path
    crl: Path

    def load(self) -> SiteTrust:
        return SiteTrust(load_certificate(self.ca_certificate), load_crl(self.crl))


def site_rounds(log: RoundLog | None) -> list[SiteRound]:
    """Per-site outcomes of a round, as reported to people and `--json`."""
    if log is None:
        return []
    rows = []
    for outcome in log.outcomes:
        if outcome.contributed:
            r = outcome.report
            rows.append(SiteRound(
                site=outcome.site, status="trained", examples=r.num_examples,
                train_loss=r.train_loss, epsilon=r.epsilon if r.dp else None,
                delta=r.delta if r.dp else None,
                noise_multiplier=r.noise_multiplier if r.dp else None, steps=r.steps,
            ))
        else:
            status = "refused" if outcome.refused else "rejected" if outcome.rejected else "failed"
            rows.append(SiteRound(site=outcome.site, status=status,
                                  reason=outcome.refused or outcome.rejected or outcome.failed))
    return sorted(rows, key=lambda row: row.site)


def run_federation(grid: Grid, plan: ServerPlan, on_round: RoundCallback | None = None,
                   run_id: str = "local") -> RunResult:
    """Run ``plan.training.rounds`` rounds on ``grid`` and return what they produced.

    With ``plan.lineage``, every round is written to the lineage ledger as it commits,
    between a ``run_started`` and a ``run_finished`` (or ``run_failed``) record.
    """
    writer = None
    if plan.lineage is not None:
        certificate = load_certificate(plan.lineage.certificate)
        if plan.trust is not None and revocation_time(certificate, load_crl(plan.trust.crl)) is not None:
            raise RuntimeError(f"{plan.lineage.certificate} is revoked: issue a new lineage-signing certificate "
                               "with `fedgen certs issue lineage --force`")
        writer = LineageWriter.open(plan.lineage.ledger, load_private_key(plan.lineage.private_key), certificate)
    try:
        result = _run_rounds(grid, plan, on_round, run_id, writer)
    except BaseException as exc:
        if writer is not None:
            if isinstance(exc, QuorumNotMet):
                for kind, body in left_out_records(exc.log):
                    writer.append(kind, body, run_id)
            writer.append("run_failed", {"error": f"{type(exc).__name__}: {exc}"}, run_id)
        raise
    finally:
        if writer is not None:
            writer.close()
    return result


def _run_rounds(grid: Grid, plan: ServerPlan, on_round: RoundCallback | None, run_id: str,
                writer: LineageWriter | None) -> RunResult:
    training = plan.training
    model = build_model(plan.model_config, seed=training.seed)
    device = resolve_device("auto")
    evaluate_set = None
    if plan.eval_data is not None:
        tokenizer = make_tokenizer(training.tokenizer)
        evaluate_set = (
            tokenizer.encode(plan.eval_data.sequences, max_length=plan.model_config.max_len),
            torch.tensor(plan.eval_data.labels, dtype=torch.long),
        )
    offset = plan.resume.after_round if plan.resume is not None else 0
    strategy = RecordingStrategy(
        make_strategy(training.strategy, min_sites=training.min_updates, options=training.strategy_options),
        trust=plan.trust.load() if plan.trust is not None else None,
        policy=UpdatePolicy(max_update_norm=training.max_update_norm, min_updates=training.min_updates,
                            max_update_bytes=int(training.max_update_mb * 2**20)),
        wait_for_sites=(plan.num_sites, training.site_wait),  # the first round; later, the quorum
        ledger=writer, round_offset=offset,
    )
    strategy_record = {"name": training.strategy, "options": dict(training.strategy_options)}
    instructions = TrainInstructions(
        server_round=0,  # the strategy sets "server-round" in every round's config
        num_rounds=training.rounds - offset, model_config=plan.model_config.to_json(),
        tokenizer=training.tokenizer, label_names=list(plan.label_names),
        local_epochs=training.local_epochs, batch_size=training.batch_size,
        learning_rate=training.learning_rate, seed=training.seed + offset,
    )
    initial_arrays = to_numpy(trainable_tensors(model))
    initial_digest = checkpoint_digest(0, initial_arrays, plan.model_config.to_json())  # its round-0 checkpoint's
    if plan.resume is not None:
        initial_arrays, metadata = load_checkpoint(plan.resume.checkpoint)
        initial_digest = metadata["digest"]
        if initial_digest != plan.resume.model_digest:
            raise RuntimeError(f"{plan.resume.checkpoint} is not the model of round {offset} in the lineage")
    rounds: list[RoundResult] = []
    initial: dict[str, float] = {}
    current = {"digest": initial_digest}
    if writer is not None:
        writer.append("run_started", {
            "config": plan.config_summary, "training": training.model_dump(),
            "model_config": json.loads(plan.model_config.to_json()), "labels": list(plan.label_names),
            "sites": plan.num_sites, "strategy": strategy_record, "initial_model": current["digest"],
            "versions": software_versions(), "code_digest": code_digest(),
            "resumes": {"run_id": plan.resume.run_id, "after_round": offset,
                        "model_digest": plan.resume.model_digest} if plan.resume else None,
        }, run_id)

    def evaluate_and_commit(local_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Flower counts this run's rounds from 1; a resumed run continues the numbering.
        server_round = local_round + offset
        named = record_to_arrays(arrays)
        loss, accuracy = math.nan, math.nan
        if evaluate_set is not None:
            load_trainable(model, named)
            loss, accuracy = evaluate_classifier(model, *evaluate_set, device)
        if local_round == 0:
            initial["accuracy"] = accuracy
            if plan.resume is None:
                save_checkpoint(plan.checkpoints, 0, named, plan.model_config.to_json())
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        path, model_digest = save_checkpoint(plan.checkpoints, server_round, named, plan.model_config.to_json())
        log = strategy.rounds.get(local_round)
        if writer is not None:
            for kind, body in round_records(log, server_round=server_round, model_in=current["digest"],
                                            model_out=model_digest, checkpoint=path, strategy=strategy_record,
                                            metrics={"accuracy": accuracy, "loss": loss}):
                writer.append(kind, body, run_id)
        current["digest"] = model_digest
        result = RoundResult(round=server_round, accuracy=accuracy, loss=loss, sites=site_rounds(log),
                             checkpoint=str(path), model_digest=model_digest)
        rounds.append(result)
        if on_round is not None:
            on_round(result)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    strategy.start(
        grid=grid,
        initial_arrays=arrays_to_record(initial_arrays),
        num_rounds=training.rounds - offset,
        timeout=training.round_timeout,
        train_config=instructions.to_record(),
        evaluate_fn=evaluate_and_commit,
    )
    if writer is not None:
        writer.append("run_finished", {"rounds": len(rounds), "model_digest": current["digest"],
                                       "head": writer.head_hash}, run_id)
    return RunResult(rounds=rounds, initial_accuracy=initial.get("accuracy", math.nan),
                     out_dir=str(plan.out_dir), config=plan.config_summary,
                     lineage=str(plan.lineage.ledger) if plan.lineage else None)


class ServerOutcome:
    """Where a ServerApp built by `make_server_app` leaves its result or its error."""

    def __init__(self) -> None:
        self.result: RunResult | None = None
        self.error: BaseException | None = None


PLAN_FILE_KEY = "plan-file"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"


def write_plan(plan: ServerPlan, eval_data: Path | None, path: Path) -> None:
    """Write the plan a deployed ServerApp reads (it runs in a process of Flower's)."""
    path.write_text(json.dumps({
        "training": plan.training.model_dump(), "model_config": plan.model_config.to_json(),
        "label_names": list(plan.label_names), "num_sites": plan.num_sites,
        "out_dir": str(plan.out_dir), "eval_data": str(eval_data) if eval_data else None,
        "config_summary": plan.config_summary, "checkpoints_dir": str(plan.checkpoints),
        "lineage": {k: str(v) for k, v in asdict(plan.lineage).items()} if plan.lineage else None,
        "trust": {k: str(v) for k, v in asdict(plan.trust).items()} if plan.trust else None,
        "resume": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(plan.resume).items()}
        if plan.resume else None,
    }, indent=2), encoding="utf-8")


def read_plan(path: Path) -> ServerPlan:
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    eval_data = None
    if raw["eval_data"]:
        eval_data = load_dataset(raw["eval_data"]).with_label_names(raw["label_names"])
    return ServerPlan(
        training=TrainingConfig(**raw["training"]), model_config=ModelConfig.from_json(raw["model_config"]),
        label_names=list(raw["label_names"]), num_sites=int(raw["num_sites"]),
        out_dir=Path(raw["out_dir"]), eval_data=eval_data, config_summary=raw["config_summary"],
        checkpoints_dir=Path(raw["checkpoints_dir"]),
        lineage=LineageFiles(**{k: Path(v) for k, v in raw["lineage"].items()}) if raw["lineage"] else None,
        trust=TrustFiles(**{k: Path(v) for k, v in raw["trust"].items()}) if raw["trust"] else None,
        resume=ResumePoint(**(raw["resume"] | {"checkpoint": Path(raw["resume"]["checkpoint"])}))
        if raw.get("resume") else None,
    )


def append_progress(out_dir: Path, result: RoundResult) -> None:
    """Append a committed round to ``progress.jsonl`` for the coordinator to follow."""
    with open(out_dir / PROGRESS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(result)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def make_server_app(plan: ServerPlan, on_round: RoundCallback | None = None
                    ) -> tuple[ServerApp, ServerOutcome]:
    """A ServerApp running ``plan``; its result lands in the returned `ServerOutcome`."""
    app = ServerApp()
    outcome = ServerOutcome()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.result = run_federation(grid, plan, on_round, run_id=str(context.run_id))
        except BaseException as exc:  # surfaced to the caller; Flower only logs it
            outcome.error = exc
            raise

    return app, outcome


app = ServerApp()


def _exit_when_orphaned(poll_seconds: float = 2.0) -> None:
    """End this ServerApp process if Flower's SuperExec that started it is gone.

    When the aggregator is killed, an orphaned ServerApp would otherwise go on waiting
    for its SuperLink, holding the lineage ledger so that `fedgen run --resume` cannot
    write it. Exiting releases the ledger; a torn last record is cut off on next open.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_seconds)
        logger.error("the SuperExec that started this ServerApp is gone; stopping")
        os._exit(3)

    threading.Thread(target=watch, name="fedgen-orphan-watch", daemon=True).start()


@app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """Deployment entry: the coordinator's plan file names everything the run needs."""
    _exit_when_orphaned()
    plan_file = context.run_config.get(PLAN_FILE_KEY)
    if not plan_file:
        raise RuntimeError(f"run config lacks {PLAN_FILE_KEY!r}; submit runs with `fedgen run`")
    plan = read_plan(Path(str(plan_file)))
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    result = run_federation(grid, plan, on_round=lambda r: append_progress(plan.out_dir, r),
                            run_id=str(context.run_id))
    result.save(plan.out_dir / RESULT_FILE)
