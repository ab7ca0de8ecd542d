"""The ClientApp object itself, called as Flower calls it, for each kind of reply."""

import math

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, Metadata, RecordDict
from opacus.accountants import RDPAccountant

from fedgen.client.app import make_client_app
from fedgen.client.ledger import PrivacyLedger
from fedgen.config import SiteConfig, load_toml
from fedgen.params import digest, record_to_arrays
from fedgen.protocol import (
    ARRAYS_KEY,
    BUDGET_REFUSED,
    METRICS_KEY,
    SITE_DATA_ERROR,
    SITE_ERROR,
    SITE_KEY,
    TrainReport,
)
from fedgen.state_files import PRIVACY_LEDGER_FILE

from ..conftest import train_message, write_site


def _call(site_toml, content: RecordDict) -> Message:
    app = make_client_app(lambda context: load_toml(site_toml, SiteConfig))
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=600.0,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    return app(Message(metadata=metadata, content=content), context)


def _strings(content: RecordDict) -> list[str]:
    """Every name and text value a reply carries (record, tensor and metric names, config values)."""
    found = []
    for key, record in content.items():
        found.append(key)
        for name, value in record.items():
            found.append(name)
            values = value if isinstance(value, list) else [value]
            found += [
                v.decode(errors="replace") if isinstance(v, bytes) else v for v in values if isinstance(v, (str, bytes))
            ]
    return found


def test_train_reply(flower_task, site_toml):
    sent = train_message()  # round 1 of 3, batch 16, one local epoch
    reply = _call(site_toml, sent)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {ARRAYS_KEY, METRICS_KEY, SITE_KEY}

    # The trainable tensors, trained: same names, shapes and dtypes as sent, new values.
    before, after = record_to_arrays(sent[ARRAYS_KEY]), record_to_arrays(reply.content[ARRAYS_KEY])
    assert {n: (a.shape, a.dtype) for n, a in after.items()} == {n: (a.shape, a.dtype) for n, a in before.items()}
    assert any(not np.array_equal(before[n], after[n]) for n in before)

    # The metrics: 120 examples, 120/16 = 7.5 -> 8 steps at sample rate 1/8, and the ledger's privacy.
    report = TrainReport.from_record(reply.content[METRICS_KEY])
    assert set(reply.content[METRICS_KEY].keys()) == set(TrainReport._KEYS.values())  # nothing else
    assert (report.num_examples, report.steps, report.sample_rate, report.dp) == (120, 8, 1 / 8, True)
    assert math.isfinite(report.train_loss) and report.train_loss > 0
    assert (report.max_grad_norm, report.delta) == (1.0, 1e-5)  # the site's settings
    ledger = PrivacyLedger.open(site_toml.parent / "state", accountant="rdp", delta=1e-5)
    assert ledger.history == [(report.noise_multiplier, 1 / 8, 8)]  # σ as committed, calibrated above 0
    assert report.noise_multiplier > 0
    accountant = RDPAccountant()
    accountant.history = [(report.noise_multiplier, 1 / 8, 8)]
    assert report.epsilon == ledger.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5))
    assert 0 < report.epsilon < 8.0  # one of three rounds planned under the ceiling of 8

    # Who sent it: the site and the digest of exactly these tensors (a simulated site signs nothing).
    identity = reply.content[SITE_KEY]
    assert dict(identity) == {"site-id": "site-a", "update-digest": digest(after)}

    # Nothing names the site's files or carries its sequences.
    sequences = [line.split(",")[0] for line in (site_toml.parent / "data.csv").read_text().splitlines()[1:]]
    for text in _strings(reply.content):
        assert str(site_toml.parent) not in text and "data.csv" not in text and "site.toml" not in text
        assert not any(sequence[:12] in text for sequence in sequences), text


def test_budget_refusal_reply(flower_task, tmp_path):
    site_toml = write_site(tmp_path / "site-r", epsilon=0.01, noise_multiplier=1.0)
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == BUDGET_REFUSED
    assert reply.error.reason.startswith("site site-r: refusing round") and "ceiling 0.01" in reply.error.reason


def test_data_error_reply_names_the_line_not_the_path(flower_task, tmp_path):
    site_toml = write_site(tmp_path / "site-d")
    data = site_toml.parent / "data.csv"
    lines = data.read_text().splitlines()
    lines[5] = "ACGTXACGT,1"
    data.write_text("\n".join(lines) + "\n")
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == SITE_DATA_ERROR
    assert "line 6" in reply.error.reason and "'X'" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason and "data.csv" not in reply.error.reason


def test_unexpected_failure_reply_carries_no_detail(flower_task, tmp_path):
    site_toml = write_site(tmp_path / "site-x")
    state = site_toml.parent / "state"
    state.mkdir()
    (state / PRIVACY_LEDGER_FILE).write_text("not json")
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == SITE_ERROR
    assert reply.error.reason == "site site-x: LedgerError (details in the site's log)"


def test_a_round_without_a_ledger_head_is_refused_by_a_deployed_site_naming_no_path(flower_task, tmp_path):
    from fedgen import pki

    certs = tmp_path / "certs"
    pki.init_consortium(certs, "t")
    pki.issue_site(certs, "site-w")
    layout = pki.layout(certs)
    site_toml = write_site(tmp_path / "site-w")
    site_toml.write_text(
        site_toml.read_text() + f'[tls]\ncertificate = "{layout.site_cert("site-w")}"\n'
        f'private_key = "{layout.site_key("site-w")}"\nca_certificate = "{layout.ca_cert}"\n'
    )
    reply = _call(site_toml, train_message())
    assert reply.has_error() and reply.error.code == SITE_ERROR
    assert reply.error.reason.startswith(
        "site site-w: refused to witness the round: the aggregator sent no lineage ledger head"
    )
    assert str(tmp_path) not in reply.error.reason
