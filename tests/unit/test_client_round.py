import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common.serde import recorddict_to_proto

from fedgen import pki
from fedgen.client.ledger import BudgetExceeded, PrivacyLedger
from fedgen.client.round import train_round
from fedgen.config import SiteConfig, SiteTLSConfig, load_toml
from fedgen.data import DataError, load_dataset
from fedgen.lineage import LedgerHead, LineageWriter, witness_statement
from fedgen.lineage.receipts import Receipt, WitnessError, read_receipts
from fedgen.params import digest, record_to_arrays
from fedgen.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    SITE_KEY,
    LedgerNotice,
    TrainReport,
    put_ledger_notice,
)
from fedgen.state_files import GRADIENT_CHECKS_FILE, PRIVACY_LEDGER_FILE, RECEIPTS_FILE

from ..conftest import train_message, write_site


def test_reply_carries_only_tensors_metrics_and_site_id(site_toml):
    site = load_toml(site_toml, SiteConfig)
    sent = train_message()
    reply = train_round(site, sent, run_id=1)
    assert set(reply.keys()) == {ARRAYS_KEY, METRICS_KEY, SITE_KEY}
    before, after = record_to_arrays(sent[ARRAYS_KEY]), record_to_arrays(reply[ARRAYS_KEY])
    assert sorted(before) == sorted(after) and digest(before) != digest(after)
    # A simulated site (no certificate) names itself and its update's digest, unsigned.
    assert dict(reply[SITE_KEY]) == {"site-id": "site-a", "update-digest": digest(after)}
    report = TrainReport.from_record(reply[METRICS_KEY])
    assert report.dp and report.num_examples == 120 and report.steps == round(120 / 16)
    assert report.sample_rate == pytest.approx(1 / 8)  # Opacus: 1 / ceil(120 / 16)
    assert np.isfinite(report.train_loss) and report.noise_multiplier > 0 and report.delta == 1e-5
    # It trained in the fastest mode whose per-sample gradients it checked: expanded weights.
    checks = json.loads((Path(site.state_dir) / GRADIENT_CHECKS_FILE).read_text())["checks"].values()
    assert [(c["key"]["grad_sample_mode"], c["result"]["passed"]) for c in checks] == [("ew", True)]


def test_reported_epsilon_is_the_persisted_accountants(site_toml):
    site = load_toml(site_toml, SiteConfig)
    report = TrainReport.from_record(train_round(site, train_message(), run_id=1)[METRICS_KEY])
    ledger = PrivacyLedger.open(site.state_dir, accountant="rdp", delta=1e-5)
    assert report.epsilon == pytest.approx(ledger.epsilon) and report.epsilon > 0
    steps = sum(n for _, _, n in ledger.history)
    assert steps == report.steps
    # Calibrated so that all 3 planned rounds fit the ceiling of 8.
    assert ledger.epsilon_after(report.noise_multiplier, report.sample_rate, 2 * report.steps) <= 8.0


def test_no_sequence_or_path_appears_in_the_serialised_reply(site_toml):
    site = load_toml(site_toml, SiteConfig)
    reply = train_round(site, train_message(), run_id=1)
    wire = recorddict_to_proto(reply).SerializeToString()
    for sequence in load_dataset(site.data).sequences:
        assert sequence.encode() not in wire
        assert sequence[:20].encode() not in wire
    assert str(site.data).encode() not in wire and b"data.csv" not in wire


def test_round_past_the_ceiling_is_refused_and_spends_nothing(tmp_path):
    sigma, q, steps = 2.0, 1 / 8, round(120 / 16)
    probe = PrivacyLedger(path=Path("unused"), accountant="rdp", delta=1e-5)
    one, two = probe.epsilon_of([(sigma, q, steps)]), probe.epsilon_of([(sigma, q, 2 * steps)])
    ceiling = (one + two) / 2  # room for one round, not two
    site = load_toml(write_site(tmp_path / "site-b", epsilon=ceiling, noise_multiplier=sigma), SiteConfig)
    first = TrainReport.from_record(train_round(site, train_message(1), run_id=1)[METRICS_KEY])
    assert first.epsilon == pytest.approx(one)
    ledger_bytes = (site.state_dir / PRIVACY_LEDGER_FILE).read_bytes()
    with pytest.raises(BudgetExceeded, match="past the site's ceiling"):
        train_round(site, train_message(2), run_id=1)
    # The refused round left the ledger exactly as the trained round wrote it.
    assert (site.state_dir / PRIVACY_LEDGER_FILE).read_bytes() == ledger_bytes


def test_no_dp_mode_trains_without_a_ledger(tmp_path):
    site = load_toml(write_site(tmp_path / "site-c", enabled=False), SiteConfig)
    report = TrainReport.from_record(train_round(site, train_message(), run_id=1)[METRICS_KEY])
    assert not report.dp and report.epsilon == 0.0 and report.noise_multiplier == 0.0
    assert not (site.state_dir / PRIVACY_LEDGER_FILE).exists()


def test_labels_outside_the_run_are_a_data_error(tmp_path):
    toml = write_site(tmp_path / "site-d")
    data = toml.parent / "data.csv"
    data.write_text(data.read_text().replace(",1\n", ",promoter\n"))
    with pytest.raises(DataError, match="not among the expected labels"):
        train_round(load_toml(toml, SiteConfig), train_message(), run_id=1)


_ROUND_IN_FRESH_PROCESS = """
import json, sys
from fedgen.client.round import train_round
from fedgen.config import SiteConfig, load_toml
from fedgen.protocol import METRICS_KEY, TrainReport
from tests.conftest import train_message
site = load_toml(sys.argv[1], SiteConfig)
report = TrainReport.from_record(train_round(site, train_message(int(sys.argv[2])), run_id=1)[METRICS_KEY])
print(json.dumps([report.epsilon, report.noise_multiplier, report.sample_rate, report.steps]))
"""


def test_epsilon_accumulates_across_fresh_processes(site_toml):
    root = Path(__file__).resolve().parents[2]
    spent = []
    for server_round in (1, 2):
        out = subprocess.run(
            [sys.executable, "-c", _ROUND_IN_FRESH_PROCESS, str(site_toml), str(server_round)],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
        )
        spent.append(json.loads(out.stdout.strip().splitlines()[-1]))
    (eps1, sigma1, q, steps), (eps2, sigma2, _, _) = spent
    assert eps2 > eps1 > 0
    # Round 2 recalibrates for the 2 rounds left and lands on (nearly) the same σ.
    assert sigma2 == pytest.approx(sigma1, rel=1e-3)
    site = load_toml(site_toml, SiteConfig)
    fresh = PrivacyLedger(path=Path("unused"), accountant="rdp", delta=1e-5)
    assert eps2 == pytest.approx(fresh.epsilon_of([(sigma1, q, steps), (sigma2, q, steps)]), rel=1e-9)
    assert len(PrivacyLedger.open(site.state_dir, accountant="rdp", delta=1e-5).rounds) == 2


@pytest.fixture
def deployed(tmp_path):
    """A consortium with a lineage signer and site-s, a ledger with one record, and site-s's config."""
    certs = tmp_path / "certs"
    pki.init_consortium(certs, "t")
    pki.issue_lineage(certs)
    pki.issue_site(certs, "site-s")
    layout = pki.layout(certs)
    certificate, key = pki.check_key_pair(layout.lineage_cert, layout.lineage_key)
    with LineageWriter.open(tmp_path / "lineage.jsonl", key, certificate) as writer:
        writer.append("run_started", {}, "1")
        head, signer_pem = writer.head, writer.certificate_pem
    site = load_toml(write_site(tmp_path / "site-s"), SiteConfig).model_copy(
        update={
            "tls": SiteTLSConfig(
                certificate=layout.site_cert("site-s"),
                private_key=layout.site_key("site-s"),
                ca_certificate=layout.ca_cert,
            )
        }
    )
    return site, head, signer_pem, layout


def with_head(message, head: LedgerHead, signer_pem: str, ledger_round: int = 1):
    put_ledger_notice(message[CONFIG_KEY], LedgerNotice(head, signer_pem, ledger_round))
    return message


def test_a_deployed_site_signs_its_update_with_the_head_it_saw_and_keeps_a_receipt(deployed):
    """Round 1 of a run that resumes another after its round 4: the ledger calls it round 5."""
    site, head, signer_pem, _ = deployed
    reply = train_round(site, with_head(train_message(1), head, signer_pem, ledger_round=5), run_id=1)
    signed = reply[SITE_KEY]
    update_digest = digest(record_to_arrays(reply[ARRAYS_KEY]))
    assert signed["update-digest"] == update_digest
    certificate = pki.x509.load_pem_x509_certificate(signed["certificate"].encode())
    assert pki.site_id_of(certificate) == "site-s"
    statement = witness_statement("1", 5, head.seq, head.hash, update_digest)
    assert pki.verify_message_signature(certificate, statement, signed["signature"])
    assert not pki.verify_digest_signature(certificate, update_digest, signed["signature"])  # not the bare digest
    assert b"PRIVATE KEY" not in recorddict_to_proto(reply).SerializeToString()
    (kept,) = read_receipts(site.state_dir / RECEIPTS_FILE)
    assert kept.receipt == Receipt(
        site="site-s",
        run_id="1",
        round=5,
        head_seq=head.seq,
        head_hash=head.hash,
        head_signature=head.signature,
        update_digest=update_digest,
        signature=base64.b64encode(signed["signature"]).decode(),
        time=kept.receipt.time,
    )


def forged_head(head: LedgerHead, layout, how: str) -> tuple[LedgerHead, str]:
    """The head and signer certificate a dishonest aggregator might send instead."""
    signer_pem = layout.lineage_cert.read_text()
    if how == "other-hash":  # a head the signer never signed
        return LedgerHead(head.seq, "ab" * 32, head.signature), signer_pem
    # signed by the site's own (TLS client) certificate key
    key = pki.load_private_key(layout.site_key("site-s"))
    signature = base64.b64encode(pki.sign_digest(key, head.hash)).decode()
    return LedgerHead(head.seq, head.hash, signature), layout.site_cert("site-s").read_text()


@pytest.mark.parametrize(
    "how, reason",
    [
        ("other-hash", "is not signed by the lineage-signing certificate"),
        ("tls-signer", "not a lineage-signing certificate"),
        ("no-head", "sent no lineage ledger head"),
    ],
)
def test_a_deployed_site_refuses_a_round_it_cannot_witness_before_spending_budget(deployed, how, reason):
    site, head, signer_pem, layout = deployed
    message = train_message() if how == "no-head" else with_head(train_message(), *forged_head(head, layout, how))
    with pytest.raises(WitnessError, match=reason):
        train_round(site, message, run_id=1)
    assert not (site.state_dir / PRIVACY_LEDGER_FILE).exists()  # no ε spent
    assert not (site.state_dir / RECEIPTS_FILE).exists()


def test_a_simulated_site_keeps_an_unsigned_receipt(site_toml, deployed):
    _, head, signer_pem, _ = deployed
    site = load_toml(site_toml, SiteConfig)
    reply = train_round(site, with_head(train_message(), head, signer_pem), run_id=1)
    assert "signature" not in reply[SITE_KEY]
    (kept,) = read_receipts(site.state_dir / RECEIPTS_FILE)
    assert kept.receipt.signature is None and kept.receipt.head_hash == head.hash
    assert kept.receipt.update_digest == reply[SITE_KEY]["update-digest"]
