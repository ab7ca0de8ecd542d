"""Sites as witnesses: receipts kept by sites catch an aggregator that rewrites, deletes or truncates
records and re-signs its ledger with its own, genuine lineage key, which `verify` alone cannot see."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli import app
from fedgen.lineage import LedgerHead, LineageWriter, read_records, verify, witness_statement
from fedgen.lineage.receipts import (
    ReceiptError,
    append_receipt,
    check_ledger_head,
    check_receipts,
    collect_receipts,
    new_receipt,
    read_receipts,
)
from fedgen.lineage.records import Strategy
from fedgen.protocol import TrainReport
from fedgen.server.lineage_records import round_records
from fedgen.state_files import RECEIPTS_FILE
from fedgen.strategies.recorder import RoundLog, SiteOutcome

from .forgery import forge_ledger

SITES = ("site-a", "site-b", "site-c")
RUN = "4242"
runner = CliRunner()


@dataclass(frozen=True)
class Consortium:
    folder: Path

    @property
    def files(self) -> pki.ConsortiumLayout:
        return pki.layout(self.folder)

    @property
    def ca(self) -> x509.Certificate:
        return pki.load_certificate(self.files.ca_cert)

    def signer(self) -> tuple[x509.Certificate, Any]:
        return pki.check_key_pair(self.files.lineage_cert, self.files.lineage_key)


def make_consortium(folder: Path, name: str) -> Consortium:
    pki.init_consortium(folder, name)
    pki.issue_lineage(folder)
    for site in SITES:
        pki.issue_site(folder, site)
    return Consortium(folder)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    return make_consortium(tmp_path_factory.mktemp("certs"), "Witnesses")


@dataclass
class Federation:
    ledger: Path
    sites: dict[str, Path]  # site -> its state folder
    records: list[dict[str, Any]]

    def seq_of(self, record_type: str, round_number: int | None = None) -> int:
        return next(
            r["seq"]
            for r in self.records
            if r["type"] == record_type and (round_number is None or r["body"].get("round") == round_number)
        )


def site_round(
    consortium: Consortium, site: str, server_round: int, head: LedgerHead, signer_pem: str, state_dir: Path
) -> SiteOutcome:
    """What a deployed site does with a round: check the head, sign update and head, keep the receipt."""
    check_ledger_head(head, signer_pem, consortium.ca)
    update_digest = f"{server_round:032x}{SITES.index(site):032x}"
    statement = witness_statement(RUN, server_round, head.seq, head.hash, update_digest)
    signature = pki.sign_message(pki.load_private_key(consortium.files.site_key(site)), statement)
    append_receipt(state_dir, new_receipt(site, RUN, server_round, head, update_digest, signature))
    pem = consortium.files.site_cert(site).read_text()
    report = TrainReport(
        num_examples=100,
        train_loss=0.5,
        steps=3,
        sample_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        epsilon=0.5 * server_round,
        delta=1e-5,
        dp=True,
    )
    return SiteOutcome(
        site,
        report=report,
        update_digest=update_digest,
        signature=base64.b64encode(signature).decode(),
        certificate=pem,
        fingerprint=pki.fingerprint(x509.load_pem_x509_certificate(pem.encode())),
    )


def federate(root: Path, consortium: Consortium, rounds: int = 3) -> Federation:
    """A run of ``rounds`` rounds written as the aggregator writes it. site-c's update is rejected in
    round 2, and its round-3 reply arrives after the timeout (it keeps a receipt all the same)."""
    sites = {site: root / site / "state" for site in SITES}
    certificate, key = consortium.signer()
    with LineageWriter.open(root / "lineage.jsonl", key, certificate) as writer:
        writer.append("run_started", {"sites": len(SITES)}, RUN)
        model = "0" * 64
        for server_round in range(1, rounds + 1):
            head = writer.head
            log = RoundLog(server_round, head=head)
            for site in SITES:
                outcome = site_round(consortium, site, server_round, head, writer.certificate_pem, sites[site])
                if site == "site-c" and server_round == 2:
                    outcome.reject("update norm exceeds the bound")
                if site == "site-c" and server_round == 3:
                    outcome = SiteOutcome(site, "failed", "no reply within the round timeout")
                log.outcomes.append(outcome)
            model_out = f"{server_round:064x}"
            for body in round_records(
                log,
                server_round=server_round,
                model_in=model,
                model_out=model_out,
                checkpoint=root / f"round-{server_round}.safetensors",
                strategy=Strategy(name="fedavg", options={}),
                metrics={"accuracy": 0.5},
            ):
                writer.append_body(body, RUN)
            model = model_out
        writer.append("run_finished", {"rounds": rounds, "model_digest": model}, RUN)
    return Federation(root / "lineage.jsonl", sites, read_records(root / "lineage.jsonl"))


@pytest.fixture
def federation(tmp_path: Path, consortium: Consortium) -> Federation:
    return federate(tmp_path, consortium)


def audit(federation: Federation, consortium: Consortium) -> dict[str, list[str]]:
    """Verify the ledger (it must pass: what follows is what receipts add), then check every site's
    receipts; returns each status's findings, as details."""
    certificate, _ = consortium.signer()
    report = verify(federation.ledger, certificate, ca_certificate=consortium.ca)
    assert report.ok, report.error
    receipts = collect_receipts(list(federation.sites.values()))
    findings: dict[str, list[str]] = {}
    for finding in check_receipts(read_records(federation.ledger), receipts, [certificate]).findings:
        findings.setdefault(finding.status, []).append(
            f"{finding.receipt.site} r{finding.receipt.round}: {finding.detail}"
        )
    return findings


def forge(federation: Federation, consortium: Consortium, records: list[dict[str, Any]]) -> None:
    """The aggregator writes ``records`` as its ledger, re-chained and re-signed with its genuine key."""
    forge_ledger(federation.ledger, records, *reversed(consortium.signer()))


# ---------------------------------------------------------------------------- honest


def test_every_receipt_of_an_honest_run_is_witnessed(federation: Federation, consortium: Consortium):
    findings = audit(federation, consortium)
    assert set(findings) == {"witnessed", "unacknowledged"}
    assert len(findings["witnessed"]) == 8  # 3 sites x 3 rounds, less site-c's late round 3
    assert any("site-c r2" in f and "rejected" in f for f in findings["witnessed"])
    (late,) = findings["unacknowledged"]
    assert late.startswith("site-c r3") and "failed (no reply within the round timeout)" in late
    # The site signatures in the ledger cover the witnessed heads: verify checked them all.
    certificate, _ = consortium.signer()
    assert verify(federation.ledger, certificate, ca_certificate=consortium.ca).site_signatures_checked == 7


def test_each_site_keeps_one_receipt_per_round_it_trained(federation: Federation):
    for site, state in federation.sites.items():
        receipts = [located.receipt for located in read_receipts(state / RECEIPTS_FILE)]
        assert [(r.site, r.run_id, r.round) for r in receipts] == [(site, RUN, n) for n in (1, 2, 3)]
        heads = [federation.records[r.head_seq] for r in receipts]
        assert [h["hash"] for h in heads] == [r.head_hash for r in receipts]
        assert [h["signature"] for h in heads] == [r.head_signature for r in receipts]


# ---------------------------------------------------------------------------- tampering


def test_truncation_is_caught_even_with_a_forged_ending(federation: Federation, consortium: Consortium):
    """The aggregator drops round 3 and its end, and signs a new run_finished after round 2."""
    kept = federation.records[: federation.seq_of("round_committed", 2) + 1]
    ending = {**federation.records[-1], "body": {"rounds": 2, "model_digest": f"{2:064x}"}}
    forge(federation, consortium, kept + [ending])
    findings = audit(federation, consortium)
    assert sorted(findings) == ["dropped", "witnessed"]
    assert [f.split(":")[0] for f in findings["dropped"]] == ["site-a r3", "site-b r3", "site-c r3"]
    assert all("no record after seq" in f for f in findings["dropped"])


def test_cutting_the_tail_is_caught_where_the_ledger_ends(federation: Federation, consortium: Consortium):
    cut = federation.seq_of("round_committed", 2)  # round 2's commit and all after it are gone
    forge(federation, consortium, federation.records[:cut])
    findings = audit(federation, consortium)
    assert [f.split(":")[0] for f in findings["truncated"]] == ["site-a r3", "site-b r3", "site-c r3"]
    assert all(f"the ledger ends at seq {cut - 1}" in f and f"record at seq {cut}" in f for f in findings["truncated"])
    assert [f.split(":")[0] for f in findings["dropped"]] == ["site-a r2", "site-b r2"]  # site-c's is recorded


def test_deleting_a_record_in_the_middle_is_caught(federation: Federation, consortium: Consortium):
    """The rejection of site-c's round-2 update is deleted; everything after is re-chained and re-signed."""
    deleted = federation.seq_of("update_rejected", 2)
    forge(federation, consortium, federation.records[:deleted] + federation.records[deleted + 1 :])
    findings = audit(federation, consortium)
    # Round 2's sites were shown the record before it, still there; the rejection is unaccounted.
    assert any(f.startswith("site-c r2") and "does not list the update" in f for f in findings["rewritten"])
    # Round 3's sites were shown round 2's commit, which now holds another seq and hash.
    round_3 = [f for f in findings["rewritten"] if " r3" in f]
    assert len(round_3) == 3
    assert all(f"the record at seq {deleted + 1}" in f and "rewritten at or before" in f for f in round_3)


def test_rewriting_a_record_is_caught(federation: Federation, consortium: Consortium):
    """site-b's round-1 contribution is taken out of the round record, which is re-signed."""
    records = [dict(r) for r in federation.records]
    seq = federation.seq_of("round_committed", 1)
    body = json.loads(json.dumps(records[seq]["body"]))
    body["contributions"] = [c for c in body["contributions"] if c["site"] != "site-b"]
    records[seq] = {**records[seq], "body": body}
    forge(federation, consortium, records)
    findings = audit(federation, consortium)
    assert any(
        f.startswith("site-b r1") and f"round record at seq {seq} does not list" in f for f in findings["rewritten"]
    )
    later = [f for f in findings["rewritten"] if " r1" not in f]
    assert later and all("rewritten at or before" in f for f in later)
    assert all(" r1" in f for f in findings["witnessed"])


def test_swapping_a_sites_update_digest_is_caught(federation: Federation, consortium: Consortium):
    records = [dict(r) for r in federation.records]
    seq = federation.seq_of("round_committed", 3)  # the last round: no later receipt can show it
    body = json.loads(json.dumps(records[seq]["body"]))
    body["contributions"][0]["update_digest"] = "f" * 64
    body["contributions"][0].update(signature=None, certificate=None)  # its signature would not verify
    records[seq] = {**records[seq], "body": body}
    forge(federation, consortium, records)
    findings = audit(federation, consortium)
    assert [f.split(":")[0] for f in findings["rewritten"]] == ["site-a r3"]
    assert "lists update ffffffffffffffff… for site 'site-a'" in findings["rewritten"][0]


# ---------------------------------------------------------------------------- what is no evidence


def test_a_receipt_whose_head_the_signer_never_signed_proves_nothing(
    federation: Federation, consortium: Consortium, tmp_path: Path
):
    """A site (or someone) invents a receipt of a head the ledger never held: not a failure."""
    other = make_consortium(tmp_path / "other-certs", "Elsewhere")
    elsewhere = federate(tmp_path / "elsewhere", other, rounds=1)
    invented = new_receipt(
        "site-a", RUN, 1, LedgerHead(0, "ab" * 32, base64.b64encode(b"x" * 70).decode()), "cd" * 32, None
    )
    append_receipt(federation.sites["site-a"], invented)
    federation.sites["elsewhere"] = elsewhere.sites["site-b"]
    findings = audit(federation, consortium)
    assert len(findings["unattested"]) == 2 and "rewritten" not in findings
    assert all("not signed by the lineage-signing certificate given" in f for f in findings["unattested"])


def test_a_run_that_failed_before_committing_a_round_is_a_note(tmp_path: Path, consortium: Consortium):
    federation = federate(tmp_path, consortium, rounds=2)
    records = federation.records[: federation.seq_of("update_rejected", 2) + 1]
    failed = {**federation.records[-1], "type": "run_failed", "body": {"error": "QuorumNotMet: round 2"}}
    forge(federation, consortium, records + [failed])
    findings = audit(federation, consortium)
    assert sorted(findings) == ["uncommitted", "witnessed"]
    assert len(findings["uncommitted"]) == 2 and all("failed at seq" in f for f in findings["uncommitted"])


# ---------------------------------------------------------------------------- the site's side


def test_a_site_checks_the_head_is_signed_by_the_consortiums_lineage_signer(consortium: Consortium, tmp_path: Path):
    certificate, key = consortium.signer()
    with LineageWriter.open(tmp_path / "lineage.jsonl", key, certificate) as writer:
        writer.append("run_started", {}, RUN)
        head, pem = writer.head, writer.certificate_pem
    check_ledger_head(head, pem, consortium.ca)
    other = make_consortium(tmp_path / "other", "Other")
    from fedgen.lineage.receipts import WitnessError

    with pytest.raises(WitnessError, match="wrong issuer"):
        check_ledger_head(head, pem, other.ca)
    with pytest.raises(WitnessError, match="not signed by the lineage-signing certificate"):
        check_ledger_head(LedgerHead(head.seq, "0" * 64, head.signature), pem, consortium.ca)
    with pytest.raises(WitnessError, match="sent no lineage ledger head"):
        check_ledger_head(None, None, consortium.ca)


def test_a_receipt_torn_by_a_crash_is_ignored_then_cut_off(tmp_path: Path):
    head = LedgerHead(0, "ab" * 32, "c2ln")
    first = new_receipt("site-a", RUN, 1, head, "cd" * 32, b"sig")
    path = append_receipt(tmp_path, first)
    whole = path.read_bytes()
    with open(path, "ab") as handle:
        handle.write(first.to_line()[:40])  # killed mid-append
    assert [r.receipt for r in read_receipts(path)] == [first]
    second = new_receipt("site-a", RUN, 2, head, "ef" * 32, None)
    append_receipt(tmp_path, second)
    assert path.read_bytes() == whole + second.to_line()
    assert [r.receipt for r in read_receipts(path)] == [first, second]
    assert [r.source for r in read_receipts(path)] == [f"{path}:1", f"{path}:2"]


def test_bad_receipt_files_and_folders_are_clear_errors(tmp_path: Path):
    path = append_receipt(
        tmp_path / "state", new_receipt("site-a", RUN, 1, LedgerHead(0, "ab" * 32, ""), "cd" * 32, None)
    )
    with open(path, "ab") as handle:
        handle.write(b'{"site": "site-a"}\n')
    with pytest.raises(ReceiptError, match=rf"{path}: line 2: not a lineage receipt.*members missing"):
        collect_receipts([tmp_path / "state"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReceiptError, match="holds no receipts file"):
        collect_receipts([tmp_path / "empty"])
    with pytest.raises(ReceiptError, match="not found"):
        collect_receipts([tmp_path / "nowhere"])


def test_receipts_are_collected_from_state_folders_files_and_collection_folders(federation: Federation):
    collection = federation.ledger.parent / "collected"
    collection.mkdir()
    for site in ("site-a", "site-b"):
        (collection / f"{site}.{RECEIPTS_FILE}").write_bytes((federation.sites[site] / RECEIPTS_FILE).read_bytes())
    (collection / "notes.txt").write_text("not a receipts file")
    located = collect_receipts([collection, federation.sites["site-c"] / RECEIPTS_FILE])
    assert [(r.receipt.site, r.receipt.round) for r in located] == [(s, n) for s in SITES for n in (1, 2, 3)]


# ---------------------------------------------------------------------------- the command


def test_lineage_verify_with_receipts_passes_and_then_names_what_was_rewritten(
    federation: Federation, consortium: Consortium
):
    files = consortium.files
    command = [
        "lineage",
        "verify",
        "--ledger",
        str(federation.ledger),
        "--cert",
        str(files.lineage_cert),
        "--ca",
        str(files.ca_cert),
        "--crl",
        str(files.crl),
        *(arg for state in federation.sites.values() for arg in ("--receipts", str(state))),
    ]
    honest = runner.invoke(app, command)
    assert honest.exit_code == 0, honest.output
    assert "receipts: 9 checked: 8 witnessed, 1 unacknowledged" in honest.stdout
    assert "note (unacknowledged)" in honest.stderr

    deleted = federation.seq_of("update_rejected", 2)
    forge(federation, consortium, federation.records[:deleted] + federation.records[deleted + 1 :])
    tampered = runner.invoke(app, command)
    assert tampered.exit_code == 1
    assert "OK," in tampered.stdout  # the chain itself verifies: only the witnesses show the rewrite
    errors = " ".join(tampered.stderr.split())
    assert "REWRITTEN" in errors and f"the record at seq {deleted + 1}" in errors
    assert "does not hold the history the sites witnessed" in errors
