"""`fedgen run`: submit a federated run to the aggregator and follow it round by round.

The coordinator runs on the aggregator's host: the Control API it submits through is
served on loopback only. A run is submitted with Flower's own ``flwr run`` against a
minimal app folder that names fedgen's installed ServerApp and ClientApp, so sites and
aggregator run the fedgen they installed, never code shipped with the run. The
ServerApp appends each committed round to ``progress.jsonl`` in the run's folder and,
if it fails, its reason to ``failure.json``; with the refusals the Fleet listener noted
in its registry since the run was submitted, that is what a failed run reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fedgen.config import (
    AggregatorConfig,
    AggregatorTLSConfig,
    ConfigError,
    LineageSigningConfig,
    RunConfig,
    load_toml,
)
from fedgen.data import DataError, load_dataset
from fedgen.errors import FedgenError, OperationFailed
from fedgen.lineage import LineageError, read_records
from fedgen.lineage.records import RoundCommitted, RunFinished, RunStarted, records_of
from fedgen.model_source import checkpoint_folder, resolve_model_config
from fedgen.results import RoundResult, RunResult
from fedgen.sovereignty import sovereign_environment
from fedgen.state_files import (
    CHECKPOINTS_DIR,
    FAILURE_FILE,
    FLEET_REGISTRY_FILE,
    LINEAGE_FILE,
    PLAN_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
)

from .fleet_registry import FleetRegistry
from .plan import (
    PLAN_FILE_KEY,
    LineagePlan,
    ResumePoint,
    RunPlan,
    write_plan,
)

FEDERATION = "fedgen"
# In the aggregator's state folder: one ledger and one checkpoint folder for all runs
# (checkpoint names carry their digest, so runs never collide).
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedgen-run"
version = "1.0.0"
description = "A fedgen federated run: fedgen's installed ServerApp and ClientApp"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedgen"

[tool.flwr.app.components]
serverapp = "fedgen.server.app:app"
clientapp = "fedgen.client.app:app"

[tool.flwr.app.config]
{PLAN_FILE_KEY} = ""
"""


class RunFailed(OperationFailed, RuntimeError):
    """The run could not be submitted, or Flower reports it failed."""


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    run_dir: Path
    flwr_home: Path
    registry: Path | None = None  # the aggregator's fleet registry (refusals at its door)
    submitted_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def _flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> dict:
    """Run a ``flwr`` CLI command with JSON output, with phone-home off."""
    env = sovereign_environment() | {"FLWR_HOME": str(flwr_home)}
    flwr = Path(sys.executable).parent / "flwr"
    proc = subprocess.run(
        [str(flwr), *args, "--format", "json"], capture_output=True, text=True, env=env, timeout=timeout
    )
    try:
        answer = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise RunFailed(f"flwr {args[0]} gave no answer: {proc.stderr.strip() or proc.stdout.strip()}") from None
    if not answer.get("success", False):
        raise RunFailed(f"flwr {args[0]} failed: {answer.get('error-message', answer)}")
    return answer


def plan_run(run: RunConfig, source: str) -> tuple[AggregatorConfig, RunPlan]:
    """Check the run configuration and turn it into the ServerApp's plan.

    Raises
    ------
    ConfigError
        Naming the file and field at fault, before anything is submitted.
    """
    aggregator = load_toml(run.aggregator, AggregatorConfig)
    # A checkpoint folder named in run.toml is relative to run.toml, like its other paths.
    relative_to = Path(source).absolute().parent
    try:
        base_model = checkpoint_folder(run.training.model, relative_to)
        model_config = resolve_model_config(
            run.training.model,
            run.training,
            num_labels=len(run.labels),
            max_bases=run.max_length,
            relative_to=relative_to,
        )
    except (ValueError, FedgenError) as exc:
        raise ConfigError(f"{source}: training.model: {exc}") from None
    if run.eval_data is not None:
        try:
            load_dataset(run.eval_data).with_label_names(run.labels)
        except DataError as exc:
            raise ConfigError(f"{source}: eval_data: {exc}") from None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    state = Path(aggregator.state_dir).resolve()
    signing = aggregator.lineage
    plan = RunPlan(
        training=run.training,
        model=model_config,
        base_model=base_model,
        label_names=list(run.labels),
        num_sites=run.sites,
        out_dir=state / "runs" / stamp,
        eval_data=run.eval_data.resolve() if run.eval_data else None,
        config_summary={
            "run_config": source,
            "sites": run.sites,
            "eval_data": str(run.eval_data) if run.eval_data else None,
        },
        checkpoints_dir=state / CHECKPOINTS_DIR,
        lineage=LineagePlan(
            ledger=state / LINEAGE_FILE,
            signing=LineageSigningConfig(
                certificate=signing.certificate.resolve(), private_key=signing.private_key.resolve()
            ),
        ),
        tls=AggregatorTLSConfig(**{name: path.resolve() for name, path in aggregator.tls}),
        fleet_registry=state / FLEET_REGISTRY_FILE,
    )
    return aggregator, plan


def resume_point(ledger: Path, checkpoints: Path, training: dict, source: str) -> ResumePoint:
    """Where the last run in ``ledger`` stopped, if it did not finish.

    Raises
    ------
    ConfigError
        If there is nothing to resume, or ``training`` differs from that run's.
    """
    try:
        records = read_records(ledger)
    except LineageError as exc:
        raise ConfigError(f"{source}: cannot resume: {exc}") from None
    runs = [r["run_id"] for r in records if r["type"] == RunStarted.TYPE]
    if not runs:
        raise ConfigError(f"{source}: cannot resume: {ledger} holds no run")
    run_id = runs[-1]
    if any(r["type"] == RunFinished.TYPE and r["run_id"] == run_id for r in records):
        raise ConfigError(f"{source}: cannot resume: the last run ({run_id}) finished; start a new one")
    try:
        started = records_of(records, RunStarted, run_id=run_id, source=ledger)[-1]
        committed = records_of(records, RoundCommitted, run_id=run_id, source=ledger)
    except LineageError as exc:
        raise ConfigError(f"{source}: cannot resume: {exc}") from None
    if started.body.training.model_dump() != training:
        raise ConfigError(f"{source}: training differs from that of run {run_id}, which --resume continues")
    if not committed:
        raise ConfigError(f"{source}: run {run_id} committed no round; start it again without --resume")
    last = committed[-1].body
    return ResumePoint(
        run_id=run_id,
        after_round=last.round,
        checkpoint=checkpoints / last.model_out.checkpoint,
        model_digest=last.model_out.digest,
    )


def submit(run: RunConfig, source: str, *, resume: bool = False) -> SubmittedRun:
    """Write the run's plan and app folder, and submit it to the aggregator's Control API.

    With ``resume``, the run continues the last, unfinished run of the ledger after its
    last committed round, from that round's checkpoint.
    """
    submitted_at = datetime.now(timezone.utc)
    aggregator, plan = plan_run(run, source)
    if resume:
        assert plan.lineage is not None
        point = resume_point(plan.lineage.ledger, plan.checkpoints, run.training.model_dump(), source)
        plan = plan.model_copy(update={"resume": point})
    run_dir = plan.out_dir
    run_dir.mkdir(parents=True, exist_ok=False)
    write_plan(plan, run_dir / PLAN_FILE)
    app_dir = run_dir / "app"
    app_dir.mkdir()
    (app_dir / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    flwr_home = run_dir / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{aggregator.control_port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    answer = _flwr(
        ["run", str(app_dir), FEDERATION, "--run-config", f'{PLAN_FILE_KEY}="{run_dir / PLAN_FILE}"'], flwr_home
    )
    return SubmittedRun(
        run_id=str(answer["run-id"]),
        run_dir=run_dir,
        flwr_home=flwr_home,
        registry=plan.fleet_registry,
        submitted_at=submitted_at,
    )


def run_status(submitted: SubmittedRun) -> str:
    """Flower's status of the run, e.g. ``running`` or ``finished:completed``."""
    answer = _flwr(["ls", FEDERATION, "--run-id", submitted.run_id], submitted.flwr_home)
    return str(answer["runs"][0]["status"])


def follow(
    submitted: SubmittedRun,
    on_round: Callable[[RoundResult], None] | None = None,
    poll_seconds: float = 2.0,
    check: Callable[[], None] | None = None,
) -> RunResult:
    """Report rounds as they commit until the run ends; return its result.

    ``check`` is called at every poll and may raise to abandon following (a launcher
    uses it to notice that a process it started has died).

    Raises
    ------
    RunFailed
        If Flower reports the run failed or stopped, or it ended without a result.
    """
    seen = 0
    progress = submitted.run_dir / PROGRESS_FILE
    while True:
        status = run_status(submitted)
        if progress.exists():
            text = progress.read_text(encoding="utf-8")
            lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only
            for line in lines[seen:]:
                if on_round is not None:
                    on_round(RoundResult.from_dict(json.loads(line)))
            seen = len(lines)
        if status.startswith("finished"):
            break
        if check is not None:
            check()
        time.sleep(poll_seconds)
    result_file = submitted.run_dir / RESULT_FILE
    if status != "finished:completed" or not result_file.exists():
        raise RunFailed(failure_report(submitted, status))
    return RunResult.from_dict(json.loads(result_file.read_text(encoding="utf-8")))


def door_refusals(submitted: SubmittedRun) -> str | None:
    """The refusals at the aggregator's Fleet API since the run was submitted, one line,
    sites by site id (addresses only where no certificate named a site)."""
    if submitted.registry is None:
        return None
    refusals = FleetRegistry(submitted.registry).refusals_since(submitted.submitted_at)
    if not refusals:
        return None
    counts = Counter((refusal.site or refusal.peer, refusal.cause) for refusal in refusals)
    return "; ".join(
        f"{who}: {cause}" + (f" (x{count})" if count > 1 else "") for (who, cause), count in counts.items()
    )


def failure_report(submitted: SubmittedRun, status: str) -> str:
    """Why the run failed, in words: the ServerApp's reason and the refusals at the door."""
    failure = submitted.run_dir / FAILURE_FILE
    try:
        reason = json.loads(failure.read_text(encoding="utf-8"))["reason"]
    except (OSError, ValueError, KeyError):
        reason = (
            f"it ended as {status!r} without a reason from the ServerApp (stopped, killed, or the "
            "aggregator went down); see the aggregator's log"
        )
    report = f"run {submitted.run_id} failed: {reason}"
    if (refused := door_refusals(submitted)) is not None:
        report += f". Refused at the aggregator's Fleet API meanwhile: {refused}"
    return f"{report} (records in {submitted.run_dir})"
