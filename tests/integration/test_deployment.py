"""The aggregator as a real process on loopback: mutual TLS and identity binding at its door."""

import datetime
import socket
import ssl
import threading
from base64 import b64encode
from pathlib import Path

import httpx
import pytest

from fedgen import pki
from fedgen.cli.demo import loopback_aggregator
from fedgen.client.supernode import client_ssl_context
from fedgen.config import (
    RunConfig,
    SiteTLSConfig,
    load_toml,
    to_toml,
)
from fedgen.processes import ProcessGroup, wait_for_port
from fedgen.server.coordinator import RunFailed, follow, submit
from fedgen.server.superlink import NODE_PUBLIC_KEY_HEADER, public_key_pem

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """A consortium with good, revoked and expired site certificates, and its aggregator running."""
    root = tmp_path_factory.mktemp("consortium")
    certs = root / "certs"
    last_month = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    pki.init_consortium(certs, "test", now=last_month)
    pki.issue_aggregator(certs, ["127.0.0.1", "localhost"])
    pki.issue_lineage(certs)
    for site in ("site-a", "site-b", "site-r"):
        pki.issue_site(certs, site)
    pki.revoke_site(certs, "site-r", reason="key-compromise")
    pki.issue_site(certs, "site-old", days=1, now=last_month)
    foreign = root / "foreign"
    pki.init_consortium(foreign, "other")
    pki.issue_site(foreign, "site-a")

    layout = pki.layout(certs)
    config = loopback_aggregator(layout, root / "state")
    toml = root / "aggregator.toml"
    toml.write_text(to_toml(config, toml))
    (root / "logs").mkdir()
    group = ProcessGroup(root / "logs")
    process, log = group.start("aggregator", ["fedgen", "aggregator", "start", "--config", str(toml)])
    try:
        wait_for_port(config.fleet_port, process, log)
        wait_for_port(config.control_port, process, log)
        yield {"certs": certs, "foreign": foreign, "config": config, "toml": toml, "process": process, "log": log}
    finally:
        group.stop()
    assert process.returncode == 0  # SIGTERM is a clean shutdown, not a kill


def _site_tls(folder: Path, site: str, ca: Path) -> SiteTLSConfig:
    layout = pki.layout(folder)
    return SiteTLSConfig(certificate=layout.site_cert(site), private_key=layout.site_key(site), ca_certificate=ca)


def _fleet_post(
    consortium, context: ssl.SSLContext, path: str = "/v1/fleet/activate-node", headers: dict | None = None
) -> httpx.Response:
    port = consortium["config"].fleet_port
    with httpx.Client(verify=context, timeout=10) as client:
        return client.post(f"https://127.0.0.1:{port}{path}", content=b"", headers=headers or {})


def _node_key_header(folder: Path, site: str) -> dict:
    cert = pki.load_certificate(pki.layout(folder).site_cert(site))
    return {NODE_PUBLIC_KEY_HEADER.decode(): b64encode(public_key_pem(cert)).decode()}


def _ca(consortium) -> Path:
    return pki.layout(consortium["certs"]).ca_cert


def test_a_valid_site_passes_the_door_with_its_own_node_key(consortium):
    context = client_ssl_context(_site_tls(consortium["certs"], "site-a", _ca(consortium)))
    response = _fleet_post(consortium, context, headers=_node_key_header(consortium["certs"], "site-a"))
    # Past fedgen's gate Flower itself answers (the empty body is not a valid request).
    assert response.status_code != 404 and b"node key" not in response.content


def test_site_a_certificate_cannot_act_as_site_b(consortium):
    context = client_ssl_context(_site_tls(consortium["certs"], "site-a", _ca(consortium)))
    response = _fleet_post(consortium, context, headers=_node_key_header(consortium["certs"], "site-b"))
    assert response.status_code == 401  # 401: a Flower SuperNode shuts down on it, not retries
    assert b"does not belong to the client certificate" in response.content
    assert _fleet_post(consortium, context).status_code == 401  # no node key at all


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired"])
def test_handshake_refuses_bad_client_certificates(consortium, who):
    ca = _ca(consortium)
    if who == "no certificate":
        context = ssl.create_default_context(cafile=str(ca))
    elif who == "another CA":
        context = client_ssl_context(_site_tls(consortium["foreign"], "site-a", ca))
    else:
        context = client_ssl_context(_site_tls(consortium["certs"], "site-old", ca))
    with pytest.raises(httpx.TransportError):
        _fleet_post(consortium, context, headers=_node_key_header(consortium["certs"], "site-a"))
    assert consortium["process"].poll() is None  # the aggregator shrugs it off


def test_a_revoked_site_gets_401_on_every_request(consortium):
    # Revocation is checked per request against the CRL in force (re-read when it changes).
    context = client_ssl_context(_site_tls(consortium["certs"], "site-r", _ca(consortium)))
    response = _fleet_post(consortium, context, headers=_node_key_header(consortium["certs"], "site-r"))
    assert response.status_code == 401 and b"revoked" in response.content


@pytest.mark.parametrize(
    "path", ["/v1/control/list-runs", "/v1/control/start-run", "/docs", "/openapi.json", "/health"]
)
def test_control_api_is_not_served_on_the_public_listener(consortium, path):
    context = client_ssl_context(_site_tls(consortium["certs"], "site-a", _ca(consortium)))
    headers = _node_key_header(consortium["certs"], "site-a")
    assert _fleet_post(consortium, context, path, headers).status_code == 404


def _listening_addresses(port: int) -> set[str]:
    """Addresses with a TCP socket listening on ``port``, read from the kernel's table."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(
                    socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8 else address
                )
    return found


def test_control_api_listens_on_loopback_only(consortium):
    config = consortium["config"]
    assert _listening_addresses(config.control_port) == {"127.0.0.1"}
    assert _listening_addresses(config.fleet_port) == {config.fleet_host}


def test_site_refuses_an_aggregator_certificate_for_another_host(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    pki.init_consortium(elsewhere, "test")
    pki.issue_aggregator(elsewhere, ["aggregator.example.org"])
    layout = pki.layout(elsewhere)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(layout.aggregator_cert), str(layout.aggregator_key))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_one() -> None:
        connection, _ = listener.accept()
        try:
            with server.wrap_socket(connection, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=accept_one)
    thread.start()
    pki.issue_site(elsewhere, "site-a")
    context = client_ssl_context(_site_tls(elsewhere, "site-a", layout.ca_cert))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                context.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_fedgen_run_exits_non_zero_when_the_run_fails(consortium, tmp_path):
    eval_data = tmp_path / "held-out.csv"
    eval_data.write_text("sequence,label\nACGTACGT,0\nTTGACCAA,1\n")
    run = tmp_path / "run.toml"
    run.write_text(
        to_toml(
            RunConfig(aggregator=consortium["toml"], sites=1, labels=["0", "1"], max_length=8, eval_data=eval_data), run
        )
    )
    submitted = submit(load_toml(run, RunConfig), str(run))
    eval_data.unlink()  # the ServerApp can no longer load its held-out set: the run fails
    with pytest.raises(RunFailed, match=r"run \d+ failed: .*held-out\.csv"):  # the ServerApp's reason
        follow(submitted, poll_seconds=0.5)
    assert consortium["process"].poll() is None
