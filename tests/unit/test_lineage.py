"""The lineage ledger: a realistic run verifies, every kind of tampering is caught at the
record it breaks, a killed writer loses at most the record it was writing, one writer at
a time, and the PROV export is a consistent graph."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.numpy import load_file, save_file

from fedgen import pki
from fedgen.lineage import (
    GENESIS_PREV,
    RECORD_TYPES,
    LedgerHead,
    LineageError,
    LineageWriter,
    canonical_encoding,
    export_prov,
    read_records,
    record_hash,
    verify,
    witness_statement,
)
from fedgen.params import digest, read_model_file
from fedgen.server.checkpoints import checkpoint_digest, load_checkpoint, save_checkpoint

from .forgery import forge_ledger

RUN = "run-7"
SITES = ("site-a", "site-b", "site-c")
APPROVER = "Dr. Ada Lovelace"
REJECTION = "update norm 1.2e6 exceeds the bound 10"
# Positions of the records `write_ledger` writes.
RUN_STARTED, ROUND_1, SITE_REFUSED, ROUND_2, UPDATE_REJECTED, ROUND_3, APPROVED, FINISHED = range(8)
ROUND_SEQ = {1: ROUND_1, 2: ROUND_2, 3: ROUND_3}


@dataclass(frozen=True)
class Consortium:
    folder: Path
    ca: x509.Certificate
    signer_cert: x509.Certificate  # the lineage-signing certificate
    signer_key: ec.EllipticCurvePrivateKey

    @property
    def files(self) -> pki.ConsortiumLayout:
        return pki.layout(self.folder)

    def site_key(self, site: str) -> ec.EllipticCurvePrivateKey:
        return pki.load_private_key(self.files.site_key(site))

    def site_pem(self, site: str) -> str:
        return self.files.site_cert(site).read_text()

    def writer(self, path: Path) -> LineageWriter:
        return LineageWriter.open(path, self.signer_key, self.signer_cert)


def make_consortium(folder: Path, name: str) -> Consortium:
    pki.init_consortium(folder, name)
    pki.issue_aggregator(folder, ["localhost"])
    pki.issue_lineage(folder)
    for site in SITES:
        pki.issue_site(folder, site)
    files = pki.layout(folder)
    cert, key = pki.check_key_pair(files.lineage_cert, files.lineage_key)
    return Consortium(folder, pki.load_certificate(files.ca_cert), cert, key)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    return make_consortium(tmp_path_factory.mktemp("certs"), "Genomics EU")


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    """Someone else's consortium: a valid key and certificate that are not the aggregator's."""
    return make_consortium(tmp_path_factory.mktemp("rogue"), "Rogue")


# ---------------------------------------------------------------------------- a realistic run


def global_model(round_number: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(round_number)
    return {
        "encoder.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "head.bias": rng.standard_normal(3).astype(np.float32),
    }


def site_update(site: str, round_number: int) -> dict[str, np.ndarray]:
    return {"encoder.weight": np.full((4, 3), round_number * 10 + SITES.index(site), np.float32)}


MODEL_CONFIG = '{"d_model": 8, "layers": 1}'


def contribution(
    consortium: Consortium,
    site: str,
    round_number: int,
    head: LedgerHead | None,
    *,
    signing_site: str | None = None,
    certificate_site: str | None = None,
    signed_head: LedgerHead | None = None,
) -> dict[str, Any]:
    """A site's contribution, signed over its update and ``head``; the keyword arguments forge it."""
    update_digest = digest(site_update(site, round_number))
    seen = signed_head or head
    statement = witness_statement(
        RUN, round_number, seen.seq if seen else None, seen.hash if seen else None, update_digest
    )
    signature = pki.sign_message(consortium.site_key(signing_site or site), statement)
    pem = consortium.site_pem(certificate_site or site)
    return {
        "site": site,
        "update_digest": update_digest,
        "signature": base64.b64encode(signature).decode(),
        "certificate": pem,
        "fingerprint": pki.fingerprint(x509.load_pem_x509_certificate(pem.encode())),
        "examples": 120 + 10 * SITES.index(site),
        "epsilon": 0.75 * round_number,
        "delta": 1e-5,
        "noise_multiplier": 1.1,
    }


def model_digest_of(round_number: int) -> str:
    return checkpoint_digest(round_number, global_model(round_number), MODEL_CONFIG)


def round_body(
    consortium: Consortium,
    checkpoints: Path,
    round_number: int,
    head: LedgerHead | None,
    contributions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A round record's body, its checkpoint written by the aggregator's own writer."""
    path, model_digest = save_checkpoint(checkpoints, round_number, global_model(round_number), MODEL_CONFIG)
    if contributions is None:
        contributions = [contribution(consortium, site, round_number, head) for site in SITES[:2]]
    return {
        "round": round_number,
        "ledger_head": {"seq": head.seq, "hash": head.hash} if head else None,
        "model_in": {"digest": model_digest_of(round_number - 1)},
        "model_out": {"digest": model_digest, "checkpoint": path.name},
        "strategy": {"name": "fedavg", "config": {"fraction_train": 1.0, "min_sites": 2}},
        "contributions": contributions,
        "rejected": [{"site": "site-c", "reason": REJECTION}] if round_number == 3 else [],
        "metrics": {"train_loss": 0.69 - 0.05 * round_number, "eval_auroc": 0.7 + 0.05 * round_number},
        "started_at": "2025-05-01T12:00:00+00:00",
        "versions": {"fedgen": "0.1.0", "flwr": "1.41.0", "torch": "2.13.0", "opacus": "1.6.0"},
    }


@dataclass
class Ledger:
    path: Path
    checkpoints: Path
    records: list[dict[str, Any]]

    def checkpoint_of(self, round_number: int) -> Path:
        return self.checkpoints / self.records[ROUND_SEQ[round_number]]["body"]["model_out"]["checkpoint"]


def write_ledger(folder: Path, consortium: Consortium) -> Ledger:
    """run_started, three rounds by site-a and site-b, site-c refused then rejected, approval, finish."""
    ledger = Ledger(folder / "lineage.jsonl", folder / "checkpoints", [])
    ledger.checkpoints.mkdir(parents=True)
    final = model_digest_of(3)
    with consortium.writer(ledger.path) as writer:

        def append(record_type: str, body: dict[str, Any]) -> None:
            ledger.records.append(writer.append(record_type, body, RUN))

        append(
            "run_started",
            {
                "sites": list(SITES),
                "rounds": 3,
                "model_digest": model_digest_of(0),
                "strategy": {"name": "fedavg"},
                "cohort": "Zürich biobank",
            },
        )
        append("round_committed", round_body(consortium, ledger.checkpoints, 1, writer.head))
        append(
            "site_refused",
            {
                "round": 2,
                "site": "site-c",
                "reason": "privacy budget exhausted",
                "epsilon_spent": 7.9,
                "epsilon_ceiling": 8.0,
            },
        )
        append("round_committed", round_body(consortium, ledger.checkpoints, 2, writer.head))
        head = writer.head  # round 3 is configured before its rejection is recorded
        append(
            "update_rejected",
            {"round": 3, "site": "site-c", "update_digest": digest(site_update("site-c", 3)), "reason": REJECTION},
        )
        append("round_committed", round_body(consortium, ledger.checkpoints, 3, head))
        append(
            "model_approved",
            {"round": 3, "by": APPROVER, "reason": "AUROC 0.85 on the held-out cohort", "model_digest": final},
        )
        append("run_finished", {"rounds": 3, "model_digest": final})
    return ledger


@pytest.fixture
def ledger(tmp_path: Path, consortium: Consortium) -> Ledger:
    return write_ledger(tmp_path, consortium)


def read_lines(path: Path) -> list[bytes]:
    """The ledger's lines, each with its newline."""
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def assert_broken_at(report: Any, seq: int, *phrases: str) -> None:
    assert not report.ok, "tampering went unnoticed"
    assert (report.error_seq, report.error_line) == (seq, seq + 1), report.error
    assert f"line {seq + 1} (seq {seq})" in report.error
    for phrase in phrases:
        assert phrase in report.error


# ---------------------------------------------------------------------------- verify


def test_a_realistic_ledger_verifies_with_checkpoints_and_site_signatures(ledger: Ledger, consortium: Consortium):
    report = verify(
        ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints, ca_certificate=consortium.ca
    )
    assert report.ok, report.error
    assert report.records == len(ledger.records) == 8
    assert report.head_hash == ledger.records[-1]["hash"]
    assert (report.checkpoints_checked, report.site_signatures_checked) == (3, 6)
    assert not report.incomplete_tail and report.error is None and report.error_seq is None
    assert [r["type"] for r in ledger.records] == [
        "run_started",
        "round_committed",
        "site_refused",
        "round_committed",
        "update_rejected",
        "round_committed",
        "model_approved",
        "run_finished",
    ]


def test_records_read_back_as_written(ledger: Ledger):
    assert read_records(ledger.path) == ledger.records
    first = ledger.records[0]
    assert first["seq"] == 0 and first["prev"] == GENESIS_PREV and first["run_id"] == RUN
    assert all(r["prev"] == p["hash"] for p, r in zip(ledger.records, ledger.records[1:]))


def test_an_auditor_can_check_a_record_from_the_documented_format_alone(ledger: Ledger, consortium: Consortium):
    """Hash: the line without its hash and signature members; signature: ECDSA over the hash's hex text."""
    public_key = consortium.signer_cert.public_key()
    fingerprint = hashlib.sha256(consortium.signer_cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    for line in read_lines(ledger.path):
        text = line.decode("utf-8").removesuffix("\n")
        record = json.loads(text)
        assert text == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        unsigned = text
        for member in (f'"hash":"{record["hash"]}",', f'"signature":"{record["signature"]}",'):
            before, _, after = unsigned.rpartition(member)  # the last: the body may hold a "signature"
            unsigned = before + after
        assert hashlib.sha256(unsigned.encode("utf-8")).hexdigest() == record["hash"]
        public_key.verify(
            base64.b64decode(record["signature"]), record["hash"].encode("ascii"), ec.ECDSA(hashes.SHA256())
        )
        assert record["signer"] == fingerprint


def test_an_auditor_can_check_a_site_signature_from_the_documented_statement(ledger: Ledger):
    """A site signs the canonical JSON of its update digest, the round, the run and the head it was shown."""
    record = ledger.records[ROUND_2]
    head = record["body"]["ledger_head"]
    assert head == {"seq": SITE_REFUSED, "hash": ledger.records[SITE_REFUSED]["hash"]}
    for item in record["body"]["contributions"]:
        statement = json.dumps(
            {
                "head_hash": head["hash"],
                "head_seq": head["seq"],
                "purpose": "fedgen lineage witness v1",
                "round": 2,
                "run_id": RUN,
                "update_digest": item["update_digest"],
            },
            separators=(",", ":"),
        ).encode()
        site = x509.load_pem_x509_certificate(item["certificate"].encode())
        site.public_key().verify(base64.b64decode(item["signature"]), statement, ec.ECDSA(hashes.SHA256()))


def test_verify_without_checkpoints_or_ca_checks_the_chain_and_site_signatures(ledger: Ledger, consortium: Consortium):
    report = verify(ledger.path, consortium.signer_cert)
    assert report.ok and report.checkpoints_checked == 0 and report.site_signatures_checked == 6


def test_an_empty_ledger_verifies_and_a_missing_one_is_an_error(tmp_path: Path, consortium: Consortium):
    consortium.writer(tmp_path / "empty.jsonl").close()
    report = verify(tmp_path / "empty.jsonl", consortium.signer_cert)
    assert report.ok and report.records == 0 and report.head_hash is None
    with pytest.raises(LineageError, match="not found"):
        verify(tmp_path / "missing.jsonl", consortium.signer_cert)


def test_records_signed_across_a_certificate_renewal_verify_with_both_certificates(tmp_path: Path):
    consortium = make_consortium(tmp_path / "certs", "Renewing")
    path = tmp_path / "lineage.jsonl"
    with consortium.writer(path) as writer:
        writer.append("run_started", {}, RUN)
    pki.issue_lineage(consortium.folder, force=True)
    files = consortium.files
    renewed, renewed_key = pki.check_key_pair(files.lineage_cert, files.lineage_key)
    with LineageWriter.open(path, renewed_key, renewed) as writer:
        writer.append("run_finished", {}, RUN)
    assert verify(path, [consortium.signer_cert, renewed], ca_certificate=consortium.ca).ok
    assert_broken_at(verify(path, renewed), 0, "not by the lineage-signing certificate")


# ---------------------------------------------------------------------------- tampering


def flipped(byte: int) -> int:
    """A different byte of the same kind where there is one: digit for digit, letter for letter."""
    char = chr(byte)
    if char.isascii() and char.isdigit():
        return ord(str((int(char) + 1) % 10))
    if char.isascii() and char.isalpha():
        base = ord("a") if char.islower() else ord("A")
        return base + (byte - base + 1) % 26
    return ord("x")


def test_changing_any_single_byte_of_any_record_is_caught_at_that_record(ledger: Ledger, consortium: Consortium):
    data = ledger.path.read_bytes()
    seq_of_byte = [seq for seq, line in enumerate(read_lines(ledger.path)) for _ in line]
    descriptor = os.open(ledger.path, os.O_RDWR)
    try:
        for position, original in enumerate(data):  # every record's newline included
            # Changed in place and put back: rewriting the whole file each time is far slower.
            os.pwrite(descriptor, bytes([flipped(original)]), position)
            report = verify(ledger.path, consortium.signer_cert)
            os.pwrite(descriptor, bytes([original]), position)
            assert not report.ok, f"byte {position} of record {seq_of_byte[position]} changed unnoticed"
            assert report.error_seq == seq_of_byte[position], (position, report.error)
    finally:
        os.close(descriptor)
    assert verify(ledger.path, consortium.signer_cert).ok


@pytest.mark.parametrize("deleted", [0, ROUND_2, FINISHED - 1])
def test_a_deleted_record_is_caught_where_it_was(ledger: Ledger, consortium: Consortium, deleted: int):
    lines = read_lines(ledger.path)
    write_lines(ledger.path, lines[:deleted] + lines[deleted + 1 :])
    assert_broken_at(verify(ledger.path, consortium.signer_cert), deleted, "deleted, duplicated or moved")


def test_swapped_records_are_caught(ledger: Ledger, consortium: Consortium):
    lines = read_lines(ledger.path)
    lines[ROUND_2], lines[UPDATE_REJECTED] = lines[UPDATE_REJECTED], lines[ROUND_2]
    write_lines(ledger.path, lines)
    assert_broken_at(verify(ledger.path, consortium.signer_cert), ROUND_2, "deleted, duplicated or moved")


def test_a_duplicated_record_is_caught(ledger: Ledger, consortium: Consortium):
    lines = read_lines(ledger.path)
    write_lines(ledger.path, lines[: ROUND_1 + 1] + [lines[ROUND_1]] + lines[ROUND_1 + 1 :])
    assert_broken_at(verify(ledger.path, consortium.signer_cert), ROUND_1 + 1, "holds seq 1 where seq 2")


def test_swapped_checkpoint_files_are_caught_naming_the_file(ledger: Ledger, consortium: Consortium):
    first, second = ledger.checkpoint_of(1), ledger.checkpoint_of(2)
    first.rename(first.with_suffix(".tmp"))
    second.rename(first)
    first.with_suffix(".tmp").rename(second)
    report = verify(ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints)
    assert_broken_at(report, ROUND_SEQ[1], first.name, "altered or swapped")
    # Without the checkpoints the ledger itself is intact.
    assert verify(ledger.path, consortium.signer_cert).ok


def rewrite_checkpoint(path: Path, change_tensors: Any = None, change_metadata: Any = None) -> None:
    """Rewrite a checkpoint with its tensors and header metadata passed through the given changes."""
    arrays, metadata = read_model_file(path)
    save_file(
        change_tensors(arrays) if change_tensors else arrays,
        str(path),
        metadata=change_metadata(metadata) if change_metadata else metadata,
    )


def test_an_altered_checkpoint_tensor_is_caught(ledger: Ledger, consortium: Consortium):
    path = ledger.checkpoint_of(2)
    rewrite_checkpoint(
        path, change_tensors=lambda arrays: {**arrays, "head.bias": arrays["head.bias"] + np.float32(1e-3)}
    )
    report = verify(ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints)
    assert_broken_at(report, ROUND_SEQ[2], path.name, "altered or swapped")
    assert report.checkpoints_checked == 1


def test_an_edited_model_config_in_a_checkpoint_header_is_caught(ledger: Ledger, consortium: Consortium):
    """The digest covers the header metadata fedgen reads back, not only the tensors."""
    path = ledger.checkpoint_of(3)
    rewrite_checkpoint(
        path,
        change_metadata=lambda metadata: {
            **metadata,
            "model_config": metadata["model_config"].replace('"layers": 1', '"layers": 2'),
        },
    )
    assert load_file(str(path)).keys() == global_model(3).keys()  # tensors untouched
    report = verify(ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints)
    assert_broken_at(report, ROUND_SEQ[3], path.name, "altered or swapped")
    with pytest.raises(ValueError, match="do not match the digest recorded"):
        load_checkpoint(path)


def test_a_checkpoint_that_is_not_safetensors_is_caught(ledger: Ledger, consortium: Consortium):
    ledger.checkpoint_of(3).write_bytes(b"not a checkpoint")
    report = verify(ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints)
    assert_broken_at(report, ROUND_SEQ[3], "cannot be read")


def test_a_missing_checkpoint_is_a_failure_naming_the_record(ledger: Ledger, consortium: Consortium):
    missing = ledger.checkpoint_of(2)
    missing.unlink()
    report = verify(ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints)
    assert_broken_at(report, ROUND_SEQ[2], missing.name, "is missing from")
    assert report.checkpoints_checked == 1
    assert verify(ledger.path, consortium.signer_cert).ok  # without a checkpoints folder, none is looked for


def resign(record: dict[str, Any], key: ec.EllipticCurvePrivateKey, signer: str) -> bytes:
    """``record`` with a fresh hash and signature by ``key``, as a ledger line."""
    forged = {name: value for name, value in record.items() if name not in ("hash", "signature")}
    forged["signer"] = signer
    forged["hash"] = record_hash(forged)
    forged["signature"] = base64.b64encode(pki.sign_digest(key, forged["hash"])).decode()
    return canonical_encoding(forged) + b"\n"


@pytest.mark.parametrize("claims_aggregator", [False, True])
def test_a_record_re_signed_with_another_key_is_caught(
    ledger: Ledger, consortium: Consortium, rogue: Consortium, claims_aggregator: bool
):
    record = dict(ledger.records[UPDATE_REJECTED], body={**ledger.records[UPDATE_REJECTED]["body"], "reason": "none"})
    signer = pki.fingerprint(consortium.signer_cert if claims_aggregator else rogue.signer_cert)
    lines = read_lines(ledger.path)
    lines[UPDATE_REJECTED] = resign(record, rogue.signer_key, signer)
    write_lines(ledger.path, lines)
    phrase = "signature is not valid" if claims_aggregator else "re-signed by someone else"
    assert_broken_at(verify(ledger.path, consortium.signer_cert), UPDATE_REJECTED, phrase)


def test_an_aggregator_certificate_from_another_ca_is_caught(tmp_path: Path, consortium: Consortium, rogue: Consortium):
    with rogue.writer(tmp_path / "lineage.jsonl") as writer:
        writer.append("run_started", {}, RUN)
    report = verify(tmp_path / "lineage.jsonl", rogue.signer_cert, ca_certificate=consortium.ca)
    assert_broken_at(report, 0, "lineage-signing certificate", "wrong issuer")


@pytest.mark.parametrize("role", ["site", "tls-server"])
def test_a_ledger_re_signed_with_a_site_or_tls_key_is_refused_even_with_that_certificate(
    ledger: Ledger, consortium: Consortium, role: str
):
    """The whole chain re-signed, consistently, by a certificate the CA really issued, but not for this."""
    files = consortium.files
    cert_path, key_path = (
        (files.site_cert("site-a"), files.site_key("site-a"))
        if role == "site"
        else (files.aggregator_cert, files.aggregator_key)
    )
    certificate, key = pki.check_key_pair(cert_path, key_path)
    forge_ledger(ledger.path, ledger.records, key, certificate)
    report = verify(ledger.path, certificate, ca_certificate=consortium.ca)
    usage = "clientAuth" if role == "site" else "serverAuth"
    assert_broken_at(report, 0, "signer is refused", "not a lineage-signing certificate", usage)


def self_signed_lineage_signer(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate with the lineage-signing usage that no consortium CA issued."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, pki.LINEAGE_SIGNER_CN)])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([pki.LINEAGE_SIGNING_OID]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def test_a_self_signed_lineage_signer_is_refused_with_the_ca(ledger: Ledger, consortium: Consortium, tmp_path: Path):
    certificate, key = self_signed_lineage_signer(tmp_path)
    forge_ledger(ledger.path, ledger.records, key, certificate)
    assert verify(ledger.path, certificate).ok  # without the CA the certificate is taken on trust
    assert_broken_at(verify(ledger.path, certificate, ca_certificate=consortium.ca), 0, "wrong issuer")


def test_a_writer_refuses_to_sign_with_the_tls_key(tmp_path: Path, consortium: Consortium):
    files = consortium.files
    certificate, key = pki.check_key_pair(files.aggregator_cert, files.aggregator_key)
    with pytest.raises(LineageError, match="refusing to sign the ledger.*serverAuth.*fedgen certs issue lineage"):
        LineageWriter.open(tmp_path / "lineage.jsonl", key, certificate)
    assert not (tmp_path / "lineage.jsonl").exists()


def test_records_signed_after_the_signer_was_revoked_fail_against_the_crl(tmp_path: Path):
    consortium = make_consortium(tmp_path / "certs", "Revoking")
    path = write_ledger(tmp_path, consortium).path
    crl = consortium.files.crl
    with pytest.raises(LineageError, match="give the CA as well"):
        verify(path, consortium.signer_cert, crl=pki.load_crl(crl))
    # Revoked a minute from now: every record was signed before, and still verifies.
    pki.revoke_lineage(consortium.folder, "superseded", now=datetime.now(timezone.utc) + timedelta(minutes=1))
    assert verify(path, consortium.signer_cert, ca_certificate=consortium.ca, crl=pki.load_crl(crl)).ok
    # Revoked (with its key compromised) a minute ago: the records are younger than the revocation.
    pki.issue_lineage(consortium.folder, force=True)
    files = consortium.files
    renewed, renewed_key = pki.check_key_pair(files.lineage_cert, files.lineage_key)
    with LineageWriter.open(path, renewed_key, renewed) as writer:
        writer.append("run_started", {}, "run-8")
    pki.revoke_lineage(consortium.folder, "key-compromise", now=datetime.now(timezone.utc) - timedelta(minutes=1))
    report = verify(path, [consortium.signer_cert, renewed], ca_certificate=consortium.ca, crl=pki.load_crl(crl))
    assert_broken_at(report, FINISHED + 1, "lineage-signing certificate", "was revoked on")


def test_the_aggregator_does_not_start_a_run_with_a_revoked_lineage_signer(tmp_path: Path):
    from fedgen.config import AggregatorTLSConfig, LineageSigningConfig, TrainingConfig
    from fedgen.model import preset_config
    from fedgen.server.app import run_federation
    from fedgen.server.plan import LineagePlan, RunPlan

    files = make_consortium(tmp_path / "certs", "Revoked").files
    pki.revoke_lineage(files.folder, "key-compromise")
    plan = RunPlan(
        training=TrainingConfig(),
        model=preset_config("nano", vocab_size=8, max_len=8),
        label_names=["0", "1"],
        num_sites=1,
        out_dir=tmp_path,
        lineage=LineagePlan(
            ledger=tmp_path / "lineage.jsonl",
            signing=LineageSigningConfig(certificate=files.lineage_cert, private_key=files.lineage_key),
        ),
        tls=AggregatorTLSConfig(
            certificate=files.aggregator_cert,
            private_key=files.aggregator_key,
            ca_certificate=files.ca_cert,
            crl=files.crl,
        ),
    )
    with pytest.raises(RuntimeError, match="lineage.pem is revoked.*fedgen certs issue lineage --force"):
        run_federation(grid=None, plan=plan)  # refused before any site is asked
    assert not (tmp_path / "lineage.jsonl").exists()


def round_with(
    tmp_path: Path,
    consortium: Consortium,
    contributions: Callable[[LedgerHead], list[dict[str, Any]]],
    ledger_head: Callable[[LedgerHead], dict[str, Any] | None] | None = None,
) -> Path:
    """A ledger the honest signer signed: run_started, then one round with ``contributions(head)``."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    with consortium.writer(tmp_path / "lineage.jsonl") as writer:
        writer.append("run_started", {}, RUN)
        body = round_body(consortium, checkpoints, 1, writer.head, contributions(writer.head))
        if ledger_head is not None:
            body["ledger_head"] = ledger_head(writer.head)
        writer.append("round_committed", body, RUN)
    return tmp_path / "lineage.jsonl"


def test_a_forged_site_signature_is_caught(tmp_path: Path, consortium: Consortium):
    """site-b signed site-a's update; the record carries site-a's certificate."""
    path = round_with(
        tmp_path,
        consortium,
        lambda head: [
            contribution(consortium, "site-b", 1, head),
            contribution(consortium, "site-a", 1, head, signing_site="site-b"),
        ],
    )
    report = verify(path, consortium.signer_cert)
    assert_broken_at(report, 1, "site 'site-a'", "signature over update")
    assert report.site_signatures_checked == 1


def test_a_site_signature_over_another_ledger_head_is_caught(tmp_path: Path, consortium: Consortium):
    """The site witnessed a different head than the one the round record says it was sent."""
    elsewhere = LedgerHead(0, "ab" * 32, "")
    path = round_with(
        tmp_path, consortium, lambda head: [contribution(consortium, "site-a", 1, head, signed_head=elsewhere)]
    )
    assert_broken_at(verify(path, consortium.signer_cert), 1, "site 'site-a'", "and ledger head")


@pytest.mark.parametrize(
    "claimed",
    [
        lambda head: {"seq": 0, "hash": "ab" * 32},
        lambda head: {"seq": 1, "hash": head.hash},
        lambda head: {"seq": -1, "hash": head.hash},
    ],
    ids=["other-hash", "not-yet-written", "negative-seq"],
)
def test_a_round_naming_a_head_this_ledger_does_not_hold_is_caught(
    tmp_path: Path, consortium: Consortium, claimed: Callable[[LedgerHead], dict]
):
    path = round_with(tmp_path, consortium, lambda head: [], ledger_head=claimed)
    assert_broken_at(verify(path, consortium.signer_cert), 1, "ledger_head")


def test_a_contribution_signed_under_another_sites_certificate_is_caught_with_the_ca(
    tmp_path: Path, consortium: Consortium
):
    path = round_with(
        tmp_path,
        consortium,
        lambda head: [contribution(consortium, "site-a", 1, head, signing_site="site-b", certificate_site="site-b")],
    )
    assert verify(path, consortium.signer_cert).ok  # self-consistent without a trust anchor
    report = verify(path, consortium.signer_cert, ca_certificate=consortium.ca)
    assert_broken_at(report, 1, "certificate of site 'site-b'")


def test_a_site_certificate_from_another_ca_is_caught(tmp_path: Path, consortium: Consortium, rogue: Consortium):
    path = round_with(tmp_path, consortium, lambda head: [contribution(rogue, "site-a", 1, head)])
    report = verify(path, consortium.signer_cert, ca_certificate=consortium.ca)
    assert_broken_at(report, 1, "site 'site-a'", "wrong issuer")


def test_a_contribution_whose_fingerprint_disagrees_with_its_certificate_is_caught(
    tmp_path: Path, consortium: Consortium
):
    path = round_with(
        tmp_path, consortium, lambda head: [{**contribution(consortium, "site-a", 1, head), "fingerprint": "0" * 64}]
    )
    assert_broken_at(verify(path, consortium.signer_cert), 1, "names certificate")


def test_a_round_that_does_not_start_from_the_previous_model_is_caught(tmp_path: Path, consortium: Consortium):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    path = tmp_path / "lineage.jsonl"
    with consortium.writer(path) as writer:
        writer.append("round_committed", round_body(consortium, checkpoints, 1, writer.head), RUN)
        skipped = round_body(consortium, checkpoints, 3, writer.head)
        writer.append("round_committed", skipped, RUN)
        writer.append("round_committed", round_body(consortium, checkpoints, 1, writer.head), "another-run")
    assert_broken_at(verify(path, consortium.signer_cert), 1, "model_in", "previous committed round")


def test_a_checkpoint_name_with_a_path_is_refused(tmp_path: Path, consortium: Consortium):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    body = round_body(consortium, checkpoints, 1, None)
    body["model_out"]["checkpoint"] = "../lineage.jsonl"
    with consortium.writer(tmp_path / "lineage.jsonl") as writer:
        writer.append("round_committed", body, RUN)
    report = verify(tmp_path / "lineage.jsonl", consortium.signer_cert, checkpoints_dir=checkpoints)
    assert_broken_at(report, 0, "not a plain file name")


# ---------------------------------------------------------------------------- crash safety


WRITER_LOOP = """
import sys
from fedgen import pki
from fedgen.lineage import LineageWriter

writer = LineageWriter.open(sys.argv[1], pki.load_private_key(sys.argv[2]), pki.load_certificate(sys.argv[3]))
blob = "ACGT" * 250_000  # a megabyte per record, so the kill is likely to land mid-append
number = 0
while True:
    writer.append("round_committed", {"round": number, "blob": blob}, "crash-run")
    number += 1
"""


def test_a_writer_killed_mid_append_loses_at_most_that_record(tmp_path: Path, consortium: Consortium):
    path = tmp_path / "lineage.jsonl"
    files = consortium.files
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_LOOP, str(path), str(files.lineage_key), str(files.lineage_cert)],
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (path.exists() and path.stat().st_size > 5_000_000):
        assert writer.poll() is None, writer.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer did not get going"
        time.sleep(0.005)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    writer.stderr.close()

    report = verify(path, consortium.signer_cert)
    assert report.ok, report.error
    assert report.records >= 4

    with consortium.writer(path) as resumed:
        assert resumed.head_hash == report.head_hash
        last = resumed.append("run_failed", {"reason": "aggregator killed"}, "crash-run")
    assert last["seq"] == report.records and last["prev"] == report.head_hash
    after = verify(path, consortium.signer_cert)
    assert after.ok and not after.incomplete_tail
    assert (after.records, after.head_hash) == (report.records + 1, last["hash"])


def test_a_torn_tail_is_reported_then_cut_off_by_the_next_writer(ledger: Ledger, consortium: Consortium):
    whole = ledger.path.read_bytes()
    last_line = read_lines(ledger.path)[-1]
    with open(ledger.path, "ab") as handle:
        handle.write(last_line[: len(last_line) // 2])

    report = verify(ledger.path, consortium.signer_cert)
    assert report.ok and report.incomplete_tail
    assert (report.records, report.head_hash) == (8, ledger.records[-1]["hash"])
    assert read_records(ledger.path) == ledger.records

    with consortium.writer(ledger.path) as writer:
        assert ledger.path.read_bytes() == whole
        writer.append("run_started", {"resumed": True}, "run-8")
    after = verify(ledger.path, consortium.signer_cert, checkpoints_dir=ledger.checkpoints)
    assert after.ok and not after.incomplete_tail and after.records == 9


@pytest.mark.parametrize(
    "tail", [b"hello", b'{"body":{}} ', None], ids=["garbage", "object-and-more", "record-and-more"]
)
def test_a_tail_that_no_torn_append_leaves_is_an_error(ledger: Ledger, consortium: Consortium, tail: bytes | None):
    if tail is None:  # a whole record whose newline was changed into something else
        tail = read_lines(ledger.path)[-1].removesuffix(b"\n") + b"x"
    with open(ledger.path, "ab") as handle:
        handle.write(tail)
    assert_broken_at(verify(ledger.path, consortium.signer_cert), 8)
    with pytest.raises(LineageError, match=r"line 9 \(seq 8\).*appending is refused"):
        consortium.writer(ledger.path)


def test_a_writer_refuses_to_append_to_a_malformed_ledger(ledger: Ledger, consortium: Consortium):
    lines = read_lines(ledger.path)
    lines[ROUND_2] = lines[ROUND_2].replace(b'"round":2', b'"round":9')
    write_lines(ledger.path, lines)
    with pytest.raises(LineageError, match=r"line 4 \(seq 3\): the hash does not match.*appending is refused"):
        consortium.writer(ledger.path)
    lines[ROUND_2] = b"{not json}\n"
    write_lines(ledger.path, lines)
    with pytest.raises(LineageError, match=r"line 4 \(seq 3\): not valid UTF-8 JSON"):
        consortium.writer(ledger.path)
    with pytest.raises(LineageError, match=r"line 4 \(seq 3\)"):
        read_records(ledger.path)


# ---------------------------------------------------------------------------- one writer


def test_a_second_writer_in_the_same_process_is_refused(tmp_path: Path, consortium: Consortium):
    path = tmp_path / "lineage.jsonl"
    with consortium.writer(path) as writer:
        writer.append("run_started", {}, RUN)
        with pytest.raises(LineageError, match=f"{re.escape(str(path))}: another writer holds"):
            consortium.writer(path)
    with consortium.writer(path) as writer:  # released on close
        assert writer.head_hash == read_records(path)[0]["hash"]


def test_a_writer_in_another_process_is_refused(tmp_path: Path, consortium: Consortium):
    path = tmp_path / "lineage.jsonl"
    files = consortium.files
    code = (
        "import sys\nfrom fedgen import pki\nfrom fedgen.lineage import LineageWriter\n"
        "LineageWriter.open(sys.argv[1], pki.load_private_key(sys.argv[2]), pki.load_certificate(sys.argv[3]))\n"
    )
    with consortium.writer(path):
        result = subprocess.run(
            [sys.executable, "-c", code, str(path), str(files.lineage_key), str(files.lineage_cert)],
            capture_output=True,
            text=True,
        )
    assert result.returncode != 0
    assert "LineageError" in result.stderr and "another writer holds" in result.stderr


# ---------------------------------------------------------------------------- appending


def test_append_refuses_what_it_cannot_record_faithfully(tmp_path: Path, consortium: Consortium, rogue: Consortium):
    path = tmp_path / "lineage.jsonl"
    with consortium.writer(path) as writer:
        with pytest.raises(LineageError, match="unknown lineage record type"):
            writer.append("round_done", {}, RUN)
        with pytest.raises(LineageError, match="run id"):
            writer.append("run_started", {}, "")
        with pytest.raises(LineageError, match="NaN"):
            writer.append("round_committed", {"metrics": {"loss": float("nan")}}, RUN)
        with pytest.raises(LineageError, match="not representable"):
            writer.append("round_committed", {"examples": np.int64(3)}, RUN)
        with pytest.raises(LineageError, match="not representable"):
            writer.append("round_committed", {"site": "\ud800"}, RUN)
        record = writer.append("run_started", {1: (1, 2)}, RUN)
    assert record["body"] == {"1": [1, 2]} and read_records(path) == [record]
    with pytest.raises(LineageError, match="closed"):
        writer.append("run_finished", {}, RUN)
    with pytest.raises(LineageError, match="not the key"):
        LineageWriter.open(path, rogue.signer_key, consortium.signer_cert)
    assert set(RECORD_TYPES) == {
        "run_started",
        "round_committed",
        "update_rejected",
        "site_refused",
        "model_approved",
        "run_finished",
        "run_failed",
    }


# ---------------------------------------------------------------------------- PROV


def test_prov_export_is_a_consistent_graph_of_models_updates_and_sites(ledger: Ledger, consortium: Consortium):
    document = export_prov(ledger.path)
    json.dumps(document)
    assert document["prefix"]["sha256"] == "urn:sha256:" and "fedgen" in document["prefix"]
    nodes = {**document["entity"], **document["activity"], **document["agent"]}
    relations = ("wasGeneratedBy", "used", "wasAssociatedWith", "wasAttributedTo", "wasDerivedFrom")
    for kind in relations:
        assert document[kind], kind
        for identifier, relation in document[kind].items():
            assert identifier.startswith("_:")
            for role in ("entity", "activity", "agent", "generatedEntity", "usedEntity"):
                if f"prov:{role}" in relation:
                    assert relation[f"prov:{role}"] in nodes, (kind, identifier, relation)

    def prov_type(identifier: str) -> str:
        return nodes[identifier]["prov:type"]["$"]

    generated = [r["prov:entity"] for r in document["wasGeneratedBy"].values()]
    for round_number, seq in ROUND_SEQ.items():
        body = ledger.records[seq]["body"]
        model_out, model_in = f"sha256:{body['model_out']['digest']}", f"sha256:{body['model_in']['digest']}"
        round_id = f"fedgen:run-{RUN}-round-{round_number}"
        assert prov_type(model_out) == "fedgen:Model" and nodes[model_out]["fedgen:round"] == round_number
        assert generated.count(model_out) == 1
        assert {
            "prov:entity": model_out,
            "prov:activity": round_id,
            "prov:time": ledger.records[seq]["time"],
        } in document["wasGeneratedBy"].values()
        assert {"prov:generatedEntity": model_out, "prov:usedEntity": model_in} in document["wasDerivedFrom"].values()
        assert {"prov:activity": round_id, "prov:entity": model_in} in document["used"].values()
        assert nodes[round_id]["prov:startTime"] == body["started_at"]
        for item in body["contributions"]:
            update, site = f"sha256:{item['update_digest']}", f"fedgen:site-{item['site']}"
            training = f"{round_id}-site-{item['site']}"
            assert prov_type(update) == "fedgen:ModelUpdate" and prov_type(site) == "prov:Organization"
            assert nodes[update]["fedgen:examples"] == item["examples"]
            assert nodes[update]["fedgen:epsilon"] == item["epsilon"]
            assert {"prov:entity": update, "prov:agent": site} in document["wasAttributedTo"].values()
            assert {"prov:entity": update, "prov:activity": training} in document["wasGeneratedBy"].values()
            assert {"prov:activity": round_id, "prov:entity": update} in document["used"].values()
            assert {"prov:activity": training, "prov:agent": site} in document["wasAssociatedWith"].values()
    aggregator = f"fedgen:aggregator-{pki.fingerprint(consortium.signer_cert)[:16]}"
    assert prov_type(aggregator) == "prov:SoftwareAgent"
    round_1 = f"fedgen:run-{RUN}-round-1"
    assert {"prov:activity": round_1, "prov:agent": aggregator} in document["wasAssociatedWith"].values()
    person = "fedgen:person-Dr.%20Ada%20Lovelace"
    approval = f"fedgen:run-{RUN}-approval-{APPROVED}"
    assert prov_type(person) == "prov:Person" and nodes[person]["fedgen:name"] == APPROVER
    assert {"prov:activity": approval, "prov:agent": person} in document["wasAssociatedWith"].values()
    final = f"sha256:{ledger.records[APPROVED]['body']['model_digest']}"
    assert {"prov:activity": approval, "prov:entity": final} in document["used"].values()
    attributed = {r["prov:entity"]: r["prov:agent"] for r in document["wasAttributedTo"].values()}
    assert sorted(set(attributed.values())) == ["fedgen:site-site-a", "fedgen:site-site-b"]
