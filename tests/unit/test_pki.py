import hashlib
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedgen import pki
from fedgen.pki import PKIError

DIGEST = hashlib.sha256(b"model update").hexdigest()


def make_consortium(certs: Path, now: datetime | None = None) -> Path:
    """A consortium with an aggregator for localhost/127.0.0.1/::1 and sites site-a, site-b."""
    pki.init_consortium(certs, "Genomics EU", now=now)
    pki.issue_aggregator(certs, ["localhost", "127.0.0.1", "::1"], now=now)
    pki.issue_site(certs, "site-a", now=now)
    pki.issue_site(certs, "site-b", now=now)
    return certs


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_consortium(tmp_path / "certs")


@pytest.fixture
def stale(tmp_path: Path) -> Path:
    """A consortium made 40 days ago whose CRL lapsed 10 days ago."""
    return make_consortium(tmp_path / "stale", datetime.now(timezone.utc) - timedelta(days=40))


@pytest.fixture
def other(tmp_path: Path) -> Path:
    """A second consortium with a different name and one site."""
    certs = tmp_path / "other"
    pki.init_consortium(certs, "Someone Else")
    pki.issue_site(certs, "site-a")
    return certs


def cert(path: Path) -> x509.Certificate:
    return pki.load_certificate(path)


def extension(certificate: x509.Certificate, kind: type) -> x509.Extension:
    return certificate.extensions.get_extension_for_class(kind)


def no_temporary_files(root: Path) -> bool:
    return not [name for _, _, names in os.walk(root) for name in names if name.endswith(".tmp")]


# ---------------------------------------------------------------------------- certificate fields


def test_ca_is_a_self_signed_ca_that_signs_only_end_entities(folder):
    ca = cert(folder / "ca.pem")
    assert ca.subject.rfc4514_string() == "CN=Genomics EU consortium CA,O=Genomics EU"
    assert ca.issuer == ca.subject
    constraints = extension(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = extension(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert extension(ca, x509.SubjectKeyIdentifier).value.digest
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    ca.verify_directly_issued_by(ca)
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= pki.CA_DAYS
    assert pki.load_crl(folder / "crl.pem").issuer == ca.subject


def test_aggregator_is_a_server_only_certificate_with_dns_and_ip_names(folder):
    aggregator, ca = cert(folder / "aggregator.pem"), cert(folder / "ca.pem")
    assert pki._common_name(aggregator.subject) == "localhost"
    names = extension(aggregator, x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert list(extension(aggregator, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = extension(aggregator, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not usage.value.key_cert_sign
    constraints = extension(aggregator, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    assert (
        extension(aggregator, x509.AuthorityKeyIdentifier).value.key_identifier
        == extension(ca, x509.SubjectKeyIdentifier).value.digest
    )
    pki.verify_issued_by(aggregator, ca)
    assert (aggregator.not_valid_after_utc - aggregator.not_valid_before_utc).days >= pki.CERT_DAYS


def test_site_is_a_client_only_certificate_named_by_its_site_id(folder):
    site = cert(folder / "sites" / "site-a.pem")
    assert pki.site_id_of(site) == "site-a"
    assert site.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Genomics EU"
    assert list(extension(site, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = extension(site, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_agreement
    assert not extension(site, x509.BasicConstraints).value.ca
    pki.verify_issued_by(site, cert(folder / "ca.pem"))


def test_lineage_signer_has_its_own_key_and_only_the_lineage_signing_usage(folder):
    path = pki.issue_lineage(folder)
    lineage, ca = cert(path), cert(folder / "ca.pem")
    assert path == folder / "lineage.pem" and pki.layout(folder).lineage_key.is_file()
    assert lineage.subject.rfc4514_string() == "CN=aggregator lineage signer,O=Genomics EU"
    assert list(extension(lineage, x509.ExtendedKeyUsage).value) == [pki.LINEAGE_SIGNING_OID]
    assert pki.LINEAGE_SIGNING_OID.dotted_string.startswith("2.25.")  # a UUID OID: private, unregistered
    usage = extension(lineage, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.content_commitment
    assert not usage.value.key_agreement and not extension(lineage, x509.BasicConstraints).value.ca
    pki.verify_issued_by(lineage, ca)
    pki.check_lineage_signer(lineage)
    lineage_key = pki.load_private_key(folder / "lineage.key")
    assert not pki.certificate_matches_key(cert(folder / "aggregator.pem"), lineage_key)
    kinds = {info.path: info.kind for info in pki.list_certificates(folder)}
    assert kinds["lineage.pem"] == "lineage"
    assert all(info.problem is None for info in pki.list_certificates(folder))


@pytest.mark.parametrize(
    "path, usage",
    [("aggregator.pem", "serverAuth"), ("sites/site-a.pem", "clientAuth"), ("ca.pem", "no extended key usage")],
)
def test_no_other_certificate_passes_as_a_lineage_signer(folder, path, usage):
    with pytest.raises(PKIError, match=f"not a lineage-signing certificate: its extended key usage is .*{usage}"):
        pki.check_lineage_signer(cert(folder / path))


def test_a_certificate_with_the_lineage_usage_and_another_is_refused(folder):
    ca_key = pki.load_private_key(folder / "ca.key")
    ca = cert(folder / "ca.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    both = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage([pki.LINEAGE_SIGNING_OID, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(PKIError, match="lineage signing, TLS server"):
        pki.check_lineage_signer(both)


def test_lineage_signer_rotation_and_revocation(folder):
    with pytest.raises(PKIError, match="no lineage-signing certificate"):
        pki.revoke_lineage(folder)
    old = cert(pki.issue_lineage(folder))
    with pytest.raises(PKIError, match="lineage.pem already exists; use --force"):
        pki.issue_lineage(folder)
    new = cert(pki.issue_lineage(folder, force=True))
    crl = pki.load_crl(folder / "crl.pem")
    assert pki.revocation_time(old, crl) is not None and pki.revocation_time(new, crl) is None
    info = pki.revoke_lineage(folder, "key-compromise", now=datetime.now(timezone.utc))
    assert info.kind == "lineage" and info.reason == "key_compromise" and info.serial == f"{new.serial_number:x}"
    crl = pki.load_crl(folder / "crl.pem")
    pki.check_crl(crl, cert(folder / "ca.pem"))
    assert pki.revocation_time(new, crl) == info.revoked_at
    assert pki.revocation_time(cert(folder / "sites" / "site-a.pem"), crl) is None
    with pytest.raises(PKIError, match="already revoked.*fedgen certs issue lineage --force"):
        pki.revoke_lineage(folder)


def test_days_sets_the_validity(tmp_path):
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    pki.init_consortium(tmp_path, "c", days=100, now=now)
    pki.issue_site(tmp_path, "s", days=7, now=now)
    assert cert(tmp_path / "ca.pem").not_valid_after_utc == now + timedelta(days=100)
    assert cert(tmp_path / "sites" / "s.pem").not_valid_after_utc == now + timedelta(days=7)
    with pytest.raises(PKIError, match="outlive the CA"):
        pki.issue_site(tmp_path, "t", days=200, now=now)


@pytest.mark.parametrize("site_id", ["", "../escape", "a b", "-lead", "x" * 65, "site\n", "a/b", "é"])
def test_bad_site_ids_are_refused(folder, site_id):
    with pytest.raises(PKIError, match="site id"):
        pki.issue_site(folder, site_id)


@pytest.mark.parametrize("hosts", [[], [""], ["agg example.org"], ["agg/example"], ["x" * 65 + ".org"]])
def test_bad_hosts_are_refused(folder, hosts):
    with pytest.raises(PKIError, match="host"):
        pki.issue_aggregator(folder, hosts, force=True)


def test_issuing_needs_a_consortium(tmp_path):
    with pytest.raises(PKIError, match="fedgen certs init"):
        pki.issue_site(tmp_path, "site-a")


def test_times_must_be_timezone_aware(tmp_path):
    with pytest.raises(PKIError, match="timezone-aware"):
        pki.init_consortium(tmp_path, "c", now=datetime(2030, 1, 1))


# ---------------------------------------------------------------------------- files


def test_private_keys_are_0600_from_creation_and_unencrypted_pkcs8(tmp_path):
    previous = os.umask(0)  # with no umask only the mode given at creation protects the keys
    try:
        pki.init_consortium(tmp_path, "c")
        pki.issue_aggregator(tmp_path, ["localhost"])
        pki.issue_site(tmp_path, "site-a")
        pki.issue_site(tmp_path, "site-a", force=True)
    finally:
        os.umask(previous)
    keys = [tmp_path / "ca.key", tmp_path / "aggregator.key", tmp_path / "sites" / "site-a.key"]
    for key in keys:
        mode = stat.S_IMODE(key.stat().st_mode)
        assert mode == 0o600, f"{key} {oct(mode)}"
        assert not mode & (stat.S_IRWXG | stat.S_IRWXO)
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert stat.S_IMODE((tmp_path / "ca.pem").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "action, path",
    [
        (lambda f: pki.init_consortium(f, "Genomics EU"), "ca.pem"),
        (lambda f: pki.issue_aggregator(f, ["localhost"]), "aggregator.pem"),
        (lambda f: pki.issue_site(f, "site-a"), "sites/site-a.pem"),
    ],
)
def test_nothing_is_overwritten_without_force(folder, action, path):
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(PKIError, match="already exists; use --force") as error:
        action(folder)
    assert str(folder / path) in str(error.value)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_init_with_force_starts_a_new_ca(folder):
    old = cert(folder / "ca.pem")
    pki.init_consortium(folder, "Genomics EU", force=True)
    assert cert(folder / "ca.pem").serial_number != old.serial_number
    with pytest.raises(PKIError, match="bad signature"):
        pki.verify_issued_by(cert(folder / "sites" / "site-a.pem"), cert(folder / "ca.pem"))
    problems = {info.path: info.problem for info in pki.list_certificates(folder)}
    assert "not listed" in problems["sites/site-a.pem"]


def test_index_and_crl_are_written_atomically(folder, monkeypatch):
    assert no_temporary_files(folder)
    index, crl = (folder / "index.json").read_bytes(), (folder / "crl.pem").read_bytes()

    def crash(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(pki.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        pki.revoke_site(folder, "site-a")
    assert (folder / "index.json").read_bytes() == index
    assert (folder / "crl.pem").read_bytes() == crl
    assert no_temporary_files(folder)


def test_index_records_every_certificate(folder):
    index = json.loads((folder / "index.json").read_text())
    entries = {entry["path"]: entry for entry in index["certificates"]}
    assert [e["kind"] for e in index["certificates"]] == ["ca", "aggregator", "site", "site"]
    site = cert(folder / "sites" / "site-b.pem")
    entry = entries["sites/site-b.pem"]
    assert entry["subject"] == "site-b"
    assert entry["serial"] == f"{site.serial_number:x}"
    assert entry["fingerprint"] == pki.fingerprint(site) == site.fingerprint(hashes.SHA256()).hex()
    assert datetime.fromisoformat(entry["not_after"]) == site.not_valid_after_utc
    assert datetime.fromisoformat(entry["not_before"]) == site.not_valid_before_utc
    assert entry["revoked_at"] is None and entry["reason"] is None


# ---------------------------------------------------------------------------- rotation and revocation


def test_force_reissue_revokes_the_old_serial(folder):
    old = cert(folder / "sites" / "site-a.pem")
    pki.issue_site(folder, "site-a", force=True)
    new, crl = cert(folder / "sites" / "site-a.pem"), pki.load_crl(folder / "crl.pem")
    assert new.serial_number != old.serial_number
    assert pki.is_revoked(old, crl) and not pki.is_revoked(new, crl)
    revoked = crl.get_revoked_certificate_by_serial_number(old.serial_number)
    assert revoked.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.superseded
    history = [i for i in pki.list_certificates(folder) if i.subject == "site-a"]
    assert [(i.serial, i.revoked, i.reason) for i in history] == [
        (f"{old.serial_number:x}", True, "superseded"),
        (f"{new.serial_number:x}", False, None),
    ]
    assert not any(i.problem for i in pki.list_certificates(folder))


def test_aggregator_reissue_revokes_the_old_one(folder):
    old = cert(folder / "aggregator.pem")
    pki.issue_aggregator(folder, ["agg.example.org"], force=True)
    assert pki.is_revoked(old, pki.load_crl(folder / "crl.pem"))


def test_revoke_updates_the_crl_and_the_index(folder):
    number_before = json.loads((folder / "index.json").read_text())["crl_number"]
    info = pki.revoke_site(folder, "site-a", "key-compromise")
    crl = pki.load_crl(folder / "crl.pem")
    ca = cert(folder / "ca.pem")
    pki.check_crl(crl, ca)
    assert pki.is_revoked(cert(folder / "sites" / "site-a.pem"), crl)
    assert not pki.is_revoked(cert(folder / "sites" / "site-b.pem"), crl)
    assert not pki.is_revoked(cert(folder / "aggregator.pem"), crl)
    entry = crl.get_revoked_certificate_by_serial_number(int(info.serial, 16))
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number_before + 1
    assert crl.next_update_utc - crl.last_update_utc >= timedelta(days=pki.CRL_DAYS)
    assert info.revoked and info.reason == "key_compromise" and info.revoked_at is not None
    listed = {i.subject: i for i in pki.list_certificates(folder)}
    assert listed["site-a"].revoked and not listed["site-b"].revoked
    assert all(i.problem is None for i in listed.values())


def test_unspecified_reason_leaves_the_reason_code_out(folder):
    info = pki.revoke_site(folder, "site-b")
    entry = pki.load_crl(folder / "crl.pem").get_revoked_certificate_by_serial_number(int(info.serial, 16))
    assert info.reason == "unspecified" and len(entry.extensions) == 0


def test_revoking_twice_is_an_error(folder):
    pki.revoke_site(folder, "site-a")
    with pytest.raises(PKIError, match="already revoked"):
        pki.revoke_site(folder, "site-a")


def test_revoking_an_unknown_site_lists_the_known_ones(folder):
    with pytest.raises(PKIError, match="unknown site 'site-z'.*known sites: site-a, site-b"):
        pki.revoke_site(folder, "site-z")


def test_unknown_revocation_reason(folder):
    with pytest.raises(PKIError, match="unknown revocation reason 'bored'.*key-compromise"):
        pki.revoke_site(folder, "site-a", "bored")


def test_stale_crl_is_reported_and_refresh_fixes_it(stale):
    with pytest.raises(PKIError, match="past its next update"):
        pki.check_crl(pki.load_crl(stale / "crl.pem"), cert(stale / "ca.pem"))
    ca_info = pki.list_certificates(stale)[0]
    assert ca_info.kind == "ca" and "refresh-crl" in ca_info.problem
    pki.refresh_crl(stale)
    pki.check_crl(pki.load_crl(stale / "crl.pem"), cert(stale / "ca.pem"))
    assert all(info.problem is None for info in pki.list_certificates(stale))


def test_crl_from_another_ca_is_refused(folder, other):
    with pytest.raises(PKIError, match="not signed by this consortium"):
        pki.check_crl(pki.load_crl(other / "crl.pem"), cert(folder / "ca.pem"))


# ---------------------------------------------------------------------------- listing


def test_list_reports_files_that_disagree_with_the_index(folder, other):
    (folder / "sites" / "site-b.pem").write_bytes((folder / "sites" / "site-a.pem").read_bytes())
    (folder / "sites" / "intruder.pem").write_bytes((other / "sites" / "site-a.pem").read_bytes())
    (folder / "aggregator.pem").unlink()
    problems = {info.path: info.problem for info in pki.list_certificates(folder)}
    assert "is not the certificate" in problems["sites/site-b.pem"]
    assert "does not match its key" not in problems["sites/site-b.pem"]
    assert "not listed" in problems["sites/intruder.pem"]
    assert "not found" in problems["aggregator.pem"]
    assert problems["ca.pem"] is None and problems["sites/site-a.pem"] is None


def test_list_reports_a_key_that_does_not_match(folder):
    (folder / "sites" / "site-b.key").write_bytes((folder / "sites" / "site-a.key").read_bytes())
    problems = {info.path: info.problem for info in pki.list_certificates(folder)}
    assert "does not match its key" in problems["sites/site-b.pem"]


def test_list_accepts_a_site_key_handed_over(folder):
    (folder / "sites" / "site-a.key").unlink()
    assert all(info.problem is None for info in pki.list_certificates(folder))


def test_list_needs_an_index(tmp_path):
    with pytest.raises(PKIError, match="index.json not found"):
        pki.list_certificates(tmp_path)


# ---------------------------------------------------------------------------- loading and checks


def test_check_key_pair(folder):
    cert_path, key_path = folder / "sites" / "site-a.pem", folder / "sites" / "site-a.key"
    certificate, key = pki.check_key_pair(cert_path, key_path)
    assert pki.certificate_matches_key(certificate, key)
    other_key = folder / "sites" / "site-b.key"
    with pytest.raises(PKIError, match="does not match its key") as error:
        pki.check_key_pair(cert_path, other_key)
    assert str(cert_path) in str(error.value) and str(other_key) in str(error.value)


def test_loading_errors_name_the_file(tmp_path, folder):
    missing = tmp_path / "missing.pem"
    with pytest.raises(PKIError, match="missing.pem not found"):
        pki.load_certificate(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for load in (pki.load_certificate, pki.load_private_key, pki.load_crl):
        with pytest.raises(PKIError, match="garbage.pem is not a readable"):
            load(garbage)
    encrypted = tmp_path / "encrypted.key"
    key = pki.load_private_key(folder / "ca.key")
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(PKIError, match="encrypted.key is encrypted"):
        pki.load_private_key(encrypted)


def test_verify_issued_by_accepts_a_good_certificate(folder):
    pki.verify_issued_by(cert(folder / "sites" / "site-a.pem"), cert(folder / "ca.pem"))


def test_verify_issued_by_refuses_another_cas_certificate(folder, other):
    with pytest.raises(PKIError, match="wrong issuer"):
        pki.verify_issued_by(cert(other / "sites" / "site-a.pem"), cert(folder / "ca.pem"))


def test_verify_issued_by_refuses_a_same_named_impostor_ca(folder, tmp_path):
    impostor = tmp_path / "impostor"
    pki.init_consortium(impostor, "Genomics EU")
    pki.issue_site(impostor, "site-a")
    with pytest.raises(PKIError, match="bad signature"):
        pki.verify_issued_by(cert(impostor / "sites" / "site-a.pem"), cert(folder / "ca.pem"))


def test_verify_issued_by_checks_the_validity_window(tmp_path):
    then = datetime.now(timezone.utc) - timedelta(days=30)
    pki.init_consortium(tmp_path, "c", now=then)
    pki.issue_site(tmp_path, "old", days=1, now=then)
    ca, old = cert(tmp_path / "ca.pem"), cert(tmp_path / "sites" / "old.pem")
    with pytest.raises(PKIError, match="expired"):
        pki.verify_issued_by(old, ca)
    pki.verify_issued_by(old, ca, at=then)
    with pytest.raises(PKIError, match="not yet valid"):
        pki.verify_issued_by(old, ca, at=then - timedelta(hours=1))


def test_site_id_of_needs_a_common_name(folder):
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = pki.load_private_key(folder / "ca.key")
    nameless = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(cert(folder / "ca.pem").subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(timezone.utc))
        .not_valid_after(datetime.now(timezone.utc) + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(PKIError, match="no CN"):
        pki.site_id_of(nameless)


# ---------------------------------------------------------------------------- update signatures


def test_sign_and_verify_an_update_digest(folder, other):
    site_a = cert(folder / "sites" / "site-a.pem")
    signature = pki.sign_digest(pki.load_private_key(folder / "sites" / "site-a.key"), DIGEST)
    assert pki.verify_digest_signature(site_a, DIGEST, signature)
    # The documented bytes: ECDSA-SHA256 over the ASCII hex digest.
    site_a.public_key().verify(signature, DIGEST.encode("ascii"), ec.ECDSA(hashes.SHA256()))

    tampered = ("0" if DIGEST[0] != "0" else "1") + DIGEST[1:]
    assert not pki.verify_digest_signature(site_a, tampered, signature)
    from_b = pki.sign_digest(pki.load_private_key(folder / "sites" / "site-b.key"), DIGEST)
    assert not pki.verify_digest_signature(site_a, DIGEST, from_b)
    from_other_ca = pki.sign_digest(pki.load_private_key(other / "sites" / "site-a.key"), DIGEST)
    assert not pki.verify_digest_signature(site_a, DIGEST, from_other_ca)
    for garbage in (b"", b"\x00" * 8, os.urandom(72), signature[:-1], "not bytes"):
        assert not pki.verify_digest_signature(site_a, DIGEST, garbage)
    assert not pki.verify_digest_signature(site_a, DIGEST.upper(), signature)


def test_sign_digest_refuses_something_that_is_not_a_hex_digest(folder):
    key = pki.load_private_key(folder / "sites" / "site-a.key")
    for bad in ("", DIGEST[:-1], DIGEST.upper(), DIGEST + "\n"):
        with pytest.raises(PKIError, match="SHA-256 hex digest"):
            pki.sign_digest(key, bad)


# ---------------------------------------------------------------------------- TLS with Python's ssl


def server_context(folder: Path) -> ssl.SSLContext:
    """The aggregator side: its own certificate, the consortium CA as the only anchor, the CRL."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(folder / "aggregator.pem", folder / "aggregator.key")
    context.load_verify_locations(cafile=folder / "ca.pem")
    context.load_verify_locations(cafile=folder / "crl.pem")  # OpenSSL reads CRLs from a cafile too
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    return context


def client_context(ca: Path, cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A site: checks the aggregator's certificate and host name, presents its own certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cafile=ca)
    context.load_cert_chain(cert_path, key_path)
    return context


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> dict:
    """One connection on a free loopback port; the server answers b"ok" once the handshake is done.

    With TLS 1.3 the client finishes its handshake before the server has judged the client
    certificate, so acceptance is the server's verdict plus the client receiving b"ok".
    """
    outcome: dict = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)

        def serve() -> None:
            try:
                connection, _ = listener.accept()
                with connection:
                    connection.settimeout(10)
                    with server.wrap_socket(connection, server_side=True) as tls:
                        outcome["peer"] = dict(pair[0] for pair in tls.getpeercert()["subject"])["commonName"]
                        tls.sendall(b"ok")
            except OSError as exc:
                outcome["server_error"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname()[:2], timeout=10) as raw:
                with client.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    outcome["reply"] = tls.recv(2)
        except OSError as exc:
            outcome["client_error"] = exc
        finally:
            thread.join(10)
    assert not thread.is_alive()
    return outcome


def site_client(folder: Path, site_id: str, ca: Path | None = None) -> ssl.SSLContext:
    return client_context(
        ca or folder / "ca.pem", folder / "sites" / f"{site_id}.pem", folder / "sites" / f"{site_id}.key"
    )


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
def test_tls_handshake_with_a_site_certificate(folder, server_hostname):
    outcome = handshake(server_context(folder), site_client(folder, "site-a"), server_hostname)
    assert outcome.get("reply") == b"ok", outcome
    assert outcome["peer"] == "site-a"


def test_tls_refuses_a_revoked_site(folder):
    pki.revoke_site(folder, "site-a", "key-compromise")
    outcome = handshake(server_context(folder), site_client(folder, "site-a"))
    assert "certificate revoked" in str(outcome.get("server_error")), outcome
    assert outcome.get("reply") != b"ok"
    assert handshake(server_context(folder), site_client(folder, "site-b")).get("reply") == b"ok"


def test_tls_refuses_a_site_from_another_ca(folder, other):
    outcome = handshake(server_context(folder), site_client(other, "site-a", ca=folder / "ca.pem"))
    assert "unable to get local issuer certificate" in str(outcome.get("server_error")), outcome
    assert outcome.get("reply") != b"ok"


def test_tls_refuses_the_aggregator_certificate_as_a_client(folder):
    client = client_context(folder / "ca.pem", folder / "aggregator.pem", folder / "aggregator.key")
    outcome = handshake(server_context(folder), client)
    assert "unsuitable certificate purpose" in str(outcome.get("server_error")), outcome


def test_tls_client_refuses_a_server_certificate_for_another_host(folder):
    outcome = handshake(server_context(folder), site_client(folder, "site-a"), "aggregator.example.org")
    error = outcome.get("client_error")
    assert isinstance(error, ssl.SSLCertVerificationError) and "Hostname mismatch" in str(error), outcome
    assert "peer" not in outcome


def test_tls_fails_closed_on_a_stale_crl(stale):
    outcome = handshake(server_context(stale), site_client(stale, "site-a"))
    assert "CRL has expired" in str(outcome.get("server_error")), outcome
    pki.refresh_crl(stale)
    assert handshake(server_context(stale), site_client(stale, "site-a")).get("reply") == b"ok"


def test_sign_and_verify_a_message(folder):
    site_a = cert(folder / "sites" / "site-a.pem")
    message = b'{"purpose":"fedgen lineage witness v1"}'
    signature = pki.sign_message(pki.load_private_key(folder / "sites" / "site-a.key"), message)
    assert pki.verify_message_signature(site_a, message, signature)
    site_a.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
    assert not pki.verify_message_signature(site_a, message + b" ", signature)
    assert not pki.verify_message_signature(cert(folder / "sites" / "site-b.pem"), message, signature)
    for garbage in (b"", os.urandom(72), "not bytes"):
        assert not pki.verify_message_signature(site_a, message, garbage)
    assert not pki.verify_message_signature(site_a, message.decode(), signature)
