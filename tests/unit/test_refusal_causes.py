"""Why a TLS handshake or a Fleet request was refused, on both sides, from real handshakes.

The handshakes run in memory (``ssl.MemoryBIO``) with the consortium's real certificates
and the aggregator's real server context, so the OpenSSL errors classified here are the
ones a live connection produces.
"""

import logging
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from fedgen import pki
from fedgen.client.refusals import refusal_cause
from fedgen.client.supernode import StopReason, as_retryable, client_ssl_context
from fedgen.config import AggregatorTLSConfig, SiteTLSConfig
from fedgen.server import door
from fedgen.server.door import RefusalLog, RevocationList, door_ssl_context, handshake_cause
from fedgen.server.fleet_registry import FleetRegistry, Refusal

NOW = datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    folder = root / "certs"
    pki.init_consortium(folder, "test", now=NOW - timedelta(days=60))
    pki.issue_aggregator(folder, ["127.0.0.1"])
    pki.issue_site(folder, "site-a")
    pki.issue_site(folder, "site-old", days=1, now=NOW - timedelta(days=10))
    pki.issue_site(folder, "site-future", now=NOW + timedelta(days=1))
    pki.init_consortium(root / "other", "other")
    pki.issue_aggregator(root / "other", ["127.0.0.1"])
    pki.issue_site(root / "other", "site-a")
    return folder


def _server(certs: Path) -> ssl.SSLContext:
    files = pki.layout(certs)
    return door_ssl_context(
        AggregatorTLSConfig(
            certificate=files.aggregator_cert,
            private_key=files.aggregator_key,
            ca_certificate=files.ca_cert,
            crl=files.crl,
        )
    )


def _client(folder: Path, site: str | None, ca: Path, tls12: bool = False) -> ssl.SSLContext:
    if site is None:
        context = ssl.create_default_context(cafile=str(ca))
    else:
        files = pki.layout(folder)
        context = client_ssl_context(
            SiteTLSConfig(certificate=files.site_cert(site), private_key=files.site_key(site), ca_certificate=ca)
        )
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, hostname: str = "127.0.0.1"
) -> tuple[ssl.SSLError | None, ssl.SSLError | None]:
    """Run a handshake in memory; (server error, client error). With TLS 1.3 the client
    learns of a refusal only when it reads, as it does for its HTTP response."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    sides = {
        "client": client.wrap_bio(client_in, client_out, server_hostname=hostname),
        "server": server.wrap_bio(server_in, server_out, server_side=True),
    }
    errors: dict[str, ssl.SSLError] = {}
    finished: set[str] = set()
    for _ in range(6):
        for name, side in sides.items():
            if name in errors:
                continue
            try:
                if name in finished:
                    side.read(1)
                else:
                    side.do_handshake()
                    finished.add(name)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as exc:
                errors[name] = exc
            server_in.write(client_out.read())
            client_in.write(server_out.read())
    return errors.get("server"), errors.get("client")


def _ca(certs: Path) -> Path:
    return pki.layout(certs).ca_cert


def _other(certs: Path) -> Path:
    return certs.parent / "other"


def test_a_valid_site_is_accepted(certs):
    assert handshake(_server(certs), _client(certs, "site-a", _ca(certs))) == (None, None)


@pytest.mark.parametrize("tls12", [False, True], ids=["TLS1.3", "TLS1.2"])
def test_no_certificate(certs, tls12):
    server_error, client_error = handshake(_server(certs), _client(certs, None, _ca(certs), tls12))
    assert handshake_cause(server_error)[0] == door.NO_CERTIFICATE
    expected = "refused the TLS handshake (handshake failure)" if tls12 else "presented none"
    assert expected in refusal_cause(client_error)


@pytest.mark.parametrize("tls12", [False, True], ids=["TLS1.3", "TLS1.2"])
def test_a_certificate_of_another_consortium(certs, tls12):
    server_error, client_error = handshake(_server(certs), _client(_other(certs), "site-a", _ca(certs), tls12))
    assert handshake_cause(server_error) == (door.UNKNOWN_CA, "unable to get local issuer certificate")
    assert "not issued by the consortium CA the aggregator trusts" in refusal_cause(client_error)


def test_an_expired_certificate(certs):
    server_error, client_error = handshake(_server(certs), _client(certs, "site-old", _ca(certs)))
    assert handshake_cause(server_error) == (door.EXPIRED, "certificate has expired")
    assert "it has expired" in refusal_cause(client_error)


def test_a_certificate_not_yet_valid(certs):
    server_error, client_error = handshake(_server(certs), _client(certs, "site-future", _ca(certs)))
    assert handshake_cause(server_error) == (door.NOT_YET_VALID, "certificate is not yet valid")
    assert "refused the TLS handshake (bad certificate)" in refusal_cause(client_error)


def test_the_aggregator_certificate_used_as_a_client(certs):
    files = pki.layout(certs)
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    client.load_cert_chain(files.aggregator_cert, files.aggregator_key)
    server_error, client_error = handshake(_server(certs), client)
    assert handshake_cause(server_error)[0] == door.NOT_A_CLIENT_CERTIFICATE
    assert "refused the TLS handshake (unsupported certificate)" in refusal_cause(client_error)


def test_a_site_that_does_not_trust_the_aggregator(certs):
    # The site trusts another CA: it rejects the aggregator, which sees the site's alert.
    other_ca = pki.layout(_other(certs)).ca_cert
    server_error, client_error = handshake(_server(certs), _client(certs, "site-a", other_ca))
    assert handshake_cause(server_error) == (door.AGGREGATOR_CERTIFICATE_REFUSED, "unknown ca")
    assert isinstance(client_error, ssl.SSLCertVerificationError)
    assert refusal_cause(client_error).startswith("the aggregator's certificate failed verification: ")


def test_an_aggregator_certificate_for_another_host(certs):
    _, client_error = handshake(_server(certs), _client(certs, "site-a", _ca(certs)), hostname="example.org")
    assert "failed verification: Hostname mismatch" in refusal_cause(client_error)
    assert "`aggregator` (its host name)" in refusal_cause(client_error)


def test_a_client_that_does_not_speak_tls(certs):
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in.write(b"POST /v1/fleet/pull-messages HTTP/1.1\r\nhost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError) as caught:
        _server(certs).wrap_bio(server_in, server_out, server_side=True).do_handshake()
    assert handshake_cause(caught.value)[0] == door.NOT_TLS


def test_a_client_that_went_away_is_not_a_refusal():
    assert handshake_cause(ConnectionResetError("Connection lost")) is None
    assert handshake_cause(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")) is None


# ---------------------------------------------------------------------------- the site's view


def _wrapped(error: BaseException) -> httpx.TransportError:
    """How httpx hands a TLS error to Flower: a transport error caused by it."""
    request = httpx.Request("POST", "https://aggregator:9092/v1/fleet/pull-messages")
    try:
        try:
            raise error
        except ssl.SSLError as exc:
            raise httpx.ReadError(str(exc), request=request) from exc
    except httpx.ReadError as outer:
        return outer


def test_the_site_finds_the_tls_error_inside_httpx_errors(certs):
    _, client_error = handshake(_server(certs), _client(certs, "site-old", _ca(certs)))
    assert "it has expired" in refusal_cause(_wrapped(client_error))


def _status_error(status: int, body: str) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://aggregator:9092/v1/fleet/pull-messages")
    response = httpx.Response(status, text=body, request=request)
    return httpx.HTTPStatusError(f"{status}", request=request, response=response)


def test_a_401_is_a_refusal_with_the_aggregators_words():
    revoked = _status_error(401, "certificate revoked: the consortium revoked this site's certificate")
    assert refusal_cause(revoked) == (
        "the aggregator refused this site: certificate revoked: the consortium revoked this site's certificate"
    )
    flower = _status_error(401, '{"detail": "Invalid SuperNode authentication"}')
    assert refusal_cause(flower) == "the aggregator refused this site: Invalid SuperNode authentication"


def test_what_retrying_may_fix_is_not_a_refusal():
    assert refusal_cause(_status_error(503, "unavailable")) is None
    request = httpx.Request("POST", "https://aggregator:9092/v1/fleet/pull-messages")
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as exc:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request) from exc
    except httpx.ConnectError as refused:
        assert refusal_cause(refused) is None
    assert refusal_cause(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")) is None


def test_a_broken_tls_connection_that_is_no_refusal_stays_retryable():
    # The aggregator restarting cuts connections mid-TLS; Flower would give up on the word "SSL".
    cut = _wrapped(ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol"))
    assert refusal_cause(cut) is None
    retryable = as_retryable(cut)
    assert isinstance(retryable, httpx.ReadError) and retryable.__cause__ is cut
    assert not any(word in str(retryable).lower() for word in ("ssl", "tls", "certificate"))
    request = httpx.Request("POST", "https://aggregator:9092/v1/fleet/pull-messages")
    assert as_retryable(httpx.ConnectError("[Errno 111] Connection refused", request=request)) is None


def test_the_first_refusal_stops_the_site_once():
    stop = StopReason()
    stop.refused("first", interrupt=False)
    stop.refused("second", interrupt=False)
    assert stop.cause == "first"


def test_a_refusal_interrupts_the_supernode_like_flower_does():
    import signal

    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        stop = StopReason()
        stop.refused("the aggregator refused this site", interrupt=True)
        stop.refused("again", interrupt=True)  # a second refusal sends nothing more
    finally:
        signal.signal(signal.SIGINT, previous)
    assert received == [signal.SIGINT]


# ---------------------------------------------------------------------------- refusal log


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def door_log():
    handler = _Records()
    door.log.addHandler(handler)
    level = door.log.level
    door.log.setLevel(logging.DEBUG)
    yield handler.messages
    door.log.removeHandler(handler)
    door.log.setLevel(level)


def test_refusals_are_logged_with_cause_and_peer_at_most_once_a_minute(tmp_path, door_log):
    clock = [1000.0]
    registry = FleetRegistry(tmp_path / "fleet-registry.json")
    refusals = RefusalLog(registry, interval=60, clock=lambda: clock[0])
    assert refusals.refused("10.0.0.7", door.EXPIRED, detail="certificate has expired")
    assert not refusals.refused("10.0.0.7", door.EXPIRED, detail="certificate has expired")
    assert refusals.refused("10.0.0.7", door.REVOKED, site="site-b")  # another cause
    assert refusals.refused("10.0.0.8", door.EXPIRED)  # another peer
    clock[0] += 61
    assert refusals.refused("10.0.0.7", door.EXPIRED, detail="certificate has expired")
    assert door_log == [
        "Fleet API refused 10.0.0.7: expired: certificate has expired",
        "Fleet API refused 10.0.0.7 (site site-b): revoked",
        "Fleet API refused 10.0.0.8: expired",
        "Fleet API refused 10.0.0.7: expired: certificate has expired [1 more since the last report]",
    ]
    noted = FleetRegistry(registry.path).refusals_since(NOW - timedelta(minutes=1))
    assert [(r.peer, r.cause, r.site) for r in noted] == [
        ("10.0.0.7", door.EXPIRED, None),
        ("10.0.0.7", door.REVOKED, "site-b"),
        ("10.0.0.8", door.EXPIRED, None),
        ("10.0.0.7", door.EXPIRED, None),
    ]


# ---------------------------------------------------------------------------- CRL in force


@pytest.fixture
def consortium(tmp_path: Path) -> Path:
    folder = tmp_path / "certs"
    pki.init_consortium(folder, "test")
    pki.issue_site(folder, "site-a")
    pki.issue_site(folder, "site-b")
    return folder


def test_a_new_crl_applies_at_once_and_an_old_or_foreign_one_is_ignored(consortium, tmp_path, door_log):
    files = pki.layout(consortium)
    revocations = RevocationList(files.crl, pki.load_certificate(files.ca_cert))
    site_a = pki.load_certificate(files.site_cert("site-a"))
    old_crl = files.crl.read_bytes()
    assert not revocations.is_revoked(site_a)
    pki.revoke_site(consortium, "site-a")
    assert revocations.is_revoked(site_a)  # re-read because the file changed
    assert revocations.generation == 1  # what the aggregator's CRL watch acts on
    assert not revocations.refresh()  # unchanged file: nothing to do
    files.crl.write_bytes(old_crl)  # an older CRL must not un-revoke
    assert revocations.is_revoked(site_a)
    assert any("CRL number 1 is lower than the 2 in force" in m for m in door_log)
    other = tmp_path / "other"
    pki.init_consortium(other, "other")
    files.crl.write_bytes(pki.layout(other).crl.read_bytes())
    assert revocations.is_revoked(site_a)
    assert any("not signed by this consortium's CA" in m and "stays in force" in m for m in door_log)
    assert not revocations.is_revoked(pki.load_certificate(files.site_cert("site-b")))
    assert revocations.generation == 1


def test_an_overdue_crl_is_still_enforced_with_a_warning(tmp_path, door_log):
    folder = tmp_path / "certs"
    pki.init_consortium(folder, "test", now=NOW - timedelta(days=40))
    pki.issue_site(folder, "site-a")
    pki.revoke_site(folder, "site-a", now=NOW - timedelta(days=35))
    files = pki.layout(folder)
    revocations = RevocationList(files.crl, pki.load_certificate(files.ca_cert))
    assert revocations.is_revoked(pki.load_certificate(files.site_cert("site-a")))
    assert any("past its next update" in m and "still enforced" in m for m in door_log)


def test_a_crl_of_another_ca_is_refused_at_start(consortium, tmp_path):
    other = tmp_path / "other"
    pki.init_consortium(other, "other")
    with pytest.raises(pki.PKIError, match="not signed by this consortium's CA"):
        RevocationList(pki.layout(other).crl, pki.load_certificate(pki.layout(consortium).ca_cert))


# ---------------------------------------------------------------------------- fleet registry


def test_the_registry_is_read_by_other_processes_as_written(tmp_path):
    path = tmp_path / "fleet-registry.json"
    writer, reader = FleetRegistry(path), FleetRegistry(path)
    assert reader.site_of(7) is None
    assert writer.bind(7, "site-a") and not writer.bind(7, "site-a")
    writer.bind(9, "site-b")
    assert (reader.site_of(7), reader.site_of(9), reader.nodes_of("site-a")) == ("site-a", "site-b", [7])
    path.write_text("{ torn")  # never happens (atomic replace); a reader keeps what it had
    assert reader.site_of(7) == "site-a"
    assert FleetRegistry(path).site_of(7) is None


def test_a_registry_that_cannot_be_written_does_not_stop_the_door(tmp_path):
    (tmp_path / "not-a-folder").write_text("")
    registry = FleetRegistry(tmp_path / "not-a-folder" / "fleet-registry.json")
    assert registry.bind(7, "site-a")  # kept in memory; the failure is logged, not raised
    registry.note_refusal(Refusal(time=NOW.isoformat(), peer="10.0.0.7", cause=door.EXPIRED))
    assert registry.site_of(7) == "site-a"
