"""Launchers check their configuration and files before any process starts."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedgen import pki
from fedgen.cli import app
from fedgen.config import (
    AggregatorConfig,
    AggregatorTLSConfig,
    LineageSigningConfig,
    SiteConfig,
    SiteTLSConfig,
    to_toml,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    pki.init_consortium(folder, "t")
    pki.issue_aggregator(folder, ["127.0.0.1"])
    pki.issue_lineage(folder)
    pki.issue_site(folder, "site-a")
    pki.issue_site(folder, "site-b")
    return folder


def _site(tmp_path: Path, certs: Path, **tls_overrides) -> Path:
    layout = pki.layout(certs)
    (tmp_path / "data.csv").write_text("sequence,label\nACGT,0\n")
    tls = {
        "certificate": layout.site_cert("site-a"),
        "private_key": layout.site_key("site-a"),
        "ca_certificate": layout.ca_cert,
        **tls_overrides,
    }
    site = SiteConfig(
        site_id="site-a",
        data=tmp_path / "data.csv",
        state_dir=tmp_path / "state",
        aggregator="127.0.0.1:9092",
        tls=SiteTLSConfig(**tls),
    )
    path = tmp_path / "site.toml"
    path.write_text(to_toml(site, path))
    return path


def test_site_certificate_that_does_not_match_its_key(tmp_path, certs):
    path = _site(tmp_path, certs, private_key=pki.layout(certs).site_key("site-b"))
    result = runner.invoke(app, ["site", "start", "--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}: tls:" in result.output and "does not match its key" in result.output


def test_site_id_must_be_the_certificates(tmp_path, certs):
    layout = pki.layout(certs)
    path = _site(tmp_path, certs, certificate=layout.site_cert("site-b"), private_key=layout.site_key("site-b"))
    result = runner.invoke(app, ["site", "start", "--config", str(path)])
    assert result.exit_code == 2 and "differs from the certificate's 'site-b'" in result.output


def test_site_without_tls_or_with_a_missing_file(tmp_path, certs):
    path = _site(tmp_path, certs, ca_certificate=tmp_path / "nope.pem")
    result = runner.invoke(app, ["site", "start", "--config", str(path)])
    assert result.exit_code == 2 and "tls.ca_certificate: file" in result.output and "nope.pem" in result.output
    plain = tmp_path / "plain.toml"
    plain.write_text('site_id = "site-a"\ndata = "data.csv"\nstate_dir = "state"\naggregator = "h:1"\n')
    result = runner.invoke(app, ["site", "start", "--config", str(plain)])
    assert result.exit_code == 2 and "tls: missing" in result.output


def test_aggregator_with_a_mismatched_key_or_shared_ports(tmp_path, certs):
    layout = pki.layout(certs)
    tls = AggregatorTLSConfig(
        certificate=layout.aggregator_cert,
        private_key=layout.site_key("site-a"),
        ca_certificate=layout.ca_cert,
        crl=layout.crl,
    )
    lineage = LineageSigningConfig(certificate=layout.lineage_cert, private_key=layout.lineage_key)
    path = tmp_path / "aggregator.toml"
    path.write_text(to_toml(AggregatorConfig(state_dir=tmp_path / "state", tls=tls, lineage=lineage), path))
    result = runner.invoke(app, ["aggregator", "start", "--config", str(path)])
    assert result.exit_code == 2 and "does not match its key" in result.output
    assert not (tmp_path / "state").exists()  # nothing started, nothing written
    good = tls.model_copy(update={"private_key": layout.aggregator_key})
    path.write_text(
        to_toml(
            AggregatorConfig(
                state_dir=tmp_path / "state", tls=good, fleet_port=9000, control_port=9000, lineage=lineage
            ),
            path,
        )
    )
    result = runner.invoke(app, ["aggregator", "start", "--config", str(path)])
    assert result.exit_code == 2 and "control_port must differ" in result.output


def test_aggregator_whose_lineage_signer_is_its_tls_certificate_is_refused(tmp_path, certs):
    layout = pki.layout(certs)
    tls = AggregatorTLSConfig(
        certificate=layout.aggregator_cert,
        private_key=layout.aggregator_key,
        ca_certificate=layout.ca_cert,
        crl=layout.crl,
    )
    path = tmp_path / "aggregator.toml"
    path.write_text(
        to_toml(
            AggregatorConfig(
                state_dir=tmp_path / "state",
                tls=tls,
                lineage=LineageSigningConfig(certificate=layout.aggregator_cert, private_key=layout.aggregator_key),
            ),
            path,
        )
    )
    result = runner.invoke(app, ["aggregator", "start", "--config", str(path)])
    assert result.exit_code == 2 and f"{path}: lineage:" in result.output
    assert "not a lineage-signing certificate" in " ".join(result.output.split())
    assert not (tmp_path / "state").exists()


def test_site_budget_reports_the_ledger(tmp_path, certs):
    from fedgen.client.ledger import PrivacyLedger

    path = _site(tmp_path, certs)
    PrivacyLedger.open(tmp_path / "state", accountant="rdp", delta=1e-5).commit(
        [(1.0, 0.01, 1000)], run_id=7, server_round=1, steps=1000, noise_multiplier=1.0, sample_rate=0.01
    )
    result = runner.invoke(app, ["site", "budget", "--config", str(path), "--json"])
    assert result.exit_code == 0
    budget = json.loads(result.output)
    assert budget["epsilon_spent"] == pytest.approx(2.10137, abs=1e-4) and budget["epsilon_ceiling"] == 8.0
    assert budget["rounds"][0]["run_id"] == 7
