"""fedgen's Flower ServerApp: the aggregator's round loop.

Each round: send the global trainable tensors and instructions to the sites, let the
chosen strategy aggregate what they return, and commit the new global model (evaluate,
checkpoint, sign its lineage records, report: `commit.RoundCommitter`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedgen.data import SequenceDataset, load_dataset
from fedgen.lineage import LineageWriter
from fedgen.lineage.records import Resumes
from fedgen.model import resolve_device
from fedgen.model_source import LocalBase, build_classifier, model_summary, sequence_encoder
from fedgen.params import arrays_to_record, to_numpy, trainable_tensors
from fedgen.pki import load_certificate, load_crl, load_private_key, revocation_time
from fedgen.protocol import TrainInstructions
from fedgen.results import RoundResult, RunResult
from fedgen.state_files import FAILURE_FILE, PROGRESS_FILE, RESULT_FILE
from fedgen.strategies.recorder import QuorumNotMet, RecordingStrategy, SitesMissing, SiteTrust
from fedgen.strategies.registry import make_strategy
from fedgen.strategies.validation import UpdatePolicy

from .checkpoints import checkpoint_digest, load_checkpoint
from .commit import RoundCallback, RoundCommitter
from .fleet_registry import FleetRegistry
from .lineage_records import left_out_records, run_failed, run_finished, run_started, strategy_of
from .plan import PLAN_FILE_KEY, RunPlan, read_plan
from .superlink import prompt_replies

logger = logging.getLogger(__name__)


def run_federation(
    grid: Grid,
    plan: RunPlan,
    eval_data: SequenceDataset | None = None,
    on_round: RoundCallback | None = None,
    run_id: str = "local",
) -> RunResult:
    """Run ``plan.training.rounds`` rounds on ``grid`` and return what they produced.

    Each round's model is evaluated on ``eval_data``, if given. With ``plan.lineage``,
    every round is written to the lineage ledger as it commits, between a ``run_started``
    and a ``run_finished`` (or ``run_failed``) record.
    """
    writer = None
    if plan.lineage is not None:
        signing = plan.lineage.signing
        certificate = load_certificate(signing.certificate)
        if plan.tls is not None and revocation_time(certificate, load_crl(plan.tls.crl)) is not None:
            raise RuntimeError(
                f"{signing.certificate} is revoked: issue a new lineage-signing certificate "
                "with `fedgen certs issue lineage --force`"
            )
        writer = LineageWriter.open(plan.lineage.ledger, load_private_key(signing.private_key), certificate)
    try:
        result = _run_rounds(grid, plan, eval_data, on_round, run_id, writer)
    except BaseException as exc:
        if writer is not None:
            if isinstance(exc, QuorumNotMet):
                for body in left_out_records(exc.log):
                    writer.append_body(body, run_id)
            writer.append_body(run_failed(exc), run_id)
        raise
    finally:
        if writer is not None:
            writer.close()
    return result


def _run_rounds(
    grid: Grid,
    plan: RunPlan,
    eval_data: SequenceDataset | None,
    on_round: RoundCallback | None,
    run_id: str,
    writer: LineageWriter | None,
) -> RunResult:
    training = plan.training
    base = LocalBase(plan.base_model, training.trust_remote_code) if plan.base_model is not None else None
    model = build_classifier(plan.model, base, seed=training.seed)
    device = resolve_device("auto")
    evaluate_set = None
    if eval_data is not None:
        encoder = sequence_encoder(plan.model, training.tokenizer, base)
        evaluate_set = (
            encoder.encode(eval_data.sequences, max_length=plan.model.max_len),
            torch.tensor(eval_data.labels, dtype=torch.long),
        )
    registry = plan.fleet_registry  # deployment: who holds which node
    offset = plan.resume.after_round if plan.resume is not None else 0
    strategy = RecordingStrategy(
        make_strategy(training.strategy, min_sites=training.min_updates, options=training.strategy_options),
        trust=SiteTrust(load_certificate(plan.tls.ca_certificate), load_crl(plan.tls.crl))
        if plan.tls is not None
        else None,
        policy=UpdatePolicy(
            max_update_norm=training.max_update_norm,
            min_updates=training.min_updates,
            max_update_bytes=int(training.max_update_mb * 2**20),
        ),
        wait_for_sites=(plan.num_sites, training.site_wait),  # the first round; later, the quorum
        ledger=writer,
        round_offset=offset,
        site_names=FleetRegistry(registry).site_of if registry is not None else None,
    )
    strategy_record = strategy_of(training)
    instructions = TrainInstructions(
        server_round=0,  # the strategy sets "server-round" in every round's config
        num_rounds=training.rounds - offset,
        model_config=plan.model.to_json(),
        tokenizer=training.tokenizer,
        label_names=list(plan.label_names),
        local_epochs=training.local_epochs,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        seed=training.seed + offset,
    )
    initial_arrays = to_numpy(trainable_tensors(model))
    initial_digest = checkpoint_digest(0, initial_arrays, plan.model.to_json())  # its round-0 checkpoint's
    if plan.resume is not None:
        initial_arrays, metadata = load_checkpoint(plan.resume.checkpoint)
        initial_digest = metadata["digest"]
        if initial_digest != plan.resume.model_digest:
            raise RuntimeError(f"{plan.resume.checkpoint} is not the model of round {offset} in the lineage")
    if writer is not None:
        writer.append_body(
            run_started(
                config=plan.config_summary,
                training=training,
                model_config=plan.model,
                labels=plan.label_names,
                sites=plan.num_sites,
                initial_model=initial_digest,
                resumes=Resumes(run_id=plan.resume.run_id, after_round=offset, model_digest=plan.resume.model_digest)
                if plan.resume
                else None,
            ),
            run_id,
        )

    committer = RoundCommitter(
        plan, model, device, evaluate_set, strategy, writer, run_id, strategy_record, initial_digest, on_round
    )
    strategy.start(
        grid=grid,
        initial_arrays=arrays_to_record(initial_arrays),
        num_rounds=training.rounds - offset,
        timeout=training.round_timeout,
        train_config=instructions.to_record(),
        evaluate_fn=committer.commit,
    )
    if writer is not None:
        writer.append_body(
            run_finished(rounds=len(committer.rounds), model_digest=committer.model_digest, head=writer.head_hash),
            run_id,
        )
    return RunResult(
        rounds=committer.rounds,
        initial_accuracy=committer.initial_accuracy,
        out_dir=str(plan.out_dir),
        config=plan.config_summary,
        lineage=str(plan.lineage.ledger) if plan.lineage else None,
        model=model_summary(plan.model, training.model, model),
    )


class ServerOutcome:
    """Where a ServerApp built by `make_server_app` leaves its result or its error."""

    def __init__(self) -> None:
        self.result: RunResult | None = None
        self.error: BaseException | None = None


def append_progress(out_dir: Path, result: RoundResult) -> None:
    """Append a committed round to ``progress.jsonl`` for the coordinator to follow."""
    with open(out_dir / PROGRESS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(asdict(result)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def make_server_app(
    plan: RunPlan, eval_data: SequenceDataset | None = None, on_round: RoundCallback | None = None
) -> tuple[ServerApp, ServerOutcome]:
    """A ServerApp running ``plan``, evaluating on ``eval_data``; its result lands in the
    returned `ServerOutcome`."""
    app = ServerApp()
    outcome = ServerOutcome()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.result = run_federation(grid, plan, eval_data, on_round, run_id=str(context.run_id))
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
    prompt_replies(grid)
    plan_file = context.run_config.get(PLAN_FILE_KEY)
    if not plan_file:
        raise RuntimeError(f"run config lacks {PLAN_FILE_KEY!r}; submit runs with `fedgen run`")
    try:
        plan = read_plan(Path(str(plan_file)))
        eval_data = None
        if plan.eval_data is not None:
            eval_data = load_dataset(plan.eval_data).with_label_names(plan.label_names)
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        result = run_federation(
            grid, plan, eval_data, on_round=lambda r: append_progress(plan.out_dir, r), run_id=str(context.run_id)
        )
    except Exception as exc:
        reason = str(exc) if isinstance(exc, (SitesMissing, QuorumNotMet)) else f"{type(exc).__name__}: {exc}"
        failure = Path(str(plan_file)).parent / FAILURE_FILE  # the run's folder, where `fedgen run` looks
        failure.write_text(json.dumps({"reason": reason}), encoding="utf-8")
        raise
    result.save(plan.out_dir / RESULT_FILE)
