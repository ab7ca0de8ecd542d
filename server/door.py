"""The public Fleet listener's door: TLS handshakes that say why they fail, the CRL, refusal logs.

uvicorn and asyncio drop a connection whose TLS handshake fails without a word: the
aggregator logs nothing and the site sees only a closed connection, so it cannot say why
and retries forever. fedgen therefore runs the server side of the handshake itself in
its HTTP protocol (`door_protocol`, with asyncio's ``loop.start_tls``): it knows the
peer's address and OpenSSL's reason, logs the refusal with its cause, and lets the TLS
alert ("certificate expired", "unknown CA", ...) reach the site before closing.

The handshake checks the chain to the consortium CA and the validity period. Revocation
is checked per request against `RevocationList`, which re-reads the CRL whenever its file
changes: a revocation applies to the next request without a restart, also on
connections already open, and a CRL past its next update is a loud warning rather than a
refusal of every site.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from fedgen.config import AggregatorTLSConfig
from fedgen.pki import PKIError, check_crl_signature, crl_is_overdue, load_crl

from .fleet_registry import FleetRegistry, Refusal

log = logging.getLogger(__name__)

# Causes of a refusal, as logged and as `fedgen run` reports them.
NO_CERTIFICATE = "no certificate"
UNKNOWN_CA = "unknown CA"
EXPIRED = "expired"
NOT_YET_VALID = "not yet valid"
REVOKED = "revoked"
IDENTITY_MISMATCH = "identity mismatch"
NOT_A_CLIENT_CERTIFICATE = "not a client certificate"
BAD_CERTIFICATE = "bad certificate"
AGGREGATOR_CERTIFICATE_REFUSED = "the site refused the aggregator's certificate"
NOT_TLS = "not TLS"
HANDSHAKE_FAILED = "TLS handshake failed"

# OpenSSL X509_V_ERR_* codes of a client certificate the handshake refused.
_VERIFY_CAUSES = {
    9: NOT_YET_VALID,
    10: EXPIRED,
    23: REVOKED,
    26: NOT_A_CLIENT_CERTIFICATE,
    2: UNKNOWN_CA,
    7: UNKNOWN_CA,
    18: UNKNOWN_CA,
    19: UNKNOWN_CA,
    20: UNKNOWN_CA,
    21: UNKNOWN_CA,
    24: UNKNOWN_CA,
}
_NOT_TLS_REASONS = {"HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "UNSUPPORTED_PROTOCOL"}
HANDSHAKE_TIMEOUT = 30.0
PEER_CERT_SCOPE_KEY = "fedgen.peer_certificate"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def handshake_cause(error: BaseException) -> tuple[str, str] | None:
    """Why the server side of a TLS handshake failed: (cause, OpenSSL's detail).

    None when nothing was refused: the client went away or timed out mid-handshake.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        return _VERIFY_CAUSES.get(error.verify_code, BAD_CERTIFICATE), str(error.verify_message)
    if not isinstance(error, ssl.SSLError) or isinstance(error, ssl.SSLEOFError):
        return None
    reason = str(error.reason or "")
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return NO_CERTIFICATE, "the client presented no certificate"
    if "_ALERT_" in reason:  # an alert the client sent: it refused us
        return AGGREGATOR_CERTIFICATE_REFUSED, reason.split("_ALERT_", 1)[1].replace("_", " ").lower()
    if reason in _NOT_TLS_REASONS:
        return NOT_TLS, "the client did not speak TLS"
    return HANDSHAKE_FAILED, reason.replace("_", " ").lower() or str(error)


class RefusalLog:
    """Log each refusal with its cause and the peer's address, at most once per
    ``interval`` seconds for the same peer and cause (with a count of those left out),
    and note it in the fleet registry."""

    def __init__(
        self, registry: FleetRegistry | None = None, interval: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry
        self.interval = interval
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def refused(self, peer: str, cause: str, *, site: str | None = None, detail: str = "") -> bool:
        """Report one refusal; True if it was logged, False if rate-limited."""
        now = self.clock()
        key = (peer, cause)
        last, left_out = self._last.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._last[key] = (last, left_out + 1)
            return False
        if len(self._last) > 10_000:  # forget quiet peers rather than grow without bound
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
        self._last[key] = (now, 0)
        who = f" (site {site})" if site else ""
        more = f" [{left_out} more since the last report]" if left_out else ""
        log.warning("Fleet API refused %s%s: %s%s%s", peer, who, cause, f": {detail}" if detail else "", more)
        if self.registry is not None:
            self.registry.note_refusal(
                Refusal(time=datetime.now(timezone.utc).isoformat(), peer=peer, cause=cause, site=site, detail=detail)
            )
        return True


class RevocationList:
    """The consortium CRL as the aggregator enforces it, re-read whenever its file changes.

    A replacement is accepted only if the consortium CA signed it and its CRL number is
    not lower than the one in force (an old CRL must not un-revoke anyone); otherwise the
    CRL in force stays and the problem is logged.

    Raises
    ------
    PKIError
        At construction, if ``path`` holds no CRL signed by ``ca_certificate``.
    """

    def __init__(self, path: Path, ca_certificate: x509.Certificate) -> None:
        self.path = Path(path)
        self.ca_certificate = ca_certificate
        self._stamp: tuple[int, int, int] | None = None
        self.crl = self._read()
        self._serials = frozenset(revoked.serial_number for revoked in self.crl)
        self._stamp = self._file_stamp()
        self.generation = 0  # bumped whenever the set of revoked serials changes
        self._overdue_reported = False
        self._report_overdue()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns, info.st_size

    def _read(self) -> x509.CertificateRevocationList:
        crl = load_crl(self.path)
        try:
            check_crl_signature(crl, self.ca_certificate)
        except PKIError as exc:
            raise PKIError(f"{self.path}: {exc}") from None
        return crl

    @staticmethod
    def _number(crl: x509.CertificateRevocationList) -> int:
        try:
            return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            return 0

    def refresh(self) -> bool:
        """Re-read the CRL if its file changed; True if the set of revoked serials changed."""
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return False
        self._stamp = stamp
        try:
            crl = self._read()
        except PKIError as exc:
            log.error("ignoring the new CRL: %s; the CRL read before stays in force", exc)
            return False
        if self._number(crl) < self._number(self.crl):
            log.error(
                "ignoring %s: its CRL number %d is lower than the %d in force (an older CRL)",
                self.path,
                self._number(crl),
                self._number(self.crl),
            )
            return False
        serials = frozenset(revoked.serial_number for revoked in crl)
        changed = serials != self._serials
        self.crl, self._serials = crl, serials
        self.generation += changed
        log.info("CRL %s re-read: number %d, %d revoked certificate(s)", self.path, self._number(crl), len(serials))
        self._overdue_reported = False
        self._report_overdue()
        return changed

    def _report_overdue(self) -> None:
        if crl_is_overdue(self.crl) and not self._overdue_reported:
            self._overdue_reported = True
            log.warning(
                "the CRL %s is past its next update (%s): it is still enforced, but revocations "
                "made since may be missing; run `fedgen certs refresh-crl` and copy it here",
                self.path,
                self.crl.next_update_utc,
            )

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        """True if the CRL in force lists ``certificate`` (re-reading it first if it changed)."""
        self.refresh()
        return certificate.issuer == self.crl.issuer and certificate.serial_number in self._serials


@dataclass
class _Handshake:
    """One server-side handshake: its raw connection and, once it failed, why."""

    raw: asyncio.Transport
    error: ssl.SSLError | None = None


# Set by the task that runs a handshake; asyncio creates the TLS object within that task's
# context, which is how the object finds its handshake.
_CURRENT_HANDSHAKE: ContextVar[_Handshake | None] = ContextVar("fedgen_handshake", default=None)


class _AlertingSSLObject(ssl.SSLObject):
    """A server TLS object that lets the alert of a refused handshake reach the client.

    asyncio drops the connection the moment the server's handshake fails, before the
    alert OpenSSL wrote for the client leaves. Reporting the first failure as "wants more
    data" makes asyncio send what is pending; the connection is then closed and the
    real error kept for the log.
    """

    fedgen_handshake: _Handshake | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            attempt = self.fedgen_handshake
            if attempt is None or attempt.error is not None:
                raise
            attempt.error = exc
            asyncio.get_running_loop().call_soon(attempt.raw.close)  # once the alert is written
            raise ssl.SSLWantReadError("handshake refused; the alert goes out first") from exc


class _DoorSSLContext(ssl.SSLContext):
    sslobject_class = _AlertingSSLObject

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        tls_object = super().wrap_bio(*args, **kwargs)
        tls_object.fedgen_handshake = _CURRENT_HANDSHAKE.get()
        return tls_object


def door_ssl_context(tls: AggregatorTLSConfig) -> ssl.SSLContext:
    """TLS 1.2+ server context: a client certificate issued by the consortium CA, in its
    validity period, is required (revocation: `RevocationList`, per request)."""
    context = _DoorSSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    context.load_verify_locations(cafile=str(tls.ca_certificate))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def door_protocol(
    context: ssl.SSLContext, refusals: RefusalLog, handshake_timeout: float = HANDSHAKE_TIMEOUT
) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol behind fedgen's own server-side TLS handshake.

    The listener is configured without TLS; each connection's handshake runs here, a
    refused one is logged with its cause and peer, and each request of an accepted one
    carries the peer certificate (DER) in its scope under `PEER_CERT_SCOPE_KEY`.
    """

    class FleetDoorProtocol(H11Protocol):
        _accepting: asyncio.Task[None] | None = None
        # With TLS 1.3 the request arrives with the handshake's last flight, before
        # start_tls returns: it waits here until uvicorn's side of the connection is made.
        _early: bytearray | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            transport.pause_reading()  # the ClientHello waits in the socket for start_tls
            self._early = bytearray()
            self._accepting = asyncio.get_running_loop().create_task(self._accept(transport))

        def data_received(self, data: bytes) -> None:
            if self._early is not None:
                self._early += data
                return
            super().data_received(data)

        async def _accept(self, raw: asyncio.Transport) -> None:
            peername = raw.get_extra_info("peername")
            peer = str(peername[0]) if peername else "unknown peer"
            attempt = _Handshake(raw)
            _CURRENT_HANDSHAKE.set(attempt)  # this task's own context
            secure = None
            try:
                secure = await asyncio.get_running_loop().start_tls(
                    raw, self, context, server_side=True, ssl_handshake_timeout=handshake_timeout
                )
            except OSError:  # refused (kept in attempt.error), or the client went away
                pass
            verdict = handshake_cause(attempt.error) if attempt.error is not None else None
            if verdict is not None:
                refusals.refused(peer, verdict[0], detail=verdict[1])
            if secure is None or attempt.error is not None or secure.is_closing():
                raw.close()
                return
            der = secure.get_extra_info("ssl_object").getpeercert(binary_form=True)
            super().connection_made(secure)
            inner = self.app

            async def with_peer(scope: Scope, receive: Receive, send: Send) -> None:
                scope[PEER_CERT_SCOPE_KEY] = der
                await inner(scope, receive, send)

            self.app = with_peer
            early, self._early = bytes(self._early or b""), None
            if early:
                super().data_received(early)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.transport is None:  # lost before the handshake: uvicorn never saw it
                return
            super().connection_lost(exc)

    return FleetDoorProtocol
