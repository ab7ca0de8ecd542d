"""The run plan: everything the aggregator's ServerApp needs to run a federation.

The coordinator writes it to the run's folder and the deployed ServerApp, in a process
of Flower's, reads it back; the simulation builds one in memory. One typed model, one
``write_plan``/``read_plan`` pair, so both sides read the same file the same way. This
module stays light (no torch): the coordinator imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field

from fedgen.config import AggregatorTLSConfig, ConfigPath, LineageSigningConfig, StrictModel, TrainingConfig
from fedgen.model_config import HFModelConfig, ModelConfig
from fedgen.state_files import CHECKPOINTS_DIR

# The run's folder: what the coordinator writes and what the ServerApp leaves there.
PLAN_FILE_KEY = "plan-file"  # the run-config key that names the plan file


class LineagePlan(StrictModel):
    """The ledger and the lineage-signing key and certificate that sign its records."""

    ledger: ConfigPath
    signing: LineageSigningConfig


class ResumePoint(StrictModel):
    """Where an interrupted run stopped: its last committed round and that round's model."""

    run_id: str
    after_round: int = Field(ge=1)
    checkpoint: ConfigPath
    model_digest: str


class RunPlan(StrictModel):
    """Everything the aggregator needs to run a federation.

    ``tls`` (deployment): the consortium CA and CRL that site signatures are checked
    against; ``fleet_registry``: which site holds which node; ``eval_data``: the path
    of the aggregator's held-out set, which the ServerApp loads; ``resume``: continue
    an interrupted run after its last committed round; ``base_model``: the aggregator's
    own copy of the checkpoint a Hugging Face ``model`` is pinned to.
    """

    training: TrainingConfig
    model: ModelConfig | HFModelConfig = Field(union_mode="left_to_right")
    base_model: ConfigPath | None = None  # the aggregator's copy of a Hugging Face base
    label_names: list[str]
    num_sites: int = Field(ge=1)
    out_dir: ConfigPath
    eval_data: ConfigPath | None = None
    config_summary: dict[str, Any] = {}
    checkpoints_dir: ConfigPath | None = None  # default: out_dir/checkpoints
    lineage: LineagePlan | None = None
    tls: AggregatorTLSConfig | None = None
    fleet_registry: ConfigPath | None = None
    resume: ResumePoint | None = None

    @property
    def checkpoints(self) -> Path:
        return self.checkpoints_dir or self.out_dir / CHECKPOINTS_DIR


def write_plan(plan: RunPlan, path: Path) -> None:
    """Write ``plan`` to ``path`` whole or not at all (the ServerApp may read it any time)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        handle.write(plan.model_dump_json(indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def read_plan(path: Path) -> RunPlan:
    """The plan `write_plan` wrote to ``path``."""
    return RunPlan.model_validate_json(Path(path).read_text(encoding="utf-8"))
