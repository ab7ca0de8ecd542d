"""The round committer: each round's model is checkpointed, chained in the lineage from
the model before it, and reported; a resumed run continues the numbering."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from fedgen import pki
from fedgen.config import TrainingConfig
from fedgen.lineage import LineageWriter, read_records
from fedgen.model import build_model, preset_config
from fedgen.params import arrays_to_record, to_numpy, trainable_tensors
from fedgen.server.checkpoints import checkpoint_digest, load_checkpoint
from fedgen.server.commit import RoundCommitter
from fedgen.server.plan import ResumePoint, RunPlan
from fedgen.tokenizers import make_tokenizer

STRATEGY = {"name": "fedavg", "options": {}}


def plan_for(out_dir: Path, resume: ResumePoint | None = None) -> RunPlan:
    tokenizer = make_tokenizer("kmer3s1")
    return RunPlan(
        training=TrainingConfig(),
        model=preset_config("nano", vocab_size=tokenizer.vocab_size, max_len=16, num_labels=2, pad_id=tokenizer.pad_id),
        label_names=["0", "1"],
        num_sites=1,
        out_dir=out_dir,
        resume=resume,
    )


def shifted(arrays: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {name: value + by for name, value in arrays.items()}


def test_rounds_are_checkpointed_chained_and_reported(tmp_path: Path):
    plan = plan_for(tmp_path)
    model = build_model(plan.model, seed=0)
    evaluation = (make_tokenizer("kmer3s1").encode(["ACGTACGTAC", "TTTTGGGGCC"], max_length=16), torch.tensor([0, 1]))
    start = to_numpy(trainable_tensors(model))
    initial_digest = checkpoint_digest(0, start, plan.model.to_json())
    pki.init_consortium(tmp_path / "pki", "Commit")
    pki.issue_lineage(tmp_path / "pki")
    files = pki.layout(tmp_path / "pki")
    reported = []
    with LineageWriter.open(
        tmp_path / "lineage.jsonl", pki.load_private_key(files.lineage_key), pki.load_certificate(files.lineage_cert)
    ) as writer:
        committer = RoundCommitter(
            plan,
            model,
            torch.device("cpu"),
            evaluation,
            SimpleNamespace(rounds={}),
            writer,
            "run-1",
            STRATEGY,
            initial_digest,
            reported.append,
        )
        committer.commit(0, arrays_to_record(start))
        committer.commit(1, arrays_to_record(shifted(start, 0.1)))
        committer.commit(2, arrays_to_record(shifted(start, 0.2)))

    assert 0.0 <= committer.initial_accuracy <= 1.0  # the initial model, on the held-out set
    assert [r.round for r in reported] == [1, 2] and committer.rounds == reported
    saved = sorted(p.name for p in plan.checkpoints.iterdir())
    assert [name[:10] for name in saved] == ["round-0000", "round-0001", "round-0002"]
    first, second = reported
    assert load_checkpoint(Path(second.checkpoint))[1]["digest"] == second.model_digest
    committed = [r["body"] for r in read_records(tmp_path / "lineage.jsonl") if r["type"] == "round_committed"]
    assert [c["model_in"]["digest"] for c in committed] == [initial_digest, first.model_digest]
    assert [c["model_out"]["digest"] for c in committed] == [first.model_digest, second.model_digest]
    assert committer.model_digest == second.model_digest


def test_a_resumed_run_continues_the_round_numbers_and_keeps_its_start(tmp_path: Path):
    plan = plan_for(tmp_path, ResumePoint(run_id="7", after_round=3, checkpoint=tmp_path / "x", model_digest="d"))
    model = build_model(plan.model, seed=0)
    start = to_numpy(trainable_tensors(model))
    committer = RoundCommitter(
        plan, model, torch.device("cpu"), None, SimpleNamespace(rounds={}), None, "run-2", STRATEGY, "d"
    )
    committer.commit(0, arrays_to_record(start))
    assert not plan.checkpoints.exists()  # round 3's checkpoint is the start: not written again
    committer.commit(1, arrays_to_record(shifted(start, 0.1)))
    (result,) = committer.rounds
    assert result.round == 4 and Path(result.checkpoint).name.startswith("round-0004")
    assert math.isnan(result.accuracy) and math.isnan(committer.initial_accuracy)  # no held-out set
