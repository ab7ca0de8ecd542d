"""Refusals are visible: the aggregator logs each with its cause and the peer's address,
and a refused site stops with the reason instead of retrying forever (real processes)."""

import subprocess
import sys
import time
from base64 import b64encode
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from fedgen import pki
from fedgen.cli.demo import loopback_aggregator
from fedgen.client.supernode import client_ssl_context
from fedgen.config import (
    SiteConfig,
    SiteTLSConfig,
    write_toml,
)
from fedgen.processes import ProcessGroup, free_port, wait_for_port
from fedgen.server.fleet_registry import FleetRegistry
from fedgen.server.superlink import NODE_PUBLIC_KEY_HEADER, public_key_pem
from fedgen.state_files import FLEET_REGISTRY_FILE

pytestmark = pytest.mark.slow
FEDGEN = [sys.executable, "-m", "fedgen.cli"]
NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """An aggregator whose CRL is past its next update (it lists site-r), and certificates
    good, revoked, expired and of another consortium."""
    root = tmp_path_factory.mktemp("refusals")
    certs = root / "certs"
    pki.init_consortium(certs, "test", now=NOW - timedelta(days=40))
    pki.issue_aggregator(certs, ["127.0.0.1", "localhost"])
    pki.issue_lineage(certs)
    pki.issue_site(certs, "site-a")
    pki.issue_site(certs, "site-b")
    pki.issue_site(certs, "site-r", now=NOW - timedelta(days=38))
    pki.revoke_site(certs, "site-r", "key-compromise", now=NOW - timedelta(days=35))  # CRL lapsed 5 days ago
    pki.issue_site(certs, "site-old", days=1, now=NOW - timedelta(days=39))
    foreign = root / "foreign"
    pki.init_consortium(foreign, "other")
    pki.issue_site(foreign, "site-a")
    files = pki.layout(certs)
    config = loopback_aggregator(files, root / "state")
    toml = root / "aggregator.toml"
    write_toml(config, toml)
    (root / "logs").mkdir()
    group = ProcessGroup(root / "logs")
    process, log = group.start("aggregator", [*FEDGEN, "aggregator", "start", "--config", str(toml)])
    try:
        wait_for_port(config.fleet_port, process, log)
        yield {
            "root": root,
            "certs": certs,
            "foreign": foreign,
            "config": config,
            "log": log,
            "group": group,
            "process": process,
        }
    finally:
        group.stop()


def _context(folder: Path, site: str | None, ca: Path):
    if site is None:
        import ssl

        return ssl.create_default_context(cafile=str(ca))
    files = pki.layout(folder)
    return client_ssl_context(
        SiteTLSConfig(certificate=files.site_cert(site), private_key=files.site_key(site), ca_certificate=ca)
    )


def _post(consortium, context, key_of: str | None = None) -> httpx.Response:
    headers = {}
    if key_of is not None:
        cert = pki.load_certificate(pki.layout(consortium["certs"]).site_cert(key_of))
        headers[NODE_PUBLIC_KEY_HEADER.decode()] = b64encode(public_key_pem(cert)).decode()
    with httpx.Client(verify=context, timeout=10) as client:
        return client.post(
            f"https://127.0.0.1:{consortium['config'].fleet_port}/v1/fleet/pull-messages", content=b"", headers=headers
        )


def _wait_for_lines(log: Path, wanted: list[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if all(line in text for line in wanted) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_an_overdue_crl_is_warned_about_and_still_enforced(consortium):
    text = _wait_for_lines(consortium["log"], ["past its next update"])
    assert "past its next update" in text and "refresh-crl" in text
    ca = pki.layout(consortium["certs"]).ca_cert
    accepted = _post(consortium, _context(consortium["certs"], "site-a", ca), key_of="site-a")
    assert accepted.status_code != 401  # valid sites still get in: a stale CRL is no outage
    refused = _post(consortium, _context(consortium["certs"], "site-r", ca), key_of="site-r")
    assert refused.status_code == 401 and b"revoked" in refused.content


def test_every_refusal_is_logged_with_its_cause_and_the_peer_address(consortium):
    ca = pki.layout(consortium["certs"]).ca_cert
    for _ in range(3):  # repeated: logged once a minute per peer and cause
        with pytest.raises(httpx.TransportError, match="certificate expired"):
            _post(consortium, _context(consortium["certs"], "site-old", ca), key_of="site-old")
    with pytest.raises(httpx.TransportError, match="certificate required"):
        _post(consortium, _context(consortium["certs"], None, ca))
    with pytest.raises(httpx.TransportError, match="unknown ca"):
        _post(consortium, _context(consortium["foreign"], "site-a", ca), key_of="site-a")
    mismatch = _post(consortium, _context(consortium["certs"], "site-b", ca), key_of="site-a")
    assert mismatch.status_code == 401 and b"identity mismatch" in mismatch.content
    wanted = [
        "Fleet API refused 127.0.0.1: expired: certificate has expired",
        "Fleet API refused 127.0.0.1: no certificate",
        "Fleet API refused 127.0.0.1: unknown CA: unable to get local issuer certificate",
        "Fleet API refused 127.0.0.1 (site site-r): revoked: certificate serial",
        "Fleet API refused 127.0.0.1 (site site-b): identity mismatch",
    ]
    text = _wait_for_lines(consortium["log"], wanted)
    for line in wanted:
        assert line in text, line
    assert text.count("Fleet API refused 127.0.0.1: expired") == 1
    registry = FleetRegistry(consortium["config"].state_dir / FLEET_REGISTRY_FILE)
    causes = {(r.site, r.cause) for r in registry.refusals_since(NOW - timedelta(hours=1))}
    assert {
        (None, "expired"),
        (None, "no certificate"),
        (None, "unknown CA"),
        ("site-r", "revoked"),
        ("site-b", "identity mismatch"),
    } <= causes
    assert consortium["process"].poll() is None


def _site_toml(consortium, name: str, folder: Path, ca: Path, site_id: str = "site-a") -> Path:
    files = pki.layout(folder)
    root = consortium["root"] / name
    root.mkdir()
    (root / "data.csv").write_text("sequence,label\nACGTACGT,0\nTTGACCAA,1\n")
    config = SiteConfig(
        site_id=site_id,
        data=root / "data.csv",
        state_dir=root / "state",
        device="cpu",
        aggregator=f"127.0.0.1:{consortium['config'].fleet_port}",
        runtime_port=free_port(),
        tls=SiteTLSConfig(certificate=files.site_cert(site_id), private_key=files.site_key(site_id), ca_certificate=ca),
    )
    path = root / "site.toml"
    write_toml(config, path)
    return path


def _run_site(consortium, toml: Path, timeout: float = 90) -> tuple[int, str, float]:
    started = time.monotonic()
    process, log = consortium["group"].start(toml.parent.name, [*FEDGEN, "site", "start", "--config", str(toml)])
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the refused site still runs after {timeout} s (retrying silently?): {log.read_text()[-2000:]}")
    return code, log.read_text(errors="replace"), time.monotonic() - started


def test_a_revoked_site_stops_non_zero_saying_why(consortium):
    ca = pki.layout(consortium["certs"]).ca_cert
    code, output, seconds = _run_site(
        consortium, _site_toml(consortium, "revoked-site", consortium["certs"], ca, site_id="site-r")
    )
    assert code == 1, output[-2000:]
    assert "error: the aggregator refused this site: certificate revoked" in output
    print(f"revoked site stopped after {seconds:.1f} s")


def test_a_site_that_cannot_verify_the_aggregator_stops_non_zero_saying_why(consortium):
    # Its own certificate and CA are consistent (pre-flight passes) but belong to another
    # consortium: the aggregator's certificate does not verify against that CA.
    foreign_ca = pki.layout(consortium["foreign"]).ca_cert
    code, output, seconds = _run_site(
        consortium, _site_toml(consortium, "foreign-site", consortium["foreign"], foreign_ca)
    )
    assert code == 1, output[-2000:]
    assert "error: the aggregator's certificate failed verification" in output
    wanted = "Fleet API refused 127.0.0.1: the site refused the aggregator's certificate: unknown ca"
    assert wanted in _wait_for_lines(consortium["log"], [wanted])  # the aggregator's side of it
    print(f"site stopped after {seconds:.1f} s")
