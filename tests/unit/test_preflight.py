"""Certificate checks a site and the aggregator make before they connect or listen."""

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli import app
from fedgen.client.supernode import check_site
from fedgen.config import (
    AggregatorConfig,
    AggregatorTLSConfig,
    ConfigError,
    LineageSigningConfig,
    SiteConfig,
    SiteTLSConfig,
    load_toml,
    write_toml,
)
from fedgen.pki import PKIError
from fedgen.server.aggregator import check_aggregator, crl_warning

NOW = datetime.now(timezone.utc)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    pki.init_consortium(folder, "test", now=NOW - timedelta(days=60))  # room to backdate certificates
    pki.refresh_crl(folder)
    pki.issue_aggregator(folder, ["127.0.0.1"])
    pki.issue_lineage(folder)
    pki.issue_site(folder, "site-a")
    return folder


def _site(folder: Path, site: str = "site-a") -> tuple[Path, Path, Path]:
    files = pki.layout(folder)
    return files.site_cert(site), files.site_key(site), files.ca_cert


def _leaf(folder: Path, name: str, extensions: list[x509.ExtensionType]) -> tuple[Path, Path]:
    """A certificate signed by the consortium CA with exactly ``extensions`` (odd ones on purpose)."""
    files = pki.layout(folder)
    ca_cert, ca_key = pki.check_key_pair(files.ca_cert, files.ca_key)
    key = pki.load_private_key(files.site_key("site-a"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site-a")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    cert_path = folder / f"{name}.pem"
    cert_path.write_bytes(pki._pem(builder.sign(ca_key, hashes.SHA256())))
    return cert_path, files.site_key("site-a")


def test_a_good_site_certificate_passes(certs):
    cert = pki.check_tls_identity(*_site(certs), "client")
    assert pki.site_id_of(cert) == "site-a"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_key_readable_by_others_is_refused_with_the_fix(certs, mode):
    cert, key, ca = _site(certs)
    key.chmod(mode)
    with pytest.raises(PKIError, match=rf"mode 0{mode:o}.*chmod 600 {key}"):
        pki.check_tls_identity(cert, key, ca, "client")


def test_a_certificate_of_another_consortium_names_both_files(certs, tmp_path):
    other = tmp_path / "other"
    pki.init_consortium(other, "other")
    pki.issue_site(other, "site-a")
    cert, key, _ = _site(other)
    with pytest.raises(PKIError, match=rf"{cert}: .*wrong issuer.*\(CA {pki.layout(certs).ca_cert}\)"):
        pki.check_tls_identity(cert, key, pki.layout(certs).ca_cert, "client")


def test_a_same_named_impostor_ca_is_caught_by_the_signature(certs, tmp_path):
    impostor = tmp_path / "impostor"
    pki.init_consortium(impostor, "test")  # same name, different key
    pki.issue_site(impostor, "site-a")
    cert, key, _ = _site(impostor)
    with pytest.raises(PKIError, match="bad signature"):
        pki.check_tls_identity(cert, key, pki.layout(certs).ca_cert, "client")


def test_an_expired_or_not_yet_valid_certificate_is_refused(certs):
    pki.issue_site(certs, "site-old", days=1, now=NOW - timedelta(days=10))
    with pytest.raises(PKIError, match="expired on"):
        pki.check_tls_identity(*_site(certs, "site-old"), "client")
    with pytest.raises(PKIError, match="not yet valid"):
        pki.check_tls_identity(*_site(certs), "client", at=NOW - timedelta(days=1))


def test_an_expired_ca_is_refused(certs):
    with pytest.raises(PKIError, match="consortium CA is valid only"):
        pki.check_tls_identity(*_site(certs), "client", at=NOW + timedelta(days=365 * 6))


def test_the_purpose_must_match_the_role(certs):
    files = pki.layout(certs)
    with pytest.raises(PKIError, match="not a TLS client certificate.*clientAuth"):
        pki.check_tls_identity(files.aggregator_cert, files.aggregator_key, files.ca_cert, "client")
    with pytest.raises(PKIError, match="not a TLS server certificate.*serverAuth"):
        pki.check_tls_identity(*_site(certs), "server")


def test_key_usage_must_allow_signatures_and_extended_key_usage_must_exist(certs):
    no_eku, key = _leaf(certs, "no-eku", [])
    with pytest.raises(PKIError, match="no extended key usage"):
        pki.check_tls_identity(no_eku, key, pki.layout(certs).ca_cert, "client")
    no_signing, key = _leaf(
        certs,
        "no-signing",
        [
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
        ],
    )
    with pytest.raises(PKIError, match="does not allow digital signatures"):
        pki.check_tls_identity(no_signing, key, pki.layout(certs).ca_cert, "client")


def test_crl_signature_and_next_update(certs, tmp_path):
    files = pki.layout(certs)
    crl, ca = pki.load_crl(files.crl), pki.load_certificate(files.ca_cert)
    pki.check_crl_signature(crl, ca)
    assert not pki.crl_is_overdue(crl)
    assert pki.crl_is_overdue(crl, at=NOW + timedelta(days=pki.CRL_DAYS + 1))
    other = tmp_path / "other"
    pki.init_consortium(other, "other")
    with pytest.raises(PKIError, match="not signed by this consortium's CA"):
        pki.check_crl_signature(pki.load_crl(pki.layout(other).crl), ca)


# ---------------------------------------------------------------------------- site start


def _site_toml(tmp_path: Path, certs: Path, site: str = "site-a") -> Path:
    cert, key, ca = _site(certs, site)
    (tmp_path / "data.csv").write_text("sequence,label\nACGT,0\n")
    config = SiteConfig(
        site_id="site-a",
        data=tmp_path / "data.csv",
        state_dir=tmp_path / "state",
        aggregator="127.0.0.1:1",
        tls=SiteTLSConfig(certificate=cert, private_key=key, ca_certificate=ca),
    )
    path = tmp_path / "site.toml"
    write_toml(config, path)
    return path


def test_site_start_checks_its_certificate_before_connecting(certs, tmp_path):
    toml = _site_toml(tmp_path, certs)
    check_site(load_toml(toml, SiteConfig), str(toml))  # good as issued
    _, key, _ = _site(certs)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match=rf"{toml}: tls: .*chmod 600"):
        check_site(load_toml(toml, SiteConfig), str(toml))
    result = CliRunner().invoke(app, ["site", "start", "--config", str(toml)])
    assert result.exit_code == 2 and "chmod 600" in result.output  # nothing was started


def test_site_start_refuses_an_expired_certificate(certs, tmp_path):
    pki.issue_site(certs, "site-a", days=1, now=NOW - timedelta(days=10), force=True)
    toml = _site_toml(tmp_path, certs)
    result = CliRunner().invoke(app, ["site", "start", "--config", str(toml)])
    assert result.exit_code == 2 and "expired on" in result.output


# ---------------------------------------------------------------------------- aggregator start


def _aggregator(
    tmp_path: Path, certs: Path, cert: Path | None = None, key: Path | None = None, crl: Path | None = None
) -> AggregatorConfig:
    files = pki.layout(certs)
    return AggregatorConfig(
        state_dir=tmp_path / "state",
        tls=AggregatorTLSConfig(
            certificate=cert or files.aggregator_cert,
            private_key=key or files.aggregator_key,
            ca_certificate=files.ca_cert,
            crl=crl or files.crl,
        ),
        lineage=LineageSigningConfig(certificate=files.lineage_cert, private_key=files.lineage_key),
    )


def test_aggregator_start_refuses_a_certificate_without_server_auth(certs, tmp_path):
    check_aggregator(_aggregator(tmp_path, certs), "aggregator.toml")
    cert, key, _ = _site(certs)
    with pytest.raises(ConfigError, match="aggregator.toml: tls: .*not a TLS server certificate.*serverAuth"):
        check_aggregator(_aggregator(tmp_path, certs, cert, key), "aggregator.toml")


def test_aggregator_start_refuses_a_crl_of_another_ca(certs, tmp_path):
    other = tmp_path / "other"
    pki.init_consortium(other, "other")
    with pytest.raises(ConfigError, match="crl.pem: the CRL was not signed by this consortium's CA"):
        check_aggregator(_aggregator(tmp_path, certs, crl=pki.layout(other).crl), "aggregator.toml")


def test_aggregator_start_warns_about_an_overdue_crl_but_starts(tmp_path):
    certs = tmp_path / "certs"
    pki.init_consortium(certs, "test", now=NOW - timedelta(days=40))  # its CRL lapsed 10 days ago
    pki.issue_aggregator(certs, ["127.0.0.1"])
    pki.issue_lineage(certs)
    tls = check_aggregator(_aggregator(tmp_path, certs), "aggregator.toml")
    assert "past its next update" in crl_warning(tls) and "refresh-crl" in crl_warning(tls)
    pki.refresh_crl(certs)
    assert crl_warning(tls) is None
