"""The run plan: what the coordinator writes is what the ServerApp reads, and the
coordinator that writes it stays free of torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from fedgen.config import AggregatorTLSConfig, LineageSigningConfig, TrainingConfig
from fedgen.model_config import preset_config
from fedgen.server.plan import LineagePlan, ResumePoint, RunPlan, read_plan, write_plan


def deployment_plan(folder: Path) -> RunPlan:
    certs = folder / "certs"
    return RunPlan(
        training=TrainingConfig(rounds=3, strategy="krum", strategy_options={"num_malicious": 1.0}),
        model=preset_config("tiny", vocab_size=69, max_len=130, num_labels=3, pad_id=0),
        label_names=["a", "b", "c"],
        num_sites=2,
        out_dir=folder / "runs" / "1",
        eval_data=folder / "eval.csv",
        config_summary={"run_config": "run.toml", "sites": 2, "eval_data": None},
        checkpoints_dir=folder / "checkpoints",
        lineage=LineagePlan(
            ledger=folder / "lineage.jsonl",
            signing=LineageSigningConfig(certificate=certs / "lineage.pem", private_key=certs / "lineage.key"),
        ),
        tls=AggregatorTLSConfig(
            certificate=certs / "aggregator.pem",
            private_key=certs / "aggregator.key",
            ca_certificate=certs / "ca.pem",
            crl=certs / "crl.pem",
        ),
        fleet_registry=folder / "fleet.json",
        resume=ResumePoint(
            run_id="42", after_round=2, checkpoint=folder / "checkpoints" / "round-2.npz", model_digest="ab" * 32
        ),
    )


def test_a_written_plan_reads_back_equal(tmp_path: Path):
    plan = deployment_plan(tmp_path)
    write_plan(plan, tmp_path / "plan.json")
    assert read_plan(tmp_path / "plan.json") == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no partial file left behind


def test_a_simulation_plan_defaults_its_checkpoints_under_the_run(tmp_path: Path):
    plan = RunPlan(
        training=TrainingConfig(),
        model=preset_config("nano", vocab_size=8, max_len=8),
        label_names=["0", "1"],
        num_sites=1,
        out_dir=tmp_path,
    )
    assert plan.checkpoints == tmp_path / "checkpoints"
    write_plan(plan, tmp_path / "plan.json")
    assert read_plan(tmp_path / "plan.json") == plan


def test_a_plan_with_an_unknown_field_is_refused_by_name(tmp_path: Path):
    text = deployment_plan(tmp_path).model_dump_json().replace('"num_sites"', '"num_sitez"')
    (tmp_path / "plan.json").write_text(text, encoding="utf-8")
    with pytest.raises(ValidationError, match="num_sitez"):
        read_plan(tmp_path / "plan.json")


def test_the_coordinator_imports_neither_torch_nor_the_server_app():
    program = (
        "import sys, fedgen.server.coordinator; "
        "print(sorted(m for m in ('torch', 'fedgen.server.app', 'fedgen.server.commit') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
