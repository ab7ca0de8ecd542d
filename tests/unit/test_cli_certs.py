import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli.certs import certs_app

runner = CliRunner()


def certs(*args: str):
    return runner.invoke(certs_app, list(args))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "certs"
    assert certs("init", "--consortium", "Genomics EU", "--dir", str(root)).exit_code == 0
    return root


def test_init_writes_the_ca_and_reminds_about_keys(tmp_path):
    root = tmp_path / "certs"
    result = certs("init", "--consortium", "Genomics EU", "--dir", str(root), "--days", "400")
    assert result.exit_code == 0, result.output
    for name in ("ca.pem", "ca.key", "crl.pem", "index.json"):
        assert (root / name).is_file()
        assert str(root / name) in result.output
    assert "never be committed" in result.output
    ca = pki.load_certificate(root / "ca.pem")
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days == 400


def test_default_folder_is_certs_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert certs("init", "--consortium", "c").exit_code == 0
    assert certs("issue", "site", "site-a").exit_code == 0
    assert (tmp_path / "certs" / "ca.pem").is_file() and (tmp_path / "certs" / "sites" / "site-a.key").is_file()


def test_init_refuses_to_overwrite_without_force(folder):
    before = (folder / "ca.key").read_bytes()
    result = certs("init", "--consortium", "Genomics EU", "--dir", str(folder))
    assert result.exit_code == 2
    assert "error:" in result.stderr and str(folder / "ca.pem") in result.stderr and "--force" in result.stderr
    assert (folder / "ca.key").read_bytes() == before
    assert certs("init", "--consortium", "Genomics EU", "--dir", str(folder), "--force").exit_code == 0
    assert (folder / "ca.key").read_bytes() != before


def test_issue_aggregator_takes_comma_separated_and_repeated_hosts(folder):
    result = certs(
        "issue",
        "aggregator",
        "--host",
        "agg.example.org, 10.0.0.5",
        "--host",
        "::1",
        "--dir",
        str(folder),
        "--days",
        "30",
    )
    assert result.exit_code == 0, result.output
    assert str(folder / "aggregator.pem") in result.output and str(folder / "aggregator.key") in result.output
    assert "never be committed" in result.output
    aggregator = pki.load_certificate(folder / "aggregator.pem")
    names = aggregator.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["agg.example.org"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert (aggregator.not_valid_after_utc - aggregator.not_valid_before_utc).days == 30


def test_issue_aggregator_rejects_a_bad_host(folder):
    result = certs("issue", "aggregator", "--host", "agg example.org", "--dir", str(folder))
    assert result.exit_code == 2 and "contains spaces" in result.stderr


def test_issue_site_and_rotate_it(folder):
    result = certs("issue", "site", "site-a", "--dir", str(folder))
    assert result.exit_code == 0, result.output
    assert str(folder / "sites" / "site-a.key") in result.output and "own secure channel" in result.output
    old = pki.load_certificate(folder / "sites" / "site-a.pem")

    refused = certs("issue", "site", "site-a", "--dir", str(folder))
    assert refused.exit_code == 2 and "--force" in refused.stderr and "site-a.pem" in refused.stderr
    assert pki.load_certificate(folder / "sites" / "site-a.pem") == old

    rotated = certs("issue", "site", "site-a", "--dir", str(folder), "--force")
    assert rotated.exit_code == 0 and "revoked" in rotated.output
    assert pki.is_revoked(old, pki.load_crl(folder / "crl.pem"))


def test_issue_before_init_is_a_clear_error(tmp_path):
    result = certs("issue", "site", "site-a", "--dir", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "fedgen certs init" in result.stderr


def test_invalid_site_id_is_an_error(folder):
    result = certs("issue", "site", "../etc", "--dir", str(folder))
    assert result.exit_code == 2 and "site id '../etc' is not valid" in result.stderr


def test_revoke_and_its_errors(folder):
    for site in ("site-a", "site-b"):
        assert certs("issue", "site", site, "--dir", str(folder)).exit_code == 0
    result = certs("revoke", "site-a", "--reason", "key-compromise", "--dir", str(folder))
    assert result.exit_code == 0, result.output
    assert "key_compromise" in result.output and str(folder / "crl.pem") in result.output
    crl = pki.load_crl(folder / "crl.pem")
    assert pki.is_revoked(pki.load_certificate(folder / "sites" / "site-a.pem"), crl)
    assert not pki.is_revoked(pki.load_certificate(folder / "sites" / "site-b.pem"), crl)

    again = certs("revoke", "site-a", "--dir", str(folder))
    assert again.exit_code == 2 and "already revoked" in again.stderr
    unknown = certs("revoke", "site-z", "--dir", str(folder))
    assert unknown.exit_code == 2 and "known sites: site-a, site-b" in unknown.stderr
    assert certs("revoke", "site-b", "--reason", "bored", "--dir", str(folder)).exit_code == 2


def test_issue_list_rotate_and_revoke_the_lineage_signer(folder):
    issued = certs("issue", "aggregator", "--host", "localhost", "--dir", str(folder))
    assert "fedgen certs issue lineage" in issued.stdout  # the TLS certificate does not sign the ledger
    result = certs("issue", "lineage", "--dir", str(folder))
    assert result.exit_code == 0, result.output
    output = " ".join(result.stdout.split())
    assert str(folder / "lineage.pem") in output and str(folder / "lineage.key") in output and "[lineage]" in output
    pki.check_lineage_signer(pki.load_certificate(folder / "lineage.pem"))
    again = certs("issue", "lineage", "--dir", str(folder))
    assert again.exit_code == 2 and "already exists; use --force" in again.stderr
    old = pki.load_certificate(folder / "lineage.pem")
    rotated = certs("issue", "lineage", "--dir", str(folder), "--force")
    assert rotated.exit_code == 0 and "--cert OLD --cert NEW" in " ".join(rotated.stdout.split())
    listed = json.loads(certs("list", "--dir", str(folder), "--json").stdout)
    assert [(c["kind"], c["revoked"], c["reason"]) for c in listed if c["kind"] == "lineage"] == [
        ("lineage", True, "superseded"),
        ("lineage", False, None),
    ]
    assert listed[2]["serial"] == f"{old.serial_number:x}"

    revoked = certs("revoke", "--lineage", "--reason", "key-compromise", "--dir", str(folder))
    assert revoked.exit_code == 0, revoked.output
    assert "Revoked the lineage-signing certificate" in revoked.stdout
    assert pki.is_revoked(pki.load_certificate(folder / "lineage.pem"), pki.load_crl(folder / "crl.pem"))
    for wrong in (["revoke"], ["revoke", "site-a", "--lineage"]):
        refused = certs(*wrong, "--dir", str(folder))
        assert refused.exit_code == 2 and "or pass --lineage" in refused.stderr


def test_list_as_json_and_as_a_table(folder):
    certs("issue", "aggregator", "--host", "localhost", "--dir", str(folder))
    certs("issue", "site", "site-a", "--dir", str(folder))
    certs("issue", "site", "site-b", "--dir", str(folder))
    certs("revoke", "site-b", "--reason", "cessation-of-operation", "--dir", str(folder))

    result = certs("list", "--dir", str(folder), "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [(c["kind"], c["subject"], c["revoked"]) for c in listed] == [
        ("ca", "Genomics EU consortium CA", False),
        ("aggregator", "localhost", False),
        ("site", "site-a", False),
        ("site", "site-b", True),
    ]
    assert listed[3]["reason"] == "cessation_of_operation" and listed[3]["revoked_at"]
    assert all(len(c["fingerprint"]) == 64 and c["problem"] is None for c in listed)

    table = runner.invoke(certs_app, ["list", "--dir", str(folder)], env={"COLUMNS": "120"})
    assert table.exit_code == 0
    for text in ("site-a", "site-b", "localhost", "cessation-of-operation", listed[2]["serial"][:12]):
        assert text in table.stdout
    assert "warning" not in table.output


def test_list_warns_about_files_that_disagree(folder):
    certs("issue", "site", "site-a", "--dir", str(folder))
    certs("issue", "site", "site-b", "--dir", str(folder))
    (folder / "sites" / "site-b.pem").write_bytes((folder / "sites" / "site-a.pem").read_bytes())
    result = certs("list", "--dir", str(folder))
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "site-b.pem is not the certificate" in result.stderr


def test_refresh_crl(folder):
    before = pki.load_crl(folder / "crl.pem")
    result = certs("refresh-crl", "--dir", str(folder), "--days", "7")
    assert result.exit_code == 0, result.output
    after = pki.load_crl(folder / "crl.pem")
    assert after.next_update_utc - after.last_update_utc < before.next_update_utc - before.last_update_utc
