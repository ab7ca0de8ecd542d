"""Record bodies are one type each: the aggregator writes them, the readers read the same type back,
the bytes on disk are the ones earlier code wrote, and a body that is not fedgen's is named, not guessed."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli import app
from fedgen.config import ConfigError, TrainingConfig
from fedgen.lineage import (
    RECORD_TYPES,
    LedgerHead,
    LineageError,
    LineageWriter,
    canonical_encoding,
    read_records,
    verify,
)
from fedgen.lineage.records import (
    BODY_TYPES,
    Record,
    RoundCommitted,
    SiteRefused,
    UpdateRejected,
    parse_record,
    records_of,
)
from fedgen.model import preset_config
from fedgen.model_release import approve, find_round
from fedgen.protocol import TrainReport
from fedgen.server.coordinator import resume_point
from fedgen.server.lineage_records import round_records, run_finished, run_started, strategy_of
from fedgen.strategies.recorder import RoundLog, SiteOutcome

FIXTURES = Path(__file__).parent / "fixtures" / "lineage-v1"
RUN = "run-11"
TRAINING = TrainingConfig(rounds=3, strategy="fedprox", strategy_options={"proximal_mu": 0.1})


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> pki.ConsortiumLayout:
    folder = tmp_path_factory.mktemp("pki")
    pki.init_consortium(folder, "Records")
    pki.issue_lineage(folder)
    return pki.layout(folder)


def open_writer(path: Path, files: pki.ConsortiumLayout) -> LineageWriter:
    certificate, key = pki.check_key_pair(files.lineage_cert, files.lineage_key)
    return LineageWriter.open(path, key, certificate)


def test_every_record_type_has_exactly_one_body_type():
    assert tuple(BODY_TYPES) == RECORD_TYPES
    assert all(body.TYPE == name for name, body in BODY_TYPES.items())


def outcomes_of(records: list[dict], committed: Record[RoundCommitted]) -> list[SiteOutcome]:
    """The round's site outcomes, as the recorder kept them, recovered from what the ledger says of them."""
    outcomes = []
    for left_out in (parse_record(r).body for r in records if r["type"] in (UpdateRejected.TYPE, SiteRefused.TYPE)):
        if left_out.round != committed.body.round:
            continue
        if isinstance(left_out, UpdateRejected):
            outcomes.append(
                SiteOutcome(left_out.site, "rejected", left_out.reason, update_digest=left_out.update_digest)
            )
        else:
            outcomes.append(SiteOutcome(left_out.site, "refused", left_out.reason))
    for c in committed.body.contributions:
        report = TrainReport(
            num_examples=c.examples,
            train_loss=c.train_loss,
            steps=c.steps,
            sample_rate=c.sample_rate,
            noise_multiplier=c.noise_multiplier,
            max_grad_norm=c.max_grad_norm,
            epsilon=c.epsilon,
            delta=c.delta,
            dp=c.dp,
        )
        outcomes.append(
            SiteOutcome(
                c.site,
                report=report,
                update_digest=c.update_digest,
                signature=c.signature,
                certificate=c.certificate,
                fingerprint=c.fingerprint,
            )
        )
    return outcomes + [SiteOutcome(x.site, "failed", x.reason) for x in committed.body.failed]


def test_the_aggregator_writes_an_earlier_rounds_records_byte_for_byte():
    """From the outcomes an earlier round recorded, `round_records` makes the very bodies that code wrote."""
    records = read_records(FIXTURES / "run.jsonl")
    rounds = records_of(records, RoundCommitted)
    assert len(rounds) == 2
    for committed in rounds:
        body = committed.body
        assert body.ledger_head is not None
        log = RoundLog(
            body.round,
            started_at=body.started_at,
            outcomes=outcomes_of(records, committed),
            head=LedgerHead(body.ledger_head.seq, body.ledger_head.hash, "unused"),
        )
        rebuilt = round_records(
            log,
            server_round=body.round,
            model_in=body.model_in.digest,
            model_out=body.model_out.digest,
            strategy=body.strategy,
            metrics=body.metrics,
            checkpoint=Path("elsewhere") / body.model_out.checkpoint,
        )
        written = [
            r["body"]
            for r in records
            if r["type"] in (UpdateRejected.TYPE, SiteRefused.TYPE) and r["body"]["round"] == body.round
        ] + [records[committed.seq]["body"]]
        assert [canonical_encoding(b.dump()) for b in rebuilt] == [canonical_encoding(b) for b in written]


def write_run(path: Path, files: pki.ConsortiumLayout, rounds: int, *, finished: bool) -> list[Record]:
    """A run as the aggregator writes it: started, ``rounds`` rounds (site-b refusing the second), maybe finished."""
    model_config = preset_config("nano", vocab_size=8, max_len=8)
    written: list[Record] = []
    with open_writer(path, files) as writer:
        written.append(
            writer.append_body(
                run_started(
                    config={"run_config": "run.toml"},
                    training=TRAINING,
                    model_config=model_config,
                    labels=["0", "1"],
                    sites=2,
                    initial_model="0" * 64,
                    resumes=None,
                ),
                RUN,
            )
        )
        for server_round in range(1, rounds + 1):
            report = TrainReport(
                num_examples=50,
                train_loss=0.6,
                steps=2,
                sample_rate=0.2,
                noise_multiplier=1.1,
                max_grad_norm=1.0,
                epsilon=0.5 * server_round,
                delta=1e-5,
                dp=True,
            )
            log = RoundLog(
                server_round,
                head=writer.head,
                outcomes=[
                    SiteOutcome("site-a", report=report, update_digest=f"{server_round:064x}"),
                    SiteOutcome("site-b", "refused", "ε ceiling")
                    if server_round == 2
                    else SiteOutcome("site-b", "failed", "no reply within the round timeout"),
                ],
            )
            for body in round_records(
                log,
                server_round=server_round,
                model_in=f"{server_round - 1:064x}",
                model_out=f"{server_round:064x}",
                checkpoint=path.parent / f"r{server_round}",
                strategy=strategy_of(TRAINING),
                metrics={"accuracy": float("nan")},
            ):
                written.append(writer.append_body(body, RUN))
        if finished:
            written.append(
                writer.append_body(
                    run_finished(rounds=rounds, model_digest=f"{rounds:064x}", head=writer.head_hash), RUN
                )
            )
    return written


def test_typed_bodies_are_written_verify_and_read_back_as_the_same_records(
    tmp_path: Path, signer: pki.ConsortiumLayout
):
    path = tmp_path / "lineage.jsonl"
    written = write_run(path, signer, 2, finished=True)
    assert verify(path, pki.load_certificate(signer.lineage_cert)).ok
    assert [parse_record(r, source=path) for r in read_records(path)] == written
    assert [r.type for r in written] == [
        "run_started",
        "round_committed",
        "site_refused",
        "round_committed",
        "run_finished",
    ]
    started, first = written[0].body, written[1].body
    assert started.training == TRAINING and started.strategy.options == {"proximal_mu": 0.1}
    assert started.architecture["max_len"] == 8 and len(started.code_digest) == 64
    assert first.metrics == {"accuracy": None}  # NaN is recorded as null
    assert [(x.site, x.reason) for x in first.failed] == [("site-b", "no reply within the round timeout")]
    assert first.contributions[0].epsilon == 0.5 and first.ledger_head.seq == 0


def test_an_approval_is_a_typed_record_of_the_rounds_model(tmp_path: Path, signer: pki.ConsortiumLayout):
    path = tmp_path / "lineage.jsonl"
    write_run(path, signer, 2, finished=True)
    certificate, key = pki.check_key_pair(signer.lineage_cert, signer.lineage_key)
    record = approve(path, key, certificate, server_round=1, by="Dr. B", reason="reviewed")
    entry = find_round(path, 1)
    assert record == parse_record(read_records(path)[-1])
    assert (record.run_id, record.body.round, record.body.by) == (RUN, 1, "Dr. B")
    assert record.body.model_digest == entry.record.body.model_out.digest == f"{1:064x}"
    assert record.body.round_record == entry.record.hash and record.body.checkpoint == "r1"


def test_resume_reads_the_last_unfinished_run_from_its_typed_records(tmp_path: Path, signer: pki.ConsortiumLayout):
    path = tmp_path / "lineage.jsonl"
    write_run(path, signer, 2, finished=False)
    point = resume_point(path, tmp_path / "checkpoints", TRAINING.model_dump(), "run.toml")
    assert (point.run_id, point.after_round, point.model_digest) == (RUN, 2, f"{2:064x}")
    assert point.checkpoint == tmp_path / "checkpoints" / "r2"
    with pytest.raises(ConfigError, match="training differs"):
        resume_point(path, tmp_path, TrainingConfig(rounds=3).model_dump(), "run.toml")
    write_run(tmp_path / "finished.jsonl", signer, 1, finished=True)
    with pytest.raises(ConfigError, match="finished"):
        resume_point(tmp_path / "finished.jsonl", tmp_path, TRAINING.model_dump(), "run.toml")


def test_a_body_that_is_not_fedgens_is_named_by_record_and_member(tmp_path: Path, signer: pki.ConsortiumLayout):
    """The format leaves bodies open (verify passes); fedgen's readers say which member is not fedgen's."""
    path = tmp_path / "lineage.jsonl"
    model = {"digest": "0" * 64, "checkpoint": "r1"}
    with open_writer(path, signer) as writer:
        writer.append(
            "round_committed",
            {"round": 1, "model_out": model, "contributions": [{"site": "site-a", "epsilon": "high"}]},
            RUN,
        )
    assert verify(path, pki.load_certificate(signer.lineage_cert)).ok
    with pytest.raises(LineageError) as caught:
        parse_record(read_records(path)[0], source=path)
    message = str(caught.value)
    assert f"{path}: record seq 0 (round_committed) body: model_in: Field required" in message
    assert "contributions.0.epsilon: Input should be a valid number" in message
    shown = CliRunner().invoke(app, ["lineage", "show", "--ledger", str(path)])
    assert shown.exit_code == 2 and "contributions.0.update_digest: Field required" in shown.output
