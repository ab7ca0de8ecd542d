import pytest
from flwr.app import ConfigRecord, MetricRecord

from fedgen.lineage import LedgerHead
from fedgen.protocol import LEDGER_NOTICE_KEYS, LedgerNotice, ProtocolError, TrainInstructions, TrainReport


def _instructions(**kw):
    base = dict(
        server_round=2,
        num_rounds=5,
        model_config="{}",
        tokenizer="kmer4",
        label_names=["0", "1"],
        local_epochs=1.0,
        batch_size=32,
        learning_rate=0.01,
        seed=7,
    )
    return TrainInstructions(**{**base, **kw})


def test_instructions_round_trip_through_a_config_record():
    sent = _instructions(proximal_mu=0.1)
    assert TrainInstructions.from_record(sent.to_record()) == sent


def test_instructions_carry_the_ledger_notice_whole_or_not_at_all():
    notice = LedgerNotice(LedgerHead(3, "ab" * 32, "c2lnbmF0dXJl"), "-----BEGIN CERT", 7)
    sent = _instructions(ledger=notice)
    record = sent.to_record()
    assert [record[key] for key in LEDGER_NOTICE_KEYS.values()] == [3, "ab" * 32, "c2lnbmF0dXJl", "-----BEGIN CERT", 7]
    assert TrainInstructions.from_record(record) == sent
    assert TrainInstructions.from_record(_instructions().to_record()).ledger is None
    del record["ledger-head-signature"]
    with pytest.raises(ProtocolError, match="part of the ledger notice.*ledger-head-signature"):
        TrainInstructions.from_record(record)
    record["ledger-head-signature"], record["ledger-seq"] = "c2ln", -1
    with pytest.raises(ProtocolError, match="'ledger-seq' should be a non-negative int"):
        TrainInstructions.from_record(record)


def test_instructions_accept_integer_floats_and_missing_mu():
    record = _instructions().to_record()
    record["lr"] = 1
    del record["proximal-mu"]
    parsed = TrainInstructions.from_record(record)
    assert parsed.learning_rate == 1.0 and parsed.proximal_mu == 0.0


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("batch-size", None, "lacks config key 'batch-size'"),
        ("batch-size", "32", "should be int"),
        ("label-names", "0,1", "should be list"),
    ],
)
def test_instructions_reject_missing_or_mistyped_keys(key, value, words):
    record = _instructions().to_record()
    if value is None:
        del record[key]
    else:
        record[key] = value
    with pytest.raises(ProtocolError, match=words):
        TrainInstructions.from_record(record)


def test_report_round_trip_and_missing_metric():
    report = TrainReport(
        num_examples=100,
        train_loss=0.5,
        steps=4,
        sample_rate=0.25,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
        epsilon=2.5,
        delta=1e-5,
        dp=True,
        train_seconds=1.5,
    )
    record = report.to_record()
    assert isinstance(record, MetricRecord)
    assert record["train-seconds"] == 1.5
    assert TrainReport.from_record(record) == report
    del record["epsilon"]
    with pytest.raises(ProtocolError, match="epsilon"):
        TrainReport.from_record(record)
    assert isinstance(_instructions().to_record(), ConfigRecord)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("epsilon", [1.0, 2.0], "'epsilon' is not a number"),
        ("num-examples", 2.5, "'num-examples' is not a count"),
        ("steps", -1, "'steps' is not a count"),
        ("train-seconds", -0.5, "'train-seconds' is not a duration"),
        ("train-seconds", float("nan"), "'train-seconds' is not a duration"),
        ("train-seconds", float("inf"), "'train-seconds' is not a duration"),
        ("train-seconds", [1.0], "'train-seconds' is not a number"),
    ],
)
def test_report_refuses_metrics_that_are_not_numbers_or_counts(key, value, words):
    # What a site reports goes into the signed lineage: a list or a fraction there is refused here,
    # at the door, as a malformed reply of that site, not when the round is committed.
    record = TrainReport(
        num_examples=10,
        train_loss=0.5,
        steps=2,
        sample_rate=0.5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        epsilon=1.0,
        delta=1e-5,
        dp=True,
    ).to_record()
    record[key] = value
    with pytest.raises(ProtocolError, match=words):
        TrainReport.from_record(record)


def test_a_reply_without_train_seconds_still_reads():
    """A site of an earlier fedgen reports no training time: its reply stays valid."""
    report = TrainReport(
        num_examples=10,
        train_loss=0.5,
        steps=2,
        sample_rate=0.5,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        epsilon=1.0,
        delta=1e-5,
        dp=True,
    )
    record = report.to_record()
    assert "train-seconds" not in record
    assert TrainReport.from_record(record).train_seconds is None
